"""
Text to token ids: the checkpoint's tokenizer, and calibration and evaluation text from local files by the
conventions of Wanda and SparseGPT.

Formats: WikiText-2 (`wiki.{train,valid,test}.raw`, `wiki.*.tokens`, a folder holding them, or any
file with "wiki" in its path), C4 JSON-lines shards (`.json`, `.json.gz`, `.jsonl`, the `text` field),
and plain `.txt`.
"""

import gzip
import json
import os
import random
import re
import sys
import unicodedata

import torch

TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


class DataError(ValueError):
    """A data or tokenizer file that cannot be used: the message names the file and the fix."""


def resolve(path, split):
    """A WikiText-2 folder becomes its `split` file; a file stays itself."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; pass a local WikiText-2/C4/.txt file "
                        "(nothing is downloaded).")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for name in names:
            if split in name and name.endswith(TEXT_SUFFIXES):
                return os.path.join(path, name)
        raise DataError(f"folder {path!r} holds no {split} split (looked for a name containing {split!r} ending in "
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
    raise DataError(f"{path!r}: unknown data format; use WikiText-2 files (.raw/.tokens/.txt), C4 JSON lines "
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
                raise DataError(f"{path!r} line {bad}: the \"text\" field is not a string; C4 JSON lines each hold "
                                "a document's text as a string.")
            docs = [d for _, d in docs]
        else:
            with open(path, encoding="utf-8") as f:
                docs = [f.read()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path!r} could not be read as {kind} data ({type(e).__name__}: {e}).") from None
    if not any(d.strip() for d in docs):
        raise DataError(f"{path!r} holds no text; pass a non-empty file.")
    return kind, docs


def wikitext_join(text, sep):
    """WikiText's rows joined as Wanda and SparseGPT join them: with "\\n\\n" to evaluate, with " " to calibrate.

    Hugging Face's WikiText rows are the file's lines, blank ones as "" and the others keeping their newline.
    """
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    return sep.join(rows)


def eval_tokens(path, tok, seqlen):
    """The token stream (1-D LongTensor) that perplexity is measured on, by the file's convention."""
    path = resolve(path, "test")
    kind, docs = read_documents(path)
    if kind == "c4":
        # C4 validation: the first 1100 documents joined with " ", the first 256 windows
        ids = tok.encode(" ".join(docs[:1100]))[: 256 * seqlen]
    elif kind == "wikitext":
        ids = tok.encode(wikitext_join(docs[0], "\n\n"))
    else:
        ids = tok.encode(docs[0])
    if len(ids) < seqlen + 1:
        raise DataError(f"{path!r} gives {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
                        "use a longer evaluation file or a smaller --seqlen.")
    return torch.tensor(ids, dtype=torch.long)


def calibration(path, tok, nsamples, seqlen, seed):
    """`nsamples` windows (nsamples, seqlen) of token ids, drawn as Wanda and SparseGPT draw them for a seed.

    C4-style data: each window from a random document longer than seqlen, at a random offset. One long text
    (WikiText's rows joined with " "): random offsets into it. The RNG is local, never the global one.
    """
    has_train = os.path.isdir(path) and any("train" in name for name in os.listdir(path))
    path = resolve(path, "train" if has_train else "valid")
    kind, docs = read_documents(path)
    rng = random.Random(seed)  # the draws of random.seed(seed) and random.randint, in the references' order
    if kind != "c4":
        ids = tok.encode(wikitext_join(docs[0], " ") if kind == "wikitext" else docs[0])
        if len(ids) <= seqlen:
            raise DataError(f"{path!r} gives {len(ids)} tokens, too few for a calibration window of seqlen={seqlen}; "
                            "use a longer text or a smaller --seqlen.")
        if nsamples > len(ids) // seqlen:
            print(f"warning: {path!r} holds {len(ids)} tokens, {len(ids) // seqlen} windows of {seqlen} without "
                  f"overlap; the {nsamples} calibration windows overlap and repeat text. Use a longer text or fewer "
                  "--nsamples.", file=sys.stderr)
        starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
        return torch.tensor([ids[j:j + seqlen] for j in starts], dtype=torch.long)
    cache, rows, sources, tries = {}, [], [], 0  # sources: the document of each window
    while len(rows) < nsamples:
        i = rng.randint(0, len(docs) - 1)
        if i not in cache:
            cache[i] = tok.encode(docs[i])
        ids = cache[i]
        tries += 1
        if len(ids) <= seqlen:
            if tries > 100 * nsamples + 10 * len(docs):
                longest = max(len(tok.encode(d)) for d in docs)
                raise DataError(f"{path!r}: no document is longer than seqlen={seqlen} tokens (the longest has "
                                f"{longest}); use longer documents or a smaller --seqlen.")
            continue
        j = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[j:j + seqlen])
        sources.append(i)
    if len(set(sources)) < nsamples:
        print(f"warning: the {nsamples} calibration windows come from only {len(set(sources))} documents of "
              f"{path!r} (a document drawn twice gives two windows that may overlap); the file holds too few "
              f"documents longer than seqlen={seqlen}: use a larger shard or fewer --nsamples.", file=sys.stderr)
    return torch.tensor(rows, dtype=torch.long)


# -----------------------------------------------------------------------------
# tokenizers: encode(text) -> ids (with a BOS where the model's own tokenizer puts one), decode(ids) -> text

# the pre-tokenisation regex of GPT-2's byte-level BPE (OPT uses it too)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after a Digits step (SmolLM) cut the text at every digit (or run of digits): a digit takes no space
# before it, and spaces before a digit end their piece as at the end of the text
DIGITS_PATTERNS = {individual: GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}" if individual else r"\p{N}+")
                   .replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])") for individual in (True, False)}


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters used in vocab.json/merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SentencePieceTokenizer:
    """LLaMA-1/2 `tokenizer.model`; BOS once at the start, as the original tokenizer adds it."""

    def __init__(self, path, bos_id):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise DataError(f"{path} is not a valid SentencePiece model ({e}); re-download it.") from None
        self.bos_id = bos_id
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text, bos=True):
        return [self.bos_id] * (bos and self.bos_id is not None) + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i != self.bos_id])


class BPETokenizer:
    """Byte-level BPE (GPT-2/OPT vocab.json + merges.txt, LLaMA-3/Qwen tokenizer.json) run by tiktoken.

    tiktoken merges the pair whose concatenation has the lowest rank, so ranks must follow the merges' order;
    vocab ids need not (OPT's follow fairseq's frequency order). We rank by merge order and map ranks to ids.
    A vocabulary may lack some of the 256 bytes (tokenizers leaves out bytes its training text never held):
    text holding them is encoded as tokenizers does, the byte dropped, or replaced by the unk token if any.
    """

    def __init__(self, vocab, merges, pattern, bos_id, name="bpe", unk=(None, False)):
        """unk: a tokenizer.json's (unk_token, fuse_unk); without an unk token, bytes without a token are dropped."""
        import tiktoken
        byte_of = {c: b for b, c in bytes_to_unicode().items()}

        def to_bytes(token):
            try:
                return bytes(byte_of[c] for c in token)
            except KeyError:  # a character outside the byte alphabet: an added special token
                return None

        ranks = {bytes([b]): b for b in range(256)}  # tiktoken needs a rank for every single byte
        for a, b in merges:
            pair = (to_bytes(a), to_bytes(b))
            if None in pair:
                raise DataError(f"{name}: merge {a!r} + {b!r} is not written in the byte-level alphabet; this is not "
                                "a byte-level BPE tokenizer, or the file is damaged.")
            ranks.setdefault(pair[0] + pair[1], len(ranks))
        rank_to_id = [-1] * len(ranks)
        special = {}
        for token, i in vocab.items():
            r = ranks.get(to_bytes(token))
            if r is None:
                special[token] = i
            else:
                rank_to_id[r] = i
        unmatched = [t for t, r in ranks.items() if r >= 256 and rank_to_id[r] == -1]
        if unmatched:
            raise DataError(f"{name}: a merge produces the token {unmatched[0]!r}, which the vocabulary does not "
                            f"contain ({len(unmatched)} such merges); the merges and the vocabulary do not belong "
                            "together.")
        self.missing = bytes(b for b in range(256) if rank_to_id[b] == -1)  # bytes that have no token
        special_ranks = {tok: len(ranks) + j for j, tok in enumerate(special)}
        rank_to_id += list(special.values())
        unk_token, self.fuse_unk = unk
        self.unk_rank = None if unk_token is None else special_ranks.get(unk_token, ranks.get(to_bytes(unk_token)))
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        self.rank_to_id = torch.tensor(rank_to_id)
        self.id_to_rank = {i: r for r, i in enumerate(rank_to_id) if i >= 0}
        self.bos_id = bos_id
        self.vocab_size = max(vocab.values()) + 1  # ids run to here; the model must have as many rows

    normal_form = None  # tokenizer.json's Unicode normalizer (Qwen's: "NFC"), applied before the regex split
    added, added_split = {}, None  # tokens cut out of the text first {text: id}, and their regex (find_added)

    def find_added(self, added):
        """Cut these tokens {text: id} out of the text before the BPE (tokenizer.json's added tokens, OPT's named
        special tokens): the leftmost first, then the longest, as tokenizers matches them."""
        longest_first = sorted(added, key=len, reverse=True)
        self.added = added
        self.added_split = re.compile(f"({'|'.join(map(re.escape, longest_first))})") if added else None

    def encode(self, text, bos=True):
        if self.normal_form:
            text = unicodedata.normalize(self.normal_form, text)
        ids = [self.bos_id] * (bos and self.bos_id is not None)
        if self.added_split is None:
            return ids + self.encode_ordinary(text)
        for i, piece in enumerate(self.added_split.split(text)):  # [text, token, text, ...]
            ids += [self.added[piece]] if i % 2 else self.encode_ordinary(piece)
        return ids

    def encode_ordinary(self, text):
        """The ids of text that holds no added token."""
        data = text.encode("utf-8", "surrogatepass")
        if self.missing and len(data.translate(None, self.missing)) < len(data):
            ranks = self.encode_around_missing(text)
        else:
            ranks = self.enc.encode_ordinary(text)
        return self.rank_to_id[ranks].tolist()

    def encode_around_missing(self, text):
        """tokenizers' behaviour for bytes without a token: after the regex split, each piece loses them (or
        they become the unk token, consecutive ones fused if fuse_unk), and BPE runs on what is left."""
        import regex  # tiktoken's own dependency: the regex split that tiktoken otherwise runs inside Rust
        ranks = []
        for piece in regex.findall(self.enc._pat_str, text):
            run, unk_last = bytearray(), False
            for byte in piece.encode("utf-8", "surrogatepass"):
                if byte not in self.missing:
                    run.append(byte)
                    continue
                if self.unk_rank is None:
                    continue  # dropped: its neighbours become adjacent and may merge
                if run:
                    ranks += self.enc._encode_single_piece(bytes(run))
                    run.clear()
                    unk_last = False
                if not (self.fuse_unk and unk_last):
                    ranks.append(self.unk_rank)
                unk_last = True
            if run:
                ranks += self.enc._encode_single_piece(bytes(run))
        return ranks

    def decode(self, ids):
        ids = ids[1:] if ids[:1] == [self.bos_id] else ids  # the BOS encode put; one inside the text stays
        return self.enc.decode([self.id_to_rank[i] for i in ids])


def split_pattern(pre, name):
    """The regex that cuts text into pieces before BPE, from a tokenizer.json pre_tokenizer: its Split's regex
    before a ByteLevel without its own (LLaMA-3, Qwen), GPT-2's for a ByteLevel alone, or GPT-2's adapted to a
    Digits step before it (SmolLM). Any other pre-tokenizer would cut text in a way we do not reproduce: refused."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = tuple(step.get("type") if isinstance(step, dict) else None for step in steps or [])
    byte_level = steps[-1] if kinds[-1:] == ("ByteLevel",) and not steps[-1].get("add_prefix_space") else None
    own_regex = byte_level is not None and byte_level.get("use_regex", True)
    if kinds == ("ByteLevel",) and own_regex:
        return GPT2_PATTERN
    if kinds == ("Digits", "ByteLevel") and own_regex:
        return DIGITS_PATTERNS[bool(steps[0].get("individual_digits"))]
    if kinds == ("Split", "ByteLevel") and byte_level and not own_regex and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]
    raise DataError(f"{name}: its pre_tokenizer {pre!r} is not supported here (supported: a byte-level BPE's "
                    "ByteLevel, alone or after a Split regex or a Digits step, without add_prefix_space).")


def normal_form(normalizer, name):
    """The Unicode form of a tokenizer.json normalizer: None for none, "NFC" etc.; any other normalizer would change
    the text in ways we do not reproduce, so it is refused rather than encoded differently from the model's."""
    steps = [] if normalizer is None else [normalizer]
    if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
        steps = normalizer.get("normalizers") or []
    forms = [step.get("type") if isinstance(step, dict) else step for step in steps]
    if len(forms) > 1 or any(f not in ("NFC", "NFKC", "NFD", "NFKD") for f in forms):
        raise DataError(f"{name}: its normalizer {normalizer!r} is not supported here (supported: none, or one of "
                        "NFC, NFKC, NFD, NFKD).")
    return forms[0] if forms else None


def template_bos(post_processor):
    """The id a tokenizer.json's post-processor puts before every text, as transformers applies it: the leading
    special token of its TemplateProcessing (LLaMA-3's <|begin_of_text|>), or None (Qwen2/3 and SmolLM have none)."""
    steps = [post_processor] if isinstance(post_processor, dict) else []
    if steps and post_processor.get("type") == "Sequence":
        steps = post_processor["processors"]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and "SpecialToken" in step["single"][0]:
            return step["special_tokens"][step["single"][0]["SpecialToken"]["id"]]["ids"][0]
    return None


def named_special_tokens(ckpt_dir):
    """The special tokens that transformers finds in the text for a vocab.json + merges.txt tokenizer: the strings
    its special_tokens_map.json and tokenizer_config.json name (bos_token, ..., additional_special_tokens,
    added_tokens_decoder)."""
    found = set()
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if not os.path.isfile(path := os.path.join(ckpt_dir, name)):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            tokens = [v for k, v in config.items() if k.endswith("_token")] + \
                list(config.get("additional_special_tokens") or []) + \
                list(config.get("added_tokens_decoder", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
            raise DataError(f"{path} is not a valid tokenizer configuration ({type(e).__name__}: {e}); re-download "
                            "it.") from None
        found.update(t.get("content") if isinstance(t, dict) else t for t in tokens)
    return {t for t in found if isinstance(t, str) and t}


def load_tokenizer(ckpt_dir, bos_id):
    """The tokenizer in `ckpt_dir`: tokenizer.model, tokenizer.json (BPE), or vocab.json + merges.txt. The first
    and last prepend `bos_id` (the config's; None: nothing), tokenizer.json what its own post-processor puts."""
    path = lambda name: os.path.join(ckpt_dir, name)  # noqa: E731
    if os.path.isfile(path("tokenizer.model")):
        return SentencePieceTokenizer(path("tokenizer.model"), bos_id)
    if os.path.isfile(path("tokenizer.json")):
        try:
            with open(path("tokenizer.json")) as f:
                tj = json.load(f)
            m = tj["model"]
            assert isinstance(m, dict), "its 'model' must be an object"
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AssertionError) as e:
            raise DataError(f"{path('tokenizer.json')} is not a valid tokenizer file ({type(e).__name__}: {e}).") \
                from None
        if m.get("type") != "BPE":
            raise DataError(f"{path('tokenizer.json')}: tokenizer type {m.get('type')!r} is not supported here "
                            "(supported: byte-level BPE; LLaMA-1/2 ship tokenizer.model, which is).")
        try:  # merges are "a b" strings in older files, [a, b] lists in files of tokenizers >= 0.20
            merges = [tuple(x.split(" ", 1)) if isinstance(x, str) else tuple(x) for x in m["merges"]]
            vocab = dict(m["vocab"])
            vocab.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
            assert all(len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in merges), \
                "every merge must be two strings"
            assert vocab and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()), \
                "the vocabulary must map tokens to ids >= 0, and hold at least one"
            bos_id = template_bos(tj.get("post_processor"))
        except (KeyError, TypeError, ValueError, AssertionError, AttributeError, IndexError) as e:
            raise DataError(f"{path('tokenizer.json')}: its BPE model is malformed ({type(e).__name__}: {e}); "
                            "re-download the file.") from None
        form = normal_form(tj.get("normalizer"), path("tokenizer.json"))
        pattern = split_pattern(tj.get("pre_tokenizer"), path("tokenizer.json"))
        tok = BPETokenizer(vocab, merges, pattern, bos_id, name=path("tokenizer.json"),
                           unk=(m.get("unk_token"), bool(m.get("fuse_unk"))))
        tok.normal_form = form
        tok.find_added({t["content"]: t["id"] for t in tj.get("added_tokens", []) if t["content"]})
        return tok
    if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        files = f"{path('vocab.json')} + merges.txt"
        try:
            with open(path("vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(path("merges.txt"), encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f.read().split("\n")
                          if line and not line.startswith("#version")]
            assert isinstance(vocab, dict) and all(isinstance(i, int) for i in vocab.values())
            assert all(len(pair) == 2 for pair in merges)
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
            raise DataError(f"{files} could not be read as a GPT-2-style BPE tokenizer ({type(e).__name__}: {e}); "
                            "re-download both files.") from None
        tok = BPETokenizer(vocab, merges, GPT2_PATTERN, bos_id, name=files)
        tok.find_added({t: vocab[t] for t in named_special_tokens(ckpt_dir) if t in vocab})  # OPT's </s>, <pad>
        return tok
    raise DataError(f"{ckpt_dir!r} has no tokenizer: expected tokenizer.model (SentencePiece), tokenizer.json "
                    "(BPE) or vocab.json + merges.txt; copy the tokenizer files from the original model.")


