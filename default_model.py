"""
The built-in default: a small LLaMA-architecture model that trains itself, the first time, on text every
Python installation carries (the reference topics of `pydoc_data` and the standard library's docstrings),
with a SentencePiece tokenizer trained on the same text. Both are cached in Hugging Face format under
$XDG_CACHE_HOME/epts (~/.cache/epts), so the normal loader reads them and later runs start in seconds.
"""

import ast
import fcntl
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import model as M

VERSION = "default-v1"
CONFIG = dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# what `python epts.py` uses on the built-in model unless flags say otherwise
DEFAULTS = dict(seqlen=256, nsamples=32, epochs=2)
# PyTorch's default init: in this 200-step budget N(0, 0.02) reached perplexity 241 instead of 143
TRAIN = dict(steps=200, batch_size=16, seqlen=256, lr=3e-3, seed=0, init_std=None)  # see train_checkpoint


def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "epts", VERSION)


def corpus():
    """Python's own documentation as a list of documents, in a fixed order."""
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3"}
    for folder, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        docs.append(doc)
    return docs


def train_sentencepiece(text_file, prefix, vocab_size):
    """A LLaMA-style SentencePiece BPE model (byte fallback, no normalisation) trained on `text_file`."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=text_file, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2, max_sentence_length=1 << 14,
        input_sentence_size=400_000, shuffle_input_sentence=True)
    return prefix + ".model"


def train_lm(model, ids, train, log=None):
    """Next-token training on random windows of `ids` (1-D): AdamW without weight decay, warm-up, cosine.
    train: {steps, batch_size, seqlen, lr, seed}."""
    steps, batch_size, seqlen, lr = train["steps"], train["batch_size"], train["seqlen"], train["lr"]
    gen = torch.Generator().manual_seed(train["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps)))
    model.train()
    t0 = time.time()
    for step in range(steps):
        start = torch.randint(0, len(ids) - seqlen - 1, (batch_size,), generator=gen)
        x = torch.stack([ids[s:s + seqlen + 1] for s in start.tolist()])  # (B, T+1)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}/{steps}, loss {loss.item():.3f}, {time.time() - t0:.0f}s")
    return model.eval()


def init_weights(model, std=0.02):
    """The usual LLM initialisation (transformers' initializer_range): N(0, 0.02) weights, zero biases.

    PyTorch's N(0, 1) embeddings would make a tied output layer (OPT) start with a loss in the hundreds.
    """
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=std)
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def train_checkpoint(config, ids, out_dir, tokenizer_dir, train, log=None):
    """Train a fresh model of `config` (a config.json dict) on `ids` and write it in Hugging Face format.

    train: {steps, batch_size, seqlen, lr, seed} and optionally init_std (default 0.02; None keeps PyTorch's
    default initialisation).
    """
    torch.manual_seed(train["seed"])
    model = M.build_model(M.config_from_dict(config))
    if train.get("init_std", 0.02) is not None:
        init_weights(model, train.get("init_std", 0.02))
    train_lm(model, ids, train, log)
    M.save_model(model, out_dir, tokenizer_dir=tokenizer_dir)
    return out_dir


def build_default(out_dir):
    """Train the tokenizer and the model and write them, with calibration/evaluation text, to out_dir."""
    log = lambda msg: print(f"built-in model: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"first run: training a small LLaMA on Python's documentation (a few minutes, cached in {out_dir})")
    docs = corpus()
    n_eval = len(docs) // 10
    train_docs, eval_docs = docs[:-n_eval], docs[-n_eval:]  # evaluation text is never trained on
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_dir), prefix=".build-") as work, \
            M.atomic_folder(out_dir) as model_dir:  # nothing half-built is ever left, even on Ctrl-C
        for name, part in (("calib.txt", train_docs), ("eval.txt", eval_docs)):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write("\n\n".join(part))
        train_sentencepiece(os.path.join(work, "calib.txt"), os.path.join(work, "tokenizer"), CONFIG["vocab_size"])
        tok = data.SentencePieceTokenizer(os.path.join(work, "tokenizer.model"), CONFIG["bos_token_id"])
        ids = torch.tensor([i for d in train_docs for i in tok.encode(d)], dtype=torch.long)
        log(f"tokenizer trained, {len(ids):,} training tokens")
        train_checkpoint(CONFIG, ids, model_dir, work, TRAIN, log)
        for name in ("calib.txt", "eval.txt"):
            shutil.move(os.path.join(work, name), os.path.join(model_dir, name))


def ensure_default():
    """The built-in checkpoint folder (trained on first use) and the settings to run it with.

    A lock serialises first uses: a second process waits for the first build and then reuses it.
    """
    out_dir = cache_dir()
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
            if os.path.isdir(out_dir) and os.listdir(out_dir):
                raise M.UserError(f"the built-in model's cache folder {out_dir!r} holds files but no model; "
                                  "delete it to build the model there again.")
            build_default(out_dir)
    return out_dir, dict(DEFAULTS, calib=os.path.join(out_dir, "calib.txt"), eval=os.path.join(out_dir, "eval.txt"))
