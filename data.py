"""
Calibration and evaluation text from local files, by the conventions of Wanda and SparseGPT.

Formats: WikiText-2 (`wiki.{train,valid,test}.raw`, `wiki.*.tokens`, a folder holding them, or any
file with "wiki" in its path), C4 JSON-lines shards (`.json`, `.json.gz`, `.jsonl`, the `text` field),
and plain `.txt`.
"""

import gzip
import json
import os
import random

import torch

from model import UserError

TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def resolve(path, split):
    """A WikiText-2 folder becomes its `split` file; a file stays itself."""
    if not os.path.exists(path):
        raise UserError(f"data file {path!r} does not exist; pass a local WikiText-2/C4/.txt file "
                        "(nothing is downloaded).")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for name in names:
            if split in name and name.endswith(TEXT_SUFFIXES):
                return os.path.join(path, name)
        raise UserError(f"folder {path!r} holds no {split} split (looked for a name containing {split!r} ending in "
                        f"{', '.join(TEXT_SUFFIXES)}); it has: {', '.join(names[:10]) or 'nothing'}.")
    return path


def file_kind(path):
    """'c4' (JSON lines), 'wikitext', or 'text'."""
    name = os.path.basename(path).lower()
    if name.endswith(JSON_SUFFIXES):
        return "c4"
    if name.endswith((".raw", ".tokens")) or "wiki" in path.lower():
        return "wikitext"
    if name.endswith(".txt"):
        return "text"
    raise UserError(f"{path!r}: unknown data format; use WikiText-2 files (.raw/.tokens/.txt), C4 JSON lines "
                    "(.json, .json.gz, .jsonl) or plain .txt.")


def read_documents(path):
    """The documents of a file: one per JSON line (C4), or the whole text as one document."""
    kind = file_kind(path)
    try:
        if kind == "c4":
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                docs = [(n, json.loads(line)["text"]) for n, line in enumerate(f, 1) if line.strip()]
            bad = next((n for n, d in docs if not isinstance(d, str)), None)
            if bad is not None:
                raise UserError(f"{path!r} line {bad}: the \"text\" field is not a string; C4 JSON lines each hold "
                                "a document's text as a string.")
            docs = [d for _, d in docs]
        else:
            with open(path, encoding="utf-8") as f:
                docs = [f.read()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path!r} could not be read as {kind} data ({type(e).__name__}: {e}).") from None
    if not any(d.strip() for d in docs):
        raise UserError(f"{path!r} holds no text; pass a non-empty file.")
    return kind, docs


def wikitext_join(text):
    """The Wanda/SparseGPT evaluation string: the dataset's rows joined with "\\n\\n".

    Hugging Face's WikiText rows are the file's lines, blank ones as "" and the others keeping their newline.
    """
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    return "\n\n".join(rows)


def eval_tokens(path, tok, seqlen):
    """The token stream (1-D LongTensor) that perplexity is measured on, by the file's convention."""
    path = resolve(path, "test")
    kind, docs = read_documents(path)
    if kind == "c4":
        # C4 validation: the first 1100 documents joined with " ", the first 256 windows
        ids = tok.encode(" ".join(docs[:1100]))[: 256 * seqlen]
    elif kind == "wikitext":
        ids = tok.encode(wikitext_join(docs[0]))
    else:
        ids = tok.encode(docs[0])
    if len(ids) < seqlen + 1:
        raise UserError(f"{path!r} gives {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
                        "use a longer evaluation file or a smaller --seqlen.")
    return torch.tensor(ids, dtype=torch.long)


def calibration(path, tok, nsamples, seqlen, seed, warn=print):
    """`nsamples` windows (nsamples, seqlen) of token ids, reproducible for a seed.

    C4-style data: each window from a random document longer than seqlen, at a random offset (the loop of
    SparseGPT and Wanda). One long text: random offsets into it. The RNG is local, never the global one.
    """
    path = resolve(path, "train" if os.path.isdir(path) and _has(path, "train") else "valid")
    kind, docs = read_documents(path)
    rng = random.Random(seed)
    if kind != "c4":
        docs = [wikitext_join(docs[0]) if kind == "wikitext" else docs[0]]
    cache, rows, tries = {}, [], 0
    while len(rows) < nsamples:
        i = rng.randint(0, len(docs) - 1)
        if i not in cache:
            cache[i] = tok.encode(docs[i])
        ids = cache[i]
        tries += 1
        if len(ids) <= seqlen:
            if tries > 100 * nsamples + 10 * len(docs):
                longest = max(len(tok.encode(d)) for d in docs)
                raise UserError(f"{path!r}: no document is longer than seqlen={seqlen} tokens (the longest has "
                                f"{longest}); use longer documents or a smaller --seqlen.")
            continue
        j = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[j:j + seqlen])
    if kind != "c4" and nsamples > len(cache[0]) // seqlen:
        warn(f"warning: {path!r} holds {len(cache[0])} tokens, {len(cache[0]) // seqlen} windows of {seqlen} "
             f"without overlap; the {nsamples} calibration windows overlap and repeat text. Use a longer text or "
             "fewer --nsamples.")
    return torch.tensor(rows, dtype=torch.long)


def _has(folder, split):
    return any(split in name for name in os.listdir(folder))
