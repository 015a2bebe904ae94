"""Builders of the tests' fixtures, shared by the test_*.py files and bench/test_bench.py: tiny transformers models
of every family, tokenizers trained by `tokenizers`, small trained checkpoints, real-shaped random ones."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import data
import epts
import model as M
import parallel
import prune

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.join(HERE, "bench"))
from random_checkpoint import save_random  # noqa: E402
SHARED = os.path.join(HERE, "..", "shared", "data")

LLAMA2_TOKENIZER = os.path.join(SHARED, "llama2-tokenizer", "tokenizer.model")
TEXT = ("Hello world!  The 3 quick brown foxes — naïve café, 東京 🚀 —\n\tjumped over 1234567 lazy dogs...\n\n"
        "   Indented line with    runs of spaces; it's what we'd've done. ")


try:  # the reference the hand-written models must match; only the tests that use it skip without it
    import transformers
except ImportError:
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed (make setup)")


# tiny configurations of every family the loader covers: (transformers class prefix, its config overrides)
TINY_LLAMA_FAMILY = {
    "llama_mha": ("Llama", {}),
    "llama_gqa": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True,  # LLaMA-3.2 style
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("Llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0)),
    "smollm": ("Llama", dict(num_key_value_heads=1, head_dim=32, hidden_size=96, num_attention_heads=3,
                             tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral": ("Mistral", dict(num_key_value_heads=2, head_dim=24, sliding_window=None)),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
    "mistral_window": ("Mistral", dict(num_key_value_heads=2, sliding_window=8)),  # as Mistral-7B-v0.1's 4096
    "qwen2_window": ("Qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=1)),  # the first block full, the second sliding
}


def hf_tiny(kind, **over):
    """A tiny random transformers model of one of the architectures the loader must cover."""
    torch.manual_seed(0)
    if kind in TINY_LLAMA_FAMILY:
        family, extra = TINY_LLAMA_FAMILY[kind]
        cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
        cfg.update(extra)
        cfg.update(over)
        config = getattr(transformers, f"{family}Config")(**cfg)
        ref = getattr(transformers, f"{family}ForCausalLM")(config)
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


def train_bpe(tmp_path, vocab_size=400):
    """A GPT-2-style byte-level BPE trained by `tokenizers`, saved as vocab.json/merges.txt and tokenizer.json."""
    tok = train_family_bpe(tmp_path, vocab_size=vocab_size)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


# the pre-tokenizer regexes of real tokenizer.json files (LLaMA-3 splits digits in threes, Qwen2 one by one)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def train_family_bpe(out_dir, pattern=None, vocab_size=400, texts=None, special=("<s>", "<pad>", "</s>", "<unk>"),
                     all_bytes=True):
    """A byte-level BPE trained by `tokenizers`. With `pattern`: a LLaMA-3/Qwen-style tokenizer.json (Split on
    the regex, then ByteLevel without its own regex); without: GPT-2/OPT-style vocab.json + merges.txt.
    all_bytes=False: only the bytes of the training text get a token, as in many real vocabularies."""
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(pattern), behavior="isolated"),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                             initial_alphabet=pre.ByteLevel.alphabet() if all_bytes else [])
    if texts is None:
        import pydoc_data.topics
        texts = list(pydoc_data.topics.topics.values())[:200] + [TEXT]
    tok.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    if pattern is None:
        tok.model.save(str(out_dir))
    else:
        tok.save(os.path.join(str(out_dir), "tokenizer.json"))
    return tok


def tiny_llama(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(over)
    return M.build_model(M.config_from_dict(cfg)).eval().requires_grad_(False)


def calib_ids(n=4, T=16, vocab=64, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


# small trained checkpoints: pruning hurts them visibly, so the methods' order shows
SMALL = {
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=168, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2),
    "opt": dict(model_type="opt", vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=4,
                num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=64,
                do_layer_norm_before=True, bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A small trained LLaMA and OPT (Python's documentation, a 512-piece SentencePiece vocabulary).

    The capacity sits in the blocks and each block parameter sees ~8 training tokens, so pruning hurts visibly
    (50 % magnitude: ~+30 % perplexity) while the fixture trains in about half a minute per model.
    """
    import default_model
    root = tmp_path_factory.mktemp("small")
    docs = default_model.corpus()
    train, test = docs[: -len(docs) // 10], docs[-len(docs) // 10:]
    (root / "train.txt").write_text("\n\n".join(train))
    (root / "test.txt").write_text("\n\n".join(test)[:200_000])
    default_model.train_sentencepiece(str(root / "train.txt"), str(root / "tokenizer"), 512)
    tok = data.SentencePieceTokenizer(str(root / "tokenizer.model"), 1)
    ids = torch.tensor(tok.encode("\n\n".join(train)), dtype=torch.long)
    for kind, cfg in SMALL.items():
        default_model.train_checkpoint(cfg, ids, str(root / kind), str(root),
                                       dict(steps=800, batch_size=16, seqlen=128, lr=1e-2, seed=0))
    return root


def run_command(*args, timeout=120):
    # THP_MEM_ALLOC_ENABLE: PyTorch backs large CPU tensors with huge pages, which spares the page faults that
    # dominate multi-GB temporaries on the CPU (README, "Scale"); results are identical
    return subprocess.run([sys.executable, os.path.join(HERE, "epts.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env=dict(os.environ, THP_MEM_ALLOC_ENABLE="1"))


def torchrun(nproc, *args, timeout=300):
    """epts.py under torchrun: `nproc` processes on this machine (gloo on the CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           os.path.join(HERE, "epts.py"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=HERE)


# configs/NAME.json (the published config.json values) -> the kind of tokenizer its family ships
REAL_TOKENIZERS = {"llama-2-7b": "sentencepiece", "llama-3.1-8b": LLAMA3_PATTERN, "llama-3.2-1b": LLAMA3_PATTERN,
                   "mistral-7b": "sentencepiece", "qwen2.5-7b": QWEN2_PATTERN, "qwen3-8b": QWEN2_PATTERN,
                   "opt-1.3b": "gpt2"}


@pytest.fixture(scope="session")
def real_text(tmp_path_factory):
    """Calibration and evaluation text (Python's reference topics) and a SentencePiece model trained on it."""
    import default_model
    import pydoc_data.topics
    root = tmp_path_factory.mktemp("real")
    text = "\n\n".join(pydoc_data.topics.topics.values())
    (root / "corpus.txt").write_text(text)
    (root / "calib.txt").write_text(text[:20_000])
    (root / "eval.txt").write_text(text[-600:])  # a few windows of 32: the head of a 150k vocabulary is costly
    (root / "sp").mkdir()
    default_model.train_sentencepiece(str(root / "corpus.txt"), str(root / "sp" / "tokenizer"), 512)
    return root


def published_config(name):
    """configs/NAME.json: a real release's config.json, as a dict."""
    with open(os.path.join(HERE, "configs", f"{name}.json")) as f:
        return json.load(f)


def write_real_shape(real_text, name, out_dir, n_blocks=1):
    """configs/NAME.json with `n_blocks` random bf16 blocks, and a tokenizer of the family's kind."""
    raw = published_config(name)
    save_random(raw, out_dir, n_blocks)
    kind = REAL_TOKENIZERS[name]
    if kind == "sentencepiece":
        shutil.copy(real_text / "sp" / "tokenizer.model", out_dir)
    else:
        train_family_bpe(out_dir, None if kind == "gpt2" else kind, texts=[(real_text / "corpus.txt").read_text()])
    if kind not in ("sentencepiece", "gpt2"):  # what the releases' tokenizer.json add: Qwen's NFC, LLaMA-3's BOS
        with open(os.path.join(out_dir, "tokenizer.json")) as f:
            tj = json.load(f)
        bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
        if name.startswith("qwen"):
            tj["normalizer"] = {"type": "NFC"}
        else:
            tj["post_processor"] = {"type": "TemplateProcessing",
                                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                                    "special_tokens": {"<|begin_of_text|>": {"ids": [raw["bos_token_id"]]}}}
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            json.dump(tj, f)
    return raw


@pytest.fixture
def tiny(tmp_path):
    """main()'s arguments for a tiny random LLaMA with a BPE tokenizer, calibration and evaluation text."""
    import pydoc_data.topics
    ckpt = tmp_path / "ckpt"
    hf_tiny("llama_mha", vocab_size=512).save_pretrained(ckpt)
    train_bpe(ckpt)
    text = "\n\n".join(list(pydoc_data.topics.topics.values())[:40])
    (tmp_path / "calib.txt").write_text(text[:20_000])
    (tmp_path / "eval.txt").write_text(text[-3_000:])
    return dict(ckpt=str(ckpt), calib=str(tmp_path / "calib.txt"), evals=[str(tmp_path / "eval.txt")], seqlen=16,
                nsamples=2, epochs=1, out=str(tmp_path / "run"))


def main(**kw):
    """cli.main with one flat set of arguments, split into its Request and its EPTSConfig."""
    config = {f.name for f in dataclasses.fields(epts.EPTSConfig)}
    return cli.main(cli.Request(**{k: v for k, v in kw.items() if k not in config}),
                     epts.EPTSConfig(**{k: v for k, v in kw.items() if k in config}))


def write_config(path, **cfg):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


class CharTokenizer:
    bos_id, eos_id = 0, 0

    def encode(self, text, bos=True):
        return [0] * bos + [ord(c) % 256 + 1 for c in text]


def trained_block(groups=epts.EPTSConfig.edges, epochs=2, procs=parallel.SOLO, batch_size=8):
    """Block 0 of a tiny LLaMA with trained adapters, its dense inputs X and target Y (computed `batch_size`
    windows at a time), and the per-epoch losses; trained by `procs`, all of them or one."""
    model, calib = tiny_llama(), calib_ids(8)
    block, X = model.blocks[0], model.embed(calib)
    stats = prune.new_stats(block, False, "cpu")
    Y = procs.run_block(block, X, "cpu", batch_size, stats)
    layers = epts.elastic_layers(block, {n: s.act_norm for n, s in stats.items()}, len(groups) - 1, 4,
                                 torch.Generator().manual_seed(0))
    losses = epts.train_block(block, layers, (X, Y), epts.EPTSConfig(tuple(groups), epochs, lr=1e-2, batch_size=4),
                              torch.Generator().manual_seed(0), procs)
    return block, layers, X, Y, losses


def interrupt_after_first_block(monkeypatch, blocks=1):
    """Make epts.train_block raise KeyboardInterrupt once `blocks` blocks are trained (a run stopped after block
    blocks - 1); returns the real one."""
    real, calls = epts.train_block, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == blocks + 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(epts, "train_block", interrupted)
    return real


# one item per task in the public datasets' field names, and the (context, continuation) pairs lm-eval's task
# definitions make of it, written out by hand
TASK_EXAMPLES = {
    "boolq": ({"passage": "Cats sleep a lot.", "question": "do cats sleep", "label": 1},
              [("Cats sleep a lot.\nQuestion: do cats sleep?\nAnswer:", " no"),
               ("Cats sleep a lot.\nQuestion: do cats sleep?\nAnswer:", " yes")], 1),
    "rte": ({"sentence1": "A man walks.", "sentence2": "A person moves.", "label": 0},
            [("A man walks.\nQuestion: A person moves. True or False?\nAnswer:", " True"),
             ("A man walks.\nQuestion: A person moves. True or False?\nAnswer:", " False")], 0),
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                   "endings": ["bakes [title] it.", "runs  away."], "label": "0"},
                  [("Baking: She mixes flour. Then she", " bakes. it."), ("Baking: She mixes flour. Then she", " runs away.")],
                  0),
    "winogrande": ({"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
                    "option2": "the table", "answer": "2"},
                   [("The cup fell off the table because the cup", " was slippery."),
                    ("The cup fell off the table because the table", " was slippery.")], 1),
    "arc_easy": ({"question": "What is ice?", "choices": {"text": ["frozen water", "hot air"], "label": ["A", "B"]},
                  "answerKey": "A"},
                 [("Question: What is ice?\nAnswer:", " frozen water"), ("Question: What is ice?\nAnswer:", " hot air")],
                 0),
    "arc_challenge": ({"question": "Pick 2.", "choices": {"text": ["one", "two"], "label": ["1", "2"]},
                       "answerKey": "2"},
                      [("Question: Pick 2.\nAnswer:", " one"), ("Question: Pick 2.\nAnswer:", " two")], 1),
    "openbookqa": ({"question_stem": "The sun is", "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]},
                    "answerKey": "A"},
                   [("The sun is", " a star"), ("The sun is", " a moon")], 0),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
             [("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " eat the lid")], 0),
}
