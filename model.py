"""
Hand-written LLaMA (1/2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM) and OPT in plain PyTorch, plus
reading and writing Hugging Face-format checkpoint folders (their tokenizers are data.py's job).

Every model exposes the interface the pruning code drives:
    x = model.embed(idx)          # (B, T) token ids -> (B, T, C) hidden states
    for block in model.blocks:    # decoder blocks, each (B, T, C) -> (B, T, C)
        x = block(x)              # block.linears(): prunable nn.Linear by name
    logits = model.head(x)        # final norm (+ projection) + lm_head
"""

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# LLaMA (and the families that differ from it by a flag: Mistral, Qwen2/3, SmolLM)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even when the model runs in bf16/fp16, as the reference does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg, window=None):
        super().__init__()
        self.window = window  # sliding attention: each token sees itself and the window - 1 tokens before it
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(cfg)

    def forward(self, x):
        B, T, C = x.shape
        # QKV: q (B, nh, T, hd), k and v (B, nkv, T, hd)
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:  # Qwen3 normalises each head's query and key before rotating them
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE, angles in float32 (HF checkpoints permute q/k for the rotate-half convention)
        if self.inv_freq.device != x.device:  # moved once: a CPU-to-GPU copy waits for the GPU's queue to drain
            self.inv_freq = self.inv_freq.to(x.device)
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # causal attention; grouped-query heads share K/V without materialising copies
        gqa = self.n_kv_head != self.n_head
        if self.window is not None and T > self.window:
            i = torch.arange(T, device=x.device)
            seen = (i.view(-1, 1) >= i) & (i.view(-1, 1) - i < self.window)  # (T, T): query row, key column
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # output projection
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Common part of both families' decoder blocks: the prunable layers in execution order."""

    def linears(self):
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.Linear)}


class LlamaBlock(Block):
    def __init__(self, cfg, window=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))

    def scale_pairs(self):
        """Sparsity Induction's per-channel scales that fold exactly into this block: {name: (size, [(module, dim,
        index, power), ...])}: the scale s (size,) multiplies `module`'s weight along `dim` (0: output rows, and
        the bias; 1: input columns) by s[index] ** power (index None: s itself)."""
        a, C, H = self.self_attn, self.input_layernorm.weight.numel(), self.mlp.up_proj.out_features
        hd, rep, half = a.head_dim, a.n_head // a.n_kv_head, a.head_dim // 2
        o_in = torch.arange(a.n_head * hd)  # o's input channels: head h reads kv head h // rep
        pairs = {"attn_in": (C, [("input_layernorm", 0, None, -1),
                                 *((f"self_attn.{p}_proj", 1, None, 1) for p in "qkv")]),
                 "v_o": (a.n_kv_head * hd, [("self_attn.v_proj", 0, None, -1),
                                            ("self_attn.o_proj", 1, o_in // hd // rep * hd + o_in % hd, 1)]),
                 "mlp_in": (C, [("post_attention_layernorm", 0, None, -1), ("mlp.gate_proj", 1, None, 1),
                                ("mlp.up_proj", 1, None, 1)]),
                 "up_down": (H, [("mlp.up_proj", 0, None, -1), ("mlp.down_proj", 1, None, 1)])}
        if not a.qk_norm:  # (Qwen3's norm over each head of q and k would undo their scales)
            # q's rows times s, k's divided by s: q.k unchanged; RoPE rotates dims d and d + hd/2 together, so
            # they share a scale, and the rep query heads of a kv head share its key's
            q_out, k_out = torch.arange(a.n_head * hd), torch.arange(a.n_kv_head * hd)
            pairs["q_k"] = (a.n_kv_head * half, [("self_attn.q_proj", 0, q_out // hd // rep * half + q_out % half, 1),
                                                 ("self_attn.k_proj", 0, k_out // hd * half + k_out % half, -1)])
        return pairs


class CausalLM(nn.Module):
    """Both families' forward: embed -> blocks -> head."""

    def hidden(self, idx):
        """(B, T) ids -> (B, T, C) outputs of the last block, before the final norm."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx):
        return self.head(self.hidden(idx))


class Llama(CausalLM):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(LlamaBlock(cfg, window) for window in cfg.windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, idx):
        return self.embed_tokens(idx)

    def head(self, x):
        return self.lm_head(self.norm(x))


def rope_inv_freq(cfg):
    """RoPE inverse frequencies (head_dim/2,), float32, with the `linear` or `llama3` rescaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # LLaMA-3.1: keep high frequencies, divide low ones by `factor`, interpolate in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise UserError(f"config.json: rope_scaling type {kind!r} is not supported (supported: default, linear, llama3).")


# -----------------------------------------------------------------------------
# OPT


class OPTAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, bias = cfg.hidden_size, cfg.enable_bias
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(C, C, bias=bias)
        self.k_proj = nn.Linear(C, C, bias=bias)
        self.v_proj = nn.Linear(C, C, bias=bias)
        self.out_proj = nn.Linear(C, C, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class OPTBlock(Block):
    def __init__(self, cfg):
        super().__init__()
        C, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.act = OPT_ACTIVATIONS[cfg.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(C, elementwise_affine=affine)
        self.self_attn = OPTAttention(cfg)
        self.final_layer_norm = nn.LayerNorm(C, elementwise_affine=affine)
        self.fc1 = nn.Linear(C, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, C, bias=cfg.enable_bias)

    def forward(self, x):
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        # post-LN variant: normalise after each residual sum
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))

    def scale_pairs(self):
        """Sparsity Induction's scales that fold exactly into this block (as LlamaBlock.scale_pairs)."""
        C, F_ = self.fc1.in_features, self.fc1.out_features
        pairs = {"q_k": (C, [("self_attn.q_proj", 0, None, 1), ("self_attn.k_proj", 0, None, -1)]),
                 "v_o": (C, [("self_attn.v_proj", 0, None, -1), ("self_attn.out_proj", 1, None, 1)])}
        if self.pre_ln and self.final_layer_norm.weight is not None:  # a norm with weights right before them
            pairs["attn_in"] = (C, [("self_attn_layer_norm", 0, None, -1),
                                    *((f"self_attn.{p}_proj", 1, None, 1) for p in "qkv")])
            pairs["mlp_in"] = (C, [("final_layer_norm", 0, None, -1), ("fc1", 1, None, 1)])
        if self.act is F.relu:  # relu(x / s) = relu(x) / s for s > 0; GELU has no such identity
            pairs["fc1_fc2"] = (F_, [("fc1", 0, None, -1), ("fc2", 1, None, 1)])
        return pairs


class OPT(CausalLM):
    POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, E = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, E)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + self.POSITION_OFFSET, C)
        self.project_in = nn.Linear(E, C, bias=False) if E != C else None
        self.blocks = nn.ModuleList(OPTBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(C, elementwise_affine=cfg.layer_norm_elementwise_affine) \
            if cfg.has_final_norm else None
        self.project_out = nn.Linear(C, E, bias=False) if E != C else None
        self.lm_head = nn.Linear(E, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # OPT always ties the output embedding

    def embed(self, idx):
        B, T = idx.shape
        x = self.embed_tokens(idx)  # (B, T, E)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, C)
        pos = torch.arange(T, device=idx.device) + self.POSITION_OFFSET
        return x + self.embed_positions(pos)

    def head(self, x):
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, E)
        return self.lm_head(x)


# -----------------------------------------------------------------------------
# the layer an SSLC model holds (prune.sslc_prune): written as weights plus a PEFT LoRA folder, read back


class SparsePlusLowRank(nn.Linear):
    """y = S x + U (V x) + b: SSLC's layer. `weight` is S (a sparse matrix stored dense, as every pruned weight
    here is), so whatever reads a Linear's weight reads S; U (out, r) and V (r, in) hold the low-rank part."""

    def __init__(self, S, U, V, bias=None):
        super().__init__(S.shape[1], S.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(S, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.U = nn.Parameter(U.to(S.dtype), requires_grad=False)
        self.V = nn.Parameter(V.to(S.dtype), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.V.t() @ self.U.t()


# -----------------------------------------------------------------------------
# config.json -> config dataclass (LLaMA's, OPT's), checked


def check_sizes(cfg, names):
    """Every named size of a config must be a positive integer (a 0 or null would fail deep inside torch)."""
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"config.json: {name}={v!r} must be a positive integer; the checkpoint's config is "
                            "damaged or not a model config.")


def check_positive(name, v):
    """A config value that must be a finite number > 0 (a 0 or negative eps or factor gives NaN logits later)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
        raise UserError(f"config.json: {name}={v!r} must be a positive number; the checkpoint's config is damaged.")


ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling):
    """rope_scaling is absent, or a supported kind with every number it needs."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise UserError(f"config.json: rope_scaling {scaling!r} is not supported (supported: "
                        f"{', '.join(ROPE_SCALING_KEYS)}).")
    for key in ROPE_SCALING_KEYS[kind]:
        check_positive(f"rope_scaling.{key}", scaling.get(key))
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError("config.json: rope_scaling.high_freq_factor must exceed low_freq_factor.")


def check_token_ids(cfg):
    """bos/eos ids are null (the model has none) or rows of the embedding."""
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < cfg.vocab_size):
            raise UserError(f"config.json: {name}={v!r} is not a token id below vocab_size={cfg.vocab_size}; the "
                            "checkpoint's config is damaged.")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = None  # None: multi-head attention
    head_dim: int = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # None, {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # biases on q, k, v and o
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # SwiGLU's gate; every supported release has silu
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, written back on export

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_sizes(self, ("head_dim",))
        check_positive("rope_theta", self.rope_theta)
        check_positive("rms_norm_eps", self.rms_norm_eps)
        check_rope_scaling(self.rope_scaling)
        check_token_ids(self)
        if self.hidden_act != "silu":
            raise UserError(f"config.json: hidden_act {self.hidden_act!r} is not supported (supported: silu).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}; the checkpoint's config is inconsistent.")
        self.windows = attention_windows(self.raw, self.num_hidden_layers)


def attention_windows(raw, n_blocks):
    """Each block's sliding attention window (None: full causal attention), as transformers reads config.json:
    Mistral's sliding_window (default 4096) on every block; Qwen2/3's only with use_sliding_window, on the blocks
    its layer_types name, else on those from max_window_layers (default 28) on."""
    kind, window = raw.get("model_type"), raw.get("sliding_window", 4096)
    if kind == "mistral" and window is not None:
        types = ["sliding_attention"] * n_blocks
    elif kind in ("qwen2", "qwen3") and window is not None and raw.get("use_sliding_window"):
        first = raw.get("max_window_layers", 28)
        types = raw.get("layer_types") or ["sliding_attention" if i >= first else "full" for i in range(n_blocks)]
    else:
        return [None] * n_blocks
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or len(types) != n_blocks:
        raise UserError(f"config.json: sliding_window={window!r} must be a positive integer and layer_types list "
                        f"one type per block ({n_blocks}); the checkpoint's config is damaged.")
    return [window if t == "sliding_attention" else None for t in types]


OPT_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True  # False: post-LN blocks (OPT-350M)
    word_embed_proj_dim: int = None  # != hidden_size: project_in / project_out (OPT-350M)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    _remove_final_layer_norm: bool = False
    bos_token_id: int = 2  # OPT prepends </s>
    eos_token_id: int = 2
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        check_sizes(self, ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings", "word_embed_proj_dim"))
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"config.json: hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                            f"{self.num_attention_heads}; the checkpoint's config is inconsistent.")
        check_token_ids(self)
        if self.activation_function not in OPT_ACTIVATIONS:
            raise UserError(f"config.json: activation_function {self.activation_function!r} is not supported "
                            f"(supported: {', '.join(OPT_ACTIVATIONS)}).")
        self.has_final_norm = self.do_layer_norm_before and not self._remove_final_layer_norm


# -----------------------------------------------------------------------------
# the checkpoint's tensor names, and the config's family


# the LLaMA layout and the families that differ from it only by a flag (Qwen2: q/k/v biases; Qwen3: q/k norms)
LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def config_from_dict(raw, path="config.json"):
    kind = raw.get("model_type")
    if kind in LLAMA_TYPES:
        fields, make = LlamaConfig.__dataclass_fields__, LlamaConfig
    elif kind == "opt":
        fields, make = OPTConfig.__dataclass_fields__, OPTConfig
    else:
        raise UserError(f"{path}: model_type {kind!r} is not supported; supported model types: "
                        f"{', '.join(sorted(LLAMA_TYPES | {'opt'}))}.")
    quant = raw.get("quantization_config")  # GPTQ, AWQ, bitsandbytes, FP8 releases: packed integers or scales
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UserError(f"{path}: the checkpoint is quantized ({method}); pruning needs its full-precision weights: "
                        "pass the unquantized release of the model.")
    kw = {k: v for k, v in raw.items() if k in fields and k not in ("raw", "qkv_bias", "qk_norm")}
    if kind == "qwen2":
        kw["qkv_bias"] = True
    if kind == "qwen3":
        kw["qk_norm"] = True
    rope = raw.get("rope_parameters")  # transformers >= 5 moves rope_theta/rope_scaling here
    if kind in LLAMA_TYPES and isinstance(rope, dict):
        kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
        kw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    for eos in ("eos_token_id", "bos_token_id"):
        if isinstance(kw.get(eos), list):  # LLaMA-3 lists several end-of-turn ids
            kw[eos] = kw[eos][0]
    try:
        return make(**kw, raw=raw)
    except TypeError as e:
        raise UserError(f"{path}: a required field is missing ({e}); the config is incomplete.") from None


def read_config(ckpt_dir):
    """Parse `ckpt_dir/config.json` into LlamaConfig or OPTConfig."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir!r} does not exist; pass --ckpt a Hugging Face model folder "
                        "(config.json plus *.safetensors or pytorch_model.bin).")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir!r} has no config.json, so it is not a Hugging Face model folder; "
                        "point --ckpt at the folder that holds config.json and the weights.")
    try:
        with open(path) as f:
            raw = json.load(f)
        assert isinstance(raw, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise UserError(f"{path} is not a valid JSON object ({e}); re-download or repair the file.") from None
    return config_from_dict(raw, path)


def build_model(cfg):
    return Llama(cfg) if isinstance(cfg, LlamaConfig) else OPT(cfg)


def hf_name_map(cfg):
    """Our state-dict key -> the checkpoint's key ('{}' is the block index)."""
    if isinstance(cfg, LlamaConfig):
        top = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not cfg.tie_word_embeddings:
            top["lm_head.weight"] = "lm_head.weight"
        prefix = "model.layers.{}."
    else:
        top = {"embed_tokens.weight": "model.decoder.embed_tokens.weight",
               "embed_positions.weight": "model.decoder.embed_positions.weight"}
        for name in ("project_in", "project_out"):
            if cfg.word_embed_proj_dim != cfg.hidden_size:
                top[f"{name}.weight"] = f"model.decoder.{name}.weight"
        if cfg.has_final_norm and cfg.layer_norm_elementwise_affine:
            top.update({f"final_layer_norm.{p}": f"model.decoder.final_layer_norm.{p}" for p in ("weight", "bias")})
        prefix = "model.decoder.layers.{}."
    names = dict(top)
    with torch.device("meta"):
        block = LlamaBlock(cfg) if isinstance(cfg, LlamaConfig) else OPTBlock(cfg)
    for i in range(cfg.num_hidden_layers):
        for key in block.state_dict():
            names[f"blocks.{i}.{key}"] = prefix.format(i) + key
    return names


# keys a checkpoint may carry that hold nothing we need
HARMLESS_KEYS = ("rotary_emb.inv_freq", "lm_head.weight", "embed_positions._float_tensor")


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then raw little-endian data

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path):
    """Return (header dict without __metadata__, byte offset where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"{path} is not a valid safetensors file (truncated, or its header length {n} does not "
                            f"fit the file's {size} bytes); re-download it.")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict) and all(isinstance(v, dict) for v in header.values()), "not a mapping"
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
            raise UserError(f"{path}: the safetensors header is corrupt ({e}); re-download the file.") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which is not supported "
                            f"(supported: {', '.join(SAFETENSORS_DTYPES)}).")
        try:
            begin, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            assert all(isinstance(v, int) and v >= 0 for v in (begin, end, *info["shape"])) and begin <= end
        except (KeyError, TypeError, ValueError, AssertionError):
            raise UserError(f"{path}: the header entry of tensor {name!r} is malformed ({info}); the file is "
                            "corrupt, re-download it.") from None
        itemsize = SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if end - begin != numel * itemsize:
            raise UserError(f"{path}: tensor {name!r} has shape {info['shape']} ({numel * itemsize} bytes of "
                            f"{info['dtype']}) but {end - begin} bytes in the file; the file is corrupt, "
                            "re-download it.")
        if 8 + n + end > size:
            raise UserError(f"{path}: tensor {name!r} lies past the end of the file; the file is truncated, "
                            "re-download it.")
    return header, 8 + n


def check_finite(t, path, name):
    """A NaN or Inf in a checkpoint tensor is a damaged file: stop, naming it, before it turns into results."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise UserError(f"{path}: tensor {name!r} holds NaN or Inf values; the file is corrupt (or the model "
                        "diverged), re-download it.")


def iter_safetensors(path, dtype=None, chunk_bytes=64 << 20):
    """Yield (name, tensor) one at a time from a memory map, each cast to `dtype` and copied out of the map.

    The copy goes `chunk_bytes` of the file at a time, each chunk's mapped pages handed back at once, so a
    1 GiB embedding never sits in memory twice: resident memory stays near one copy of the model.
    """
    assert sys.byteorder == "little", "safetensors data is little-endian"
    header, start = read_safetensors_header(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, info in header.items():
            begin, end = (start + o for o in info["data_offsets"])
            file_dtype = SAFETENSORS_DTYPES[info["dtype"]]
            itemsize = file_dtype.itemsize
            target = dtype if dtype is not None and file_dtype.is_floating_point else file_dtype
            t = torch.empty(info["shape"], dtype=target)
            flat = t.view(-1)
            step = max(1, chunk_bytes // itemsize)  # elements per chunk
            for i in range(0, flat.numel(), step):
                n = min(step, flat.numel() - i)
                lo = begin + i * itemsize
                with warnings.catch_warnings():  # the map is read-only; we only read from it
                    warnings.simplefilter("ignore")
                    flat[i:i + n] = torch.frombuffer(mm, dtype=torch.uint8, count=n * itemsize, offset=lo) \
                        .view(file_dtype)
                check_finite(flat[i:i + n], path, name)
                aligned = lo // page * page
                mm.madvise(mmap.MADV_DONTNEED, aligned, lo + n * itemsize - aligned)
            yield name, t


def save_safetensors(tensors, path):
    """Write {name: tensor} as a safetensors file (atomically: a temporary file, then rename)."""
    inverse = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inverse[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_write(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


# -----------------------------------------------------------------------------
# checkpoint folder -> model


def checkpoint_files(ckpt_dir):
    """The weight files of a checkpoint folder: safetensors (single or sharded) or pytorch_model.bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(ckpt_dir, index)):
            path = os.path.join(ckpt_dir, index)
            try:
                with open(path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path} is not a valid shard index ({e}); re-download it.") from None
            files = [os.path.join(ckpt_dir, s) for s in shards]
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise UserError(f"{path} lists shard {missing[0]!r}, which is missing; download every shard.")
            return files
        if os.path.isfile(os.path.join(ckpt_dir, single)):
            return [os.path.join(ckpt_dir, single)]
    raise UserError(f"{ckpt_dir!r} has no weights: expected model.safetensors, sharded model-*.safetensors with "
                    "model.safetensors.index.json, or pytorch_model.bin.")


def iter_checkpoint(ckpt_dir, dtype):
    for path in checkpoint_files(ckpt_dir):
        if path.endswith(".safetensors"):
            yield from ((name, t, path) for name, t in iter_safetensors(path, dtype))
            continue
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it whole
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{path} could not be read as a PyTorch state dict ({e}); re-download it.") from None
        for name in list(sd):
            t = sd.pop(name)
            check_finite(t, path, name)  # safetensors are checked chunk by chunk as they are read
            yield name, (t.to(dtype) if t.is_floating_point() else t), path


def load_model(ckpt_dir, dtype=torch.float32):
    """Build the model described by `ckpt_dir/config.json` and fill it from the folder's weights."""
    cfg = read_config(ckpt_dir)
    with torch.device("meta"):
        model = build_model(cfg)
    names = hf_name_map(cfg)
    ours = {hf: key for key, hf in names.items()}
    expected = model.state_dict()
    loaded = {}
    for name, t, path in iter_checkpoint(ckpt_dir, dtype):
        key = ours.get(name) or ours.get("model." + name)  # older OPT files omit the "model." prefix
        if key is None:
            if name.endswith(HARMLESS_KEYS):
                continue
            raise UserError(f"{path}: tensor {name!r} is not part of a {cfg.raw.get('model_type')} model with this "
                            "config.json; the weights and config.json do not belong together.")
        if key in loaded:
            raise UserError(f"{path}: tensor {name!r} is also in an earlier file of the checkpoint; a shard is "
                            "duplicated or from another model: re-download the checkpoint.")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                            f"{tuple(expected[key].shape)}; the weights and config.json do not belong together.")
        loaded[key] = t
    missing = [names[k] for k in names if k not in loaded]
    if missing:
        raise UserError(f"{ckpt_dir}: tensor {missing[0]!r} is missing from the weights ({len(missing)} missing in "
                        "all); the checkpoint is incomplete or for another architecture.")
    model.load_state_dict(loaded, assign=True, strict=False)
    if getattr(cfg, "tie_word_embeddings", True):
        model.lm_head.weight = model.embed_tokens.weight
    load_lora(model, os.path.join(ckpt_dir, "lora"), dtype)
    return model.eval().requires_grad_(False)  # pruning never trains the weights themselves


def load_lora(model, lora_dir, dtype):
    """The low-rank parts save_lora wrote (an SSLC export's lora/ folder), put back: every layer it names becomes
    a SparsePlusLowRank computing W x + U (V x), U = lora_B * alpha / r and V = lora_A, as PEFT merges them.
    Nothing happens without the folder."""
    config_path = os.path.join(lora_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        return
    fix = "delete the lora/ folder to evaluate the sparse weights alone, or export the model again."
    try:
        with open(config_path) as f:
            cfg = json.load(f)
        assert cfg.get("peft_type") == "LORA" and not cfg.get("fan_in_fan_out") and not cfg.get("use_dora") \
            and cfg.get("bias", "none") == "none"
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, AttributeError):
        raise UserError(f"{config_path} is not a plain LoRA adapter of this program's (PEFT LoRA, no fan_in_fan_out, "
                        f"DoRA or biases); {fix}") from None
    path = os.path.join(lora_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"{lora_dir} has adapter_config.json but no adapter_model.safetensors; {fix}")
    tensors = dict(iter_safetensors(path, dtype))
    ours = {hf.removesuffix(".weight"): key.removesuffix(".weight") for key, hf in hf_name_map(model.cfg).items()}
    for key, A in ((k, t) for k, t in tensors.items() if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        name = ours.get(module)
        lin = model.get_submodule(name) if name and ".blocks." in f".{name}" else None
        if B is None or not isinstance(lin, nn.Linear) or B.shape[1] != A.shape[0] \
                or (B.shape[0], A.shape[1]) != tuple(lin.weight.shape):
            raise UserError(f"{path}: {key!r} does not fit a prunable layer of this model (or lacks its lora_B); {fix}")
        r = cfg.get("rank_pattern", {}).get(module, cfg.get("r", A.shape[0]))
        alpha = cfg.get("alpha_pattern", {}).get(module, cfg.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        U = B if scaling == 1 else (B.float() * scaling).to(dtype)  # ours: alpha = r, so U is lora_B bit for bit
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, SparsePlusLowRank(lin.weight, U, A, lin.bias))
    print(f"model: {lora_dir}: low-rank parts applied to {sum(k.endswith('.lora_A.weight') for k in tensors)} "
          "layers (each computes W x + U (V x), as the run that exported it measured it)", file=sys.stderr)


# the files of a checkpoint's tokenizer (data.load_tokenizer reads them), copied with an exported model
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


def save_model(model, out_dir, tokenizer_dir=None):
    """Write `model` as a new Hugging Face-format folder (config.json, model.safetensors, tokenizer files, and
    lora/ for low-rank parts: save_lora).

    `out_dir` must not exist or be empty: the folder is filled under a temporary name and renamed into place,
    and nothing that already exists is removed.
    """
    check_writable(out_dir, "the export folder", folder=True, new=True)
    target = os.path.realpath(out_dir)  # a link to an empty folder is written through: the folder is replaced
    raw = declare_biases(model)
    sd = model.state_dict()
    tensors = {hf: sd[key] for key, hf in hf_name_map(config_from_dict(raw)).items()}
    raw["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with atomic_folder(target) as tmp:
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        save_json(raw, os.path.join(tmp, "config.json"))
        save_lora(model, os.path.join(tmp, "lora"), os.path.abspath(out_dir))
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy(os.path.join(tokenizer_dir, name), tmp)


def check_bias_export(cfg):
    """A model of this config can be written with biases on every layer (declare_biases)."""
    if getattr(cfg, "qk_norm", False):
        raise UserError("transformers' Qwen3 has no biases on its MLP layers, so a Qwen3 model with Sparsity "
                        "Induction's biases cannot be written in its format; evaluate it without --export.")
    if any(getattr(cfg, "windows", [])):
        raise UserError("a model with Sparsity Induction's biases is written as transformers' llama, which has no "
                        "sliding attention window, and this model has one; evaluate it without --export.")


def declare_biases(model):
    """config.json's fields for a model whose layers gained biases (Sparsity Induction's shift): OPT's enable_bias;
    LLaMA's attention_bias and mlp_bias, which transformers reads for model_type llama alone, so a Mistral or
    Qwen2 model is written as the llama it then equals. Qwen3's q/k norms have no llama equivalent."""
    raw, block = dict(model.cfg.raw), model.blocks[0]
    if isinstance(model.cfg, OPTConfig):
        return dict(raw, enable_bias=True) if block.fc1.bias is not None and not model.cfg.enable_bias else raw
    if block.mlp.down_proj.bias is None or (model.cfg.attention_bias and model.cfg.mlp_bias):
        return raw
    check_bias_export(model.cfg)
    return dict(raw, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=True)


def save_lora(model, out_dir, base_model):
    """The low-rank parts of layers computing W x + U (V x) (SSLC's) as a PEFT LoRA adapter folder beside the
    exported weights (the folder `base_model`): lora_A = V (r, in), lora_B = U (out, r), each layer's own rank in
    rank_pattern and alpha = rank in alpha_pattern, so that PEFT's scaling alpha / r is 1. Nothing is written
    without them; load_lora reads them back."""
    names = hf_name_map(model.cfg)
    tensors, ranks = {}, {}
    for key, lin in model.named_modules():
        if getattr(lin, "U", None) is not None and lin.U.shape[1] > 0:
            module = names[f"{key}.weight"].removesuffix(".weight")  # e.g. model.layers.0.self_attn.q_proj
            tensors[f"base_model.model.{module}.lora_A.weight"] = lin.V.detach().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = lin.U.detach().contiguous()
            ranks[module] = lin.U.shape[1]
    if not ranks:
        return
    os.makedirs(out_dir)
    save_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    r = max(ranks.values())
    # the base model is the export folder itself: AutoPeftModelForCausalLM.from_pretrained(lora/) loads both
    save_json({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
               "r": r, "lora_alpha": r, "rank_pattern": ranks,
               "alpha_pattern": ranks, "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
               "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}, os.path.join(out_dir,
                                                                                                 "adapter_config.json"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(cfg, device):
    """The checkpoint's own dtype on a GPU; float32 on the CPU, where half-precision kernels may be slow."""
    if not str(device).startswith("cuda"):
        return "float32"
    stored = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype")  # transformers >= 5 writes "dtype"
    return stored if stored in DTYPES else "float32"


def check_seqlen(cfg, seqlen):
    """At least two tokens per window (one to predict); OPT has no positions past its table, LLaMA extrapolates."""
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} leaves no token to predict; use at least 2 (2048 is the convention).")
    if seqlen > cfg.max_position_embeddings:
        if isinstance(cfg, OPTConfig):
            raise UserError(f"--seqlen {seqlen} is longer than OPT's {cfg.max_position_embeddings} learned "
                            f"positions; use --seqlen {cfg.max_position_embeddings} or less.")
        print(f"warning: --seqlen {seqlen} is longer than the model's max_position_embeddings "
              f"({cfg.max_position_embeddings}); RoPE extrapolates beyond what the model was trained on",
              file=sys.stderr)


def fingerprint(model):
    """A hash of the weights (names, shapes, 4096 values of each rounded to bf16), independent of the dtype the
    model was loaded in: what an elastic model records of the checkpoint it was trained on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        n, k = flat.numel(), min(4096, flat.numel())
        # evenly spaced indices in exact integer arithmetic: a float32 linspace rounds past the end above 2^24
        sample = flat[torch.arange(k) * (n - 1) // max(k - 1, 1)]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# -----------------------------------------------------------------------------
# file safety: a user's error is one message; every write is atomic, a full disk a clear error


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config): the message says what and how to fix it."""


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """A file object whose content replaces `path` only once fully written (a temporary file beside it, then a
    rename): a crash or Ctrl-C leaves the old file or none, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with no_space_is_an_error(path), open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def no_space_is_an_error(path):
    """A full disk while writing `path` becomes a UserError that names the path and the space left."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise UserError(f"no space left to write {path!r} ({free / 2**20:.1f} MiB free there); free some space or "
                        "write to another disk.") from None


def save_json(obj, path):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


@contextlib.contextmanager
def atomic_folder(out_dir):
    """A new temporary folder beside `out_dir` that becomes `out_dir` once filled, and is removed if anything
    fails. `out_dir` may not exist yet or be an empty folder; nothing that exists is ever deleted."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the folder it becomes should not be
    try:
        with no_space_is_an_error(out_dir):
            yield tmp
        try:
            os.rename(tmp, out_dir)  # POSIX: replaces an empty folder, fails on a non-empty one
        except OSError as e:
            raise UserError(f"{out_dir!r} could not be written ({e.strerror}); it must not exist or be an empty "
                            "folder.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nearest_existing(path):
    """`path` itself if it exists, else its closest existing parent folder (where a new folder would be made)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_writable(path, flag, folder=False, new=False):
    """A file (in an existing folder) or a folder (created with its parents; if `new`, absent or empty) that
    will be written later: checked now, before any time is spent."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{flag} {path!r} is a link to nothing ({os.readlink(path)!r}); give a path that exists or "
                        "a new name.")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(f"{flag} {path!r} is a {'file' if folder else 'folder'}; give a "
                        f"{'folder' if folder else 'file'} name.")
    if new and os.path.isdir(path) and os.listdir(path):
        raise UserError(f"{flag} {path!r} already exists and is not empty; nothing is overwritten or deleted: "
                        "choose a new folder name.")
    existing = nearest_existing(path) if folder else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {path!r} cannot be written: the folder {existing!r} is missing or not writable.")
