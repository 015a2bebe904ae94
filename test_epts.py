"""Tests: parity with transformers, pruning definitions, EPTS properties, the command line. CPU, minutes."""

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import epts
import model as M
import prune
from eval import perplexity
from model import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
LLAMA2_TOKENIZER = os.path.join(SHARED, "llama2-tokenizer", "tokenizer.model")
TEXT = ("Hello world!  The 3 quick brown foxes — naïve café, 東京 🚀 —\n\tjumped over 1234567 lazy dogs...\n\n"
        "   Indented line with    runs of spaces; it's what we'd've done. ")

transformers = pytest.importorskip("transformers")


def hf_tiny(kind, **over):
    """A tiny random transformers model of one of the four architectures the loader must cover."""
    torch.manual_seed(0)
    if kind.startswith("llama"):
        cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
        if kind == "llama_gqa":
            cfg.update(num_key_value_heads=2, tie_word_embeddings=True,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        cfg.update(over)
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    else:
        cfg = dict(vocab_size=101, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4)
        if kind == "opt_post":
            cfg.update(do_layer_norm_before=False, word_embed_proj_dim=32)
        cfg.update(over)
        ref = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg))
    with torch.no_grad():  # move off the init values so biases and norms matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref.eval()


def save_bin(ref, path):
    """Write a checkpoint as older releases ship it: config.json + pytorch_model.bin."""
    ref.config.save_pretrained(path)
    torch.save(ref.state_dict(), os.path.join(path, "pytorch_model.bin"))


# -----------------------------------------------------------------------------
# model.py: parity with transformers


@pytest.mark.parametrize("kind,fmt", [("llama_mha", "sharded"), ("llama_gqa", "safetensors"),
                                      ("opt_pre", "bin"), ("opt_post", "safetensors"), ("llama_gqa", "bin")])
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
        assert (ref(idx).logits - ours(idx)).abs().max() <= 1e-4
    prompt = idx[:1, :5]
    assert torch.equal(ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20),
                       M.generate(ours, prompt, 20))


def test_blocks_expose_prunable_linears_in_execution_order():
    """block.linears() lists the paper's prunable layers in the order the forward pass uses them."""
    llama = M.build_model(M.config_from_dict(dict(hf_tiny("llama_mha").config.to_dict())))
    opt = M.build_model(M.config_from_dict(dict(hf_tiny("opt_pre").config.to_dict())))
    assert list(llama.blocks[0].linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert list(opt.blocks[0].linears()) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.out_proj", "fc1", "fc2"]


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
# model.py: tokenizers


@pytest.mark.skipif(not os.path.isfile(LLAMA2_TOKENIZER), reason="../shared/data/llama2-tokenizer is absent")
def test_sentencepiece_tokenizer_matches_transformers():
    """The real LLaMA-2 tokenizer: transformers' ids (BOS once at the start) and an exact round trip.

    transformers >= 5 runs LLaMA's vocabulary through `tokenizers` without SentencePiece's split at whitespace,
    so on runs of spaces it may emit '▁▁' where the original SentencePiece tokenizer (Meta's reference, which
    we follow) emits '▁' + '▁The'. Single-spaced text must match exactly; runs must match SentencePiece.
    """
    import sentencepiece as spm
    ref = transformers.LlamaTokenizer.from_pretrained(os.path.dirname(LLAMA2_TOKENIZER), add_bos_token=True,
                                                      legacy=True)
    ours = M.SentencePieceTokenizer(LLAMA2_TOKENIZER, bos_id=1, eos_id=2)
    single = "\n".join(" ".join(w for w in line.split(" ") if w) for line in TEXT.split("\n"))
    assert ours.encode(single) == ref(single)["input_ids"]
    assert ours.encode(TEXT) == [1] + spm.SentencePieceProcessor(model_file=LLAMA2_TOKENIZER).encode(TEXT)
    assert ours.encode(TEXT)[0] == 1 and ours.encode(TEXT).count(1) == 1
    assert ours.decode(ours.encode(TEXT)) == TEXT


def train_bpe(tmp_path, vocab_size=400):
    """A byte-level BPE trained with `tokenizers` on real text, saved as vocab.json/merges.txt and tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    import pydoc_data.topics
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:200] + [TEXT], trainer)
    tok.model.save(str(tmp_path))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_bpe_tokenizer_matches_tokenizers_library(tmp_path):
    """vocab.json + merges.txt run through tiktoken: the same ids as the `tokenizers` BPE, exact round trip."""
    ref = train_bpe(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    ours = M.load_tokenizer(str(tmp_path), bos_id=2, eos_id=2)
    ids = ours.encode(TEXT)
    assert ids[0] == 2 and ids[1:] == ref.encode(TEXT).ids  # OPT prepends </s>
    assert ours.decode(ids) == TEXT


def test_tokenizer_json_bpe_matches(tmp_path):
    """A BPE tokenizer.json (the LLaMA-3 layout) gives the same ids as the library."""
    ref = train_bpe(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        os.remove(tmp_path / name)
    ours = M.load_tokenizer(str(tmp_path), bos_id=0, eos_id=2)
    assert ours.encode(TEXT, bos=False) == ref.encode(TEXT).ids
    assert ours.decode(ours.encode(TEXT)) == TEXT


# -----------------------------------------------------------------------------
# model.py: bad input gets a clear error


def write_config(path, **cfg):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def saved_llama(tmp_path):
    ref = hf_tiny("llama_mha")
    ref.save_pretrained(tmp_path)
    return ref


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


def test_error_missing_extra_and_misshaped_tensors(tmp_path):
    """Missing, unexpected and mis-shaped tensors are each named by key."""
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
    M.save_safetensors(dict(good, **{"model.norm.weight": torch.zeros(3)}), path)
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \(3,\)"):
        M.load_model(str(tmp_path))


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


def test_error_no_weights_and_no_tokenizer(tmp_path):
    """A folder with only config.json: no weights, no tokenizer, each named."""
    hf_tiny("llama_mha").config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no weights"):
        M.load_model(str(tmp_path))
    with pytest.raises(UserError, match="has no tokenizer"):
        M.load_tokenizer(str(tmp_path), 1, 2)
