"""model.py: the hand-written models match transformers; checkpoints are read, written, and refused clearly."""

import copy
import json
import os

import pytest
import torch

import data
import model as M
from conftest import (hf_tiny, needs_transformers, published_config, REAL_TOKENIZERS, save_bin, SMALL, tiny_llama,
                      transformers, write_config)
from model import UserError


# -----------------------------------------------------------------------------
# model.py: parity with transformers


@pytest.mark.parametrize("kind,fmt", [("llama_mha", "sharded"), ("llama_gqa", "safetensors"),
                                      ("opt_pre", "bin"), ("opt_post", "safetensors"), ("llama_gqa", "bin"),
                                      ("llama_linear", "safetensors"), ("smollm", "safetensors"),
                                      ("mistral", "safetensors"), ("qwen2", "sharded"), ("qwen3", "safetensors"),
                                      ("mistral_window", "safetensors"), ("qwen2_window", "safetensors")])
@needs_transformers
def test_logits_and_greedy_generation_match_transformers(tmp_path, kind, fmt):
    """Our model loaded from the saved folder gives the reference's logits and greedy tokens."""
    ref = hf_tiny(kind)
    if fmt == "bin":
        save_bin(ref, tmp_path)
    else:
        ref.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if fmt == "sharded" else {}))
    if fmt == "sharded":
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = M.load_model(str(tmp_path))
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (40, 9):  # 9: the window kinds' 8 tokens plus one, the shortest input their window cuts
            assert (ref(idx[:, :T]).logits - ours(idx[:, :T])).abs().max() <= 1e-4
    prompt = idx[:1, :5]
    assert torch.equal(ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20),
                       greedy(ours, prompt, 20))


@torch.no_grad()
def greedy(model, idx, n):
    """Greedy decoding of `n` tokens (no KV cache: a parity check, not a generator)."""
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@needs_transformers
def test_blocks_expose_prunable_linears_in_execution_order():
    """block.linears() lists the paper's prunable layers in the order the forward pass uses them."""
    llama = M.build_model(M.config_from_dict(dict(hf_tiny("llama_mha").config.to_dict())))
    opt = M.build_model(M.config_from_dict(dict(hf_tiny("opt_pre").config.to_dict())))
    assert list(llama.blocks[0].linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(opt.blocks[0].linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.out_proj", "fc1", "fc2"]


def test_rope_frequencies_stay_float32_and_follow_the_inputs_device():
    """RoPE's frequencies are not rounded by model.to(bfloat16), and after one forward they live on the inputs'
    device (moved once, not copied in every forward: on a GPU each CPU-to-GPU copy waits for its queue)."""
    model = tiny_llama().to(torch.bfloat16)
    attn = model.blocks[0].self_attn
    assert attn.inv_freq.dtype == torch.float32 and torch.equal(attn.inv_freq, M.rope_inv_freq(model.cfg))
    attn.to("meta")  # a second device that every machine has: moves the weights, not the plain attribute
    attn(torch.empty(1, 5, model.cfg.hidden_size, device="meta", dtype=torch.bfloat16))
    assert attn.inv_freq.device.type == "meta" and attn.inv_freq.dtype == torch.float32


def test_fingerprint_sees_a_change_in_any_tensor_but_not_the_dtype():
    """The fingerprint an elastic model records changes when any tensor's sampled values change (here its last,
    which the even sample always includes), and not when the same weights are loaded in bfloat16."""
    model = tiny_llama()
    fp = M.fingerprint(model)
    assert M.fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    for name, _ in model.named_parameters():
        other = copy.deepcopy(model)
        other.get_parameter(name).view(-1)[-1] += 1
        assert M.fingerprint(other) != fp, name


@needs_transformers
def test_bfloat16_load_casts_on_the_fly(tmp_path):
    """Loading with dtype=bfloat16 gives bf16 weights whose logits stay close to fp32's."""
    ref = hf_tiny("llama_gqa")
    ref.save_pretrained(tmp_path)
    ours = M.load_model(str(tmp_path), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (ours(idx).float() - ref(idx).logits).abs().max() < 0.1


def test_safetensors_writer_roundtrip_and_reference_reader(tmp_path):
    """Our writer's file is read back bit-exactly by our reader and by the safetensors package."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half(),
               "d": torch.arange(6, dtype=torch.int64).view(2, 3)}
    path = str(tmp_path / "x.safetensors")
    M.save_safetensors(tensors, path)
    ours = dict(M.iter_safetensors(path))
    theirs = safetensors_torch.load_file(path)
    for k, t in tensors.items():
        assert torch.equal(ours[k], t) and torch.equal(theirs[k], t) and ours[k].dtype == t.dtype
    # read in chunks of 12 bytes (not a multiple of any row) and cast to float32 on the way: the same values
    chunked = dict(M.iter_safetensors(path, torch.float32, chunk_bytes=12))
    assert all(torch.equal(chunked[k], t.to(chunked[k].dtype)) for k, t in tensors.items())
    assert chunked["b"].dtype == torch.float32 and chunked["d"].dtype == torch.int64
    with open(path, "rb") as f:  # the data section starts 8-byte aligned, as the safetensors package writes it
        assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


def test_default_dtype_is_the_checkpoints_own_on_a_gpu_and_float32_on_the_cpu(tmp_path):
    """config.json's torch_dtype (transformers >= 5: dtype) on a GPU if we run it, else float32; always float32 on
    the CPU. An exported model's config.json names the dtype its weights are written in."""
    base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4)
    for extra, on_gpu in ((dict(torch_dtype="bfloat16"), "bfloat16"), (dict(dtype="float16"), "float16"),
                          (dict(torch_dtype="float64"), "float32"), ({}, "float32")):
        cfg = M.config_from_dict(dict(base, **extra))
        assert (M.default_dtype(cfg, "cuda"), M.default_dtype(cfg, "cuda:1"), M.default_dtype(cfg, "cpu")) == \
            (on_gpu, on_gpu, "float32"), extra
    M.save_model(tiny_llama(torch_dtype="float32").to(torch.bfloat16), str(tmp_path / "exp"))
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_safetensors_reads_a_tensor_stored_past_4_gib(tmp_path):
    """Data offsets past 2^32 (a 7B release's shards are ~5-10 GB): a tensor stored 4 GiB + 8 B into the data
    reads back exactly. The filler before it is a hole in a sparse file, so the test writes a few bytes."""
    tail = torch.arange(-3.0, 3.0).to(torch.bfloat16)
    gap = 2 ** 32 + 8  # bytes of a uint8 filler tensor stored before `tail`
    header = {"tail": {"dtype": "BF16", "shape": [6], "data_offsets": [gap, gap + 12]},
              "filler": {"dtype": "U8", "shape": [gap], "data_offsets": [0, gap]}}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.seek(8 + len(blob) + gap)
        f.write(tail.view(torch.uint8).numpy().tobytes())
    name, t = next(M.iter_safetensors(str(path)))  # header order puts `tail` first: the filler is never read
    assert name == "tail" and torch.equal(t, tail)


@needs_transformers
def test_exported_model_reloads_in_transformers(tmp_path):
    """save_model writes a folder that transformers and our loader both read with identical logits."""
    ref = hf_tiny("opt_post")
    ref.save_pretrained(tmp_path / "src")
    ours = M.load_model(str(tmp_path / "src"))
    M.save_model(ours, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    again = M.load_model(str(tmp_path / "out"))
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, ref(idx).logits)
        assert torch.equal(again(idx), ours(idx))


# -----------------------------------------------------------------------------
# model.py: bad input gets a clear error


def saved_llama(tmp_path):
    ref = hf_tiny("llama_mha")
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("name", sorted(REAL_TOKENIZERS))
def test_published_configs_are_read_with_their_own_values(name):
    """configs/*.json (the releases' config.json): every field the model uses is read as the file gives it, rope_theta
    at the top level (Qwen2.5, Qwen3, LLaMA-3.1) included, never a default."""
    raw = published_config(name)
    cfg = M.config_from_dict(raw)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
              "max_position_embeddings", "tie_word_embeddings", "word_embed_proj_dim", "do_layer_norm_before")
    read = [f for f in fields if raw.get(f) is not None and hasattr(cfg, f)]
    assert all(getattr(cfg, f) == raw[f] for f in read), {f: (getattr(cfg, f), raw[f]) for f in read}
    if name in ("llama-3.1-8b", "qwen2.5-7b", "qwen3-8b"):
        assert cfg.rope_theta == raw["rope_theta"] >= 500_000


@needs_transformers
def test_a_llama_1_config_is_multi_head_attention_and_an_eos_list_gives_its_first_id():
    """LLaMA-1's config.json has no num_key_value_heads: transformers reads multi-head attention, and so do we. A
    list of end ids (LLaMA-3.1 Instruct's eos_token_id) is read as its first."""
    raw = {k: v for k, v in published_config("llama-2-7b").items() if k != "num_key_value_heads"}
    cfg = M.config_from_dict(raw)
    assert cfg.num_key_value_heads == transformers.LlamaConfig(**raw).num_key_value_heads == 32
    assert cfg.head_dim == 128
    eos_list = dict(published_config("llama-3.1-8b"), eos_token_id=[128001, 128008, 128009])
    assert M.config_from_dict(eos_list).eos_token_id == 128001


def test_error_missing_folder_and_config(tmp_path):
    """A missing folder or a folder without config.json is named, with the fix."""
    with pytest.raises(UserError, match="does not exist"):
        M.load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        M.load_model(str(tmp_path))


def test_error_unsupported_model_type_lists_supported(tmp_path):
    """An unknown model_type names the supported ones."""
    write_config(tmp_path, model_type="gpt_neox")
    with pytest.raises(UserError, match="'gpt_neox' is not supported.*llama.*opt"):
        M.load_model(str(tmp_path))


def test_error_unreadable_config(tmp_path):
    """A config.json that is not JSON is named."""
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not a valid JSON"):
        M.load_model(str(tmp_path))


@needs_transformers
def test_error_missing_extra_and_misshaped_tensors(tmp_path):
    """Missing, unexpected and mis-shaped tensors are each named by key; old releases' stale buffers are skipped."""
    saved_llama(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = dict(M.iter_safetensors(path))
    good = dict(tensors)
    del tensors["model.norm.weight"]
    M.save_safetensors(tensors, path)
    with pytest.raises(UserError, match="'model.norm.weight' is missing"):
        M.load_model(str(tmp_path))
    M.save_safetensors(dict(good, **{"model.extra.weight": torch.zeros(2)}), path)
    with pytest.raises(UserError, match="'model.extra.weight' is not part of"):
        M.load_model(str(tmp_path))
    # buffers older releases saved, which hold nothing the model needs: LLaMA's rotary frequencies, fairseq's
    # position placeholder in OPT files
    M.save_safetensors(dict(good, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4),
                                     "model.decoder.embed_positions._float_tensor": torch.zeros(1)}), path)
    M.load_model(str(tmp_path))
    M.save_safetensors(dict(good, **{"model.norm.weight": torch.zeros(3)}), path)
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \(3,\)"):
        M.load_model(str(tmp_path))


@needs_transformers
def test_error_truncated_corrupt_and_unsupported_dtype_safetensors(tmp_path):
    """A truncated file, a corrupt header and an unknown dtype are reported, naming the file."""
    saved_llama(tmp_path)
    path = tmp_path / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="truncated"):
        M.load_model(str(tmp_path))
    n = int.from_bytes(blob[:8], "little")
    path.write_bytes(blob[:8] + b"#" * n + blob[8 + n:])
    with pytest.raises(UserError, match="header is corrupt"):
        M.load_model(str(tmp_path))
    header = json.loads(blob[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = "F8_E4M3"
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(blob[:8] + new + blob[8 + n:])
    with pytest.raises(UserError, match="dtype 'F8_E4M3'.*not supported"):
        M.load_model(str(tmp_path))


@needs_transformers
def test_error_no_weights_and_no_tokenizer(tmp_path):
    """A folder with only config.json: no weights, no tokenizer, each named."""
    hf_tiny("llama_mha").config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no weights"):
        M.load_model(str(tmp_path))
    with pytest.raises(data.DataError, match="has no tokenizer"):
        data.load_tokenizer(str(tmp_path), 1)


# -----------------------------------------------------------------------------
# offloading


def test_fixture_initialisation_is_transformers_initializer_range():
    """init_weights: every Linear and Embedding weight N(0, 0.02), every bias zero (OPT has them), norms left alone."""
    import default_model
    torch.manual_seed(0)
    model = M.build_model(M.config_from_dict(SMALL["opt"]))
    default_model.init_weights(model)
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:
            assert abs(p.std().item() / 0.02 - 1) < 0.1 and abs(p.mean().item()) < 2e-3, name


# -----------------------------------------------------------------------------
# reliability: nothing lost, nothing silent (each case of the reliability section of the README)


@needs_transformers
def test_sliding_windows_are_read_from_config_as_transformers_reads_them():
    """Each block's attention window, from config.json's sliding_window, use_sliding_window, max_window_layers and
    layer_types (or their defaults), is the one transformers' config object gives that block."""
    n, sliding = 4, "sliding_attention"
    for raw in (dict(model_type="mistral", sliding_window=8), dict(model_type="mistral", sliding_window=None),
                dict(model_type="mistral"), dict(model_type="qwen2", sliding_window=8),
                dict(model_type="qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=2),
                dict(model_type="qwen3", sliding_window=8, use_sliding_window=True, max_window_layers=1),
                dict(model_type="qwen2", use_sliding_window=True),
                dict(model_type="qwen2", sliding_window=8, use_sliding_window=True,
                     layer_types=[sliding, "full_attention", sliding, "full_attention"]),
                dict(model_type="llama", sliding_window=8)):
        ref = transformers.AutoConfig.for_model(**raw, num_hidden_layers=n)
        # transformers' Mistral slides every block and lists no layer_types; LLaMA has neither
        types = getattr(ref, "layer_types", None) or [sliding if raw["model_type"] == "mistral" else "full"] * n
        expected = [getattr(ref, "sliding_window", None) if t == sliding else None for t in types]
        assert M.attention_windows(raw, n) == expected, raw
    with pytest.raises(UserError, match="sliding_window=0 must be a positive integer"):
        M.attention_windows(dict(model_type="mistral", sliding_window=0), n)


@needs_transformers
def test_legacy_non_zip_pytorch_model_bin_loads(tmp_path):
    """A pytorch_model.bin in the pre-1.6 (non-zip) format, which cannot be memory-mapped, still loads, with its
    tensors named as the facebook/opt-* releases name them (decoder.*, without transformers' "model.")."""
    ref = hf_tiny("opt_pre")
    ref.config.save_pretrained(tmp_path)
    release = {name.removeprefix("model."): t for name, t in ref.state_dict().items()}
    torch.save(release, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ours = M.load_model(str(tmp_path))
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert (ref(idx).logits - ours(idx)).abs().max() <= 1e-4
    sd = ref.state_dict()
    sd["model.decoder.layers.0.fc1.weight"][3, 4] = float("inf")  # a .bin is checked for NaN/Inf too
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: tensor 'model.decoder.layers.0.fc1.weight' holds NaN"):
        M.load_model(str(tmp_path))
