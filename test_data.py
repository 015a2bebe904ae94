"""data.py: the tokenizers match their reference libraries; calibration and evaluation text as the papers read it."""

import gzip
import json
import os

import pytest
import torch

import data
from conftest import (CharTokenizer, LLAMA2_TOKENIZER, LLAMA3_PATTERN, needs_transformers, QWEN2_PATTERN, TEXT,
                      train_bpe, train_family_bpe, transformers)


# -----------------------------------------------------------------------------
# data.py: tokenizers


@pytest.mark.skipif(not os.path.isfile(LLAMA2_TOKENIZER), reason="../shared/data/llama2-tokenizer is absent")
@needs_transformers
def test_sentencepiece_tokenizer_matches_transformers():
    """The real LLaMA-2 tokenizer: transformers' ids (BOS once at the start) and an exact round trip.

    transformers >= 5 runs LLaMA's vocabulary through `tokenizers` without SentencePiece's split at whitespace,
    so on runs of spaces it may emit '▁▁' where the original SentencePiece tokenizer (Meta's reference, which
    we follow) emits '▁' + '▁The'. Single-spaced text must match exactly; runs must match SentencePiece.
    """
    import sentencepiece as spm
    ref = transformers.LlamaTokenizer.from_pretrained(os.path.dirname(LLAMA2_TOKENIZER), add_bos_token=True,
                                                      legacy=True)
    ours = data.SentencePieceTokenizer(LLAMA2_TOKENIZER, bos_id=1)
    single = "\n".join(" ".join(w for w in line.split(" ") if w) for line in TEXT.split("\n"))
    assert ours.encode(single) == ref(single)["input_ids"]
    assert ours.encode(TEXT) == [1] + spm.SentencePieceProcessor(model_file=LLAMA2_TOKENIZER).encode(TEXT)
    assert ours.encode(TEXT)[0] == 1 and ours.encode(TEXT).count(1) == 1
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert data.SentencePieceTokenizer(LLAMA2_TOKENIZER, bos_id=None).encode(TEXT) == ours.encode(TEXT)[1:]


def test_bpe_tokenizer_matches_tokenizers_library(tmp_path):
    """vocab.json + merges.txt run through tiktoken: the same ids as the `tokenizers` BPE, exact round trip."""
    ref = train_bpe(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    ours = data.load_tokenizer(str(tmp_path), bos_id=2)
    ids = ours.encode(TEXT)
    assert ids[0] == 2 and ids[1:] == ref.encode(TEXT).ids  # OPT prepends </s>
    assert ours.decode(ids) == TEXT


@needs_transformers
def test_vocab_json_special_tokens_are_found_as_transformers_finds_them(tmp_path):
    """OPT's tokenizer files: the special tokens its special_tokens_map.json and tokenizer_config.json name (</s>,
    <pad>) are found in the text as transformers finds them; other strings (<unk>, <s>) stay plain text. A damaged
    map is an error naming the file."""
    train_bpe(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    added = lambda text: {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True,  # noqa
                          "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": added("</s>"), "eos_token": added("</s>"), "unk_token": added("</s>"), "pad_token": "<pad>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": added("</s>"), "errors": "replace"}))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = data.load_tokenizer(str(tmp_path), bos_id=2)
    text = "a</s>b <pad> c<unk>d<s>" + TEXT[:300] + "</s></s>"
    assert ours.encode(text) == ref(text)["input_ids"] and ours.decode(ours.encode(text)) == text
    assert ours.encode("x</s>", bos=False)[-1] == 2 and 3 not in ours.encode("<unk>")
    (tmp_path / "special_tokens_map.json").write_text("{")
    with pytest.raises(data.DataError, match=r"special_tokens_map\.json is not a valid tokenizer configuration"):
        data.load_tokenizer(str(tmp_path), bos_id=2)


def test_tokenizer_json_bpe_matches(tmp_path):
    """A BPE tokenizer.json (the LLaMA-3 layout) gives the same ids as the library, its added tokens (special or
    not) found in the text as the library finds them, the longest first where two start at the same place."""
    ref = train_bpe(tmp_path)
    ref.add_tokens(["<|tool|>"])
    ref.add_special_tokens(["<|eot|>", "<|eot|><|eot|>"])
    ref.save(str(tmp_path / "tokenizer.json"))
    for name in ("vocab.json", "merges.txt"):
        os.remove(tmp_path / name)
    ours = data.load_tokenizer(str(tmp_path), bos_id=0)
    assert ours.encode(TEXT, bos=False) == ref.encode(TEXT).ids
    assert ours.decode(ours.encode(TEXT)) == TEXT
    text = "a</s>b <unk> c<|eot|><|eot|><|eot|> <|tool|>d<s>" + TEXT[:200]
    assert ours.encode(text, bos=False) == ref.encode(text).ids and ours.decode(ours.encode(text)) == text
    assert ours.encode("</s>", bos=False) == [2] and ours.encode("<|eot|><|eot|>", bos=False) == [402]


@pytest.mark.parametrize("individual", [True, False])
def test_tokenizer_json_digits_step_splits_as_smollms_does(tmp_path, individual):
    """SmolLM's pre-tokenizer cuts the text at every digit before GPT-2's regex runs on each piece: digits take no
    space before them and spaces before a digit stay one piece. The library's ids, on text where that matters;
    a pre-tokenizer we do not reproduce is refused, naming it."""
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)  # trained without the step: merges such as Ġ2, 20
    texts = [TEXT, "in  2023 and   1999,  12 345 x1y22  7.5%  a  b"] * 5
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=400,
                                                                  initial_alphabet=pre.ByteLevel.alphabet()))
    tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=individual), pre.ByteLevel(add_prefix_space=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = data.load_tokenizer(str(tmp_path), None)
    text = "Year  2023, then   1999 x1y22  7.5%  12 345 in  a row.\n 42\n\n  7 " + TEXT
    assert ours.encode(text) == tok.encode(text).ids
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in tj["model"]["merges"]]
    gpt2 = data.BPETokenizer(tj["model"]["vocab"], merges, data.GPT2_PATTERN, None)
    assert gpt2.encode(text) != tok.encode(text).ids  # GPT-2's regex alone cuts this text otherwise
    tj["pre_tokenizer"]["pretokenizers"][0] = {"type": "Punctuation", "behavior": "Isolated"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(data.DataError, match="pre_tokenizer .*Punctuation.* is not supported"):
        data.load_tokenizer(str(tmp_path), None)
    # a Split regex before ByteLevel is taken as it is, and refused with any setting that would change its pieces
    byte_level = dict(tj["pre_tokenizer"]["pretokenizers"][1], use_regex=False)
    split = {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False}
    assert data.split_pattern({"type": "Sequence", "pretokenizers": [split, byte_level]}, "t") == r"\s+"
    for refused in (dict(byte_level, use_regex=True, add_prefix_space=True),  # a space put before the text
                    {"type": "Sequence", "pretokenizers": [dict(split, invert=True), byte_level]},
                    {"type": "Sequence", "pretokenizers": [dict(split, behavior="Removed"), byte_level]}):
        with pytest.raises(data.DataError, match="pre_tokenizer .* is not supported"):
            data.split_pattern(refused, "tokenizer.json")


@needs_transformers
@pytest.mark.parametrize("template", [True, False])
def test_tokenizer_json_bos_is_what_its_post_processor_puts(tmp_path, template):
    """A tokenizer.json prepends the special token its post-processor's template puts first (LLaMA-3's
    <|begin_of_text|>), and nothing without one (Qwen2/3, SmolLM, whose configs still name a bos_token_id):
    transformers' ids either way, never the config's id."""
    train_family_bpe(tmp_path, LLAMA3_PATTERN, special=("<|begin_of_text|>", "<|end_of_text|>"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    bos = tj["model"]["vocab"]["<|begin_of_text|>"]
    first = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    tj["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                  "tokens": ["<|begin_of_text|>"]}}},
    ][:2 if template else 1]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = data.load_tokenizer(str(tmp_path), bos_id=bos + 1)  # the config's id, which tokenizer.json overrides
    assert ours.encode(TEXT) == ref(TEXT)["input_ids"]
    assert ours.bos_id == (bos if template else None)
    eos_last = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}, first]}
    assert data.template_bos(eos_last) is None  # a special token after the text is no BOS


@pytest.mark.parametrize("normalizer", [{"type": "NFC"}, {"type": "Sequence", "normalizers": [{"type": "NFKC"}]}])
def test_tokenizer_json_unicode_normalizer_is_applied(tmp_path, normalizer):
    """Qwen's tokenizer.json normalises text to NFC before splitting it: decomposed accents and ligatures get the
    library's ids; a normalizer we do not reproduce is refused, naming it."""
    tokenizers = pytest.importorskip("tokenizers")
    train_family_bpe(tmp_path, QWEN2_PATTERN, vocab_size=400, texts=[TEXT, "café Ångström ﬁne"] * 5)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["normalizer"] = normalizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    ref, ours = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), data.load_tokenizer(str(tmp_path), 0)
    text = "cafe\u0301 A\u030angstro\u0308m \ufb01ne, " + TEXT  # decomposed é, Å, ö and the ligature fi
    assert ours.encode(text, bos=False) == ref.encode(text).ids
    ours.normal_form = None  # the same text unnormalised: other ids, so the check above has something to check
    assert ours.encode(text, bos=False) != ref.encode(text).ids
    for refused in ({"type": "Lowercase"}, {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "NFKD"}]}):
        tj["normalizer"] = refused
        (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
        with pytest.raises(data.DataError, match=f"normalizer .*{refused['type']}.* is not supported"):
            data.load_tokenizer(str(tmp_path), 0)


# text with bytes that a tokenizer trained without them has no token for: control bytes, and characters
# whose UTF-8 needs lead bytes (0xF1, 0xF2, 0xF5-0xFF never occur in valid UTF-8) the training text lacked;
# "\x04!\x04\x06!" is one piece where a known byte ends a run of unknown ones (fuse_unk fuses runs only)
RARE = "tab\x04le \x06x\x13\x14y \x16\x1dz ab\x04cd !!\x04!! \x04!\x04\x06! \U00040000 \U00080000 é ü"


@pytest.mark.parametrize("pattern", [None, LLAMA3_PATTERN, QWEN2_PATTERN])
@pytest.mark.parametrize("unk", ["dropped", "unk", "fused unk"])
def test_bpe_vocabulary_without_some_bytes_encodes_like_tokenizers(tmp_path, pattern, unk):
    """A BPE trained by tokenizers on text lacking some of the 256 bytes: same ids as tokenizers on text with and
    without those bytes (dropped, or the unk token, a run of them fused into one with fuse_unk), merges written as
    [a, b] lists or as "a b" strings."""
    tokenizers = pytest.importorskip("tokenizers")
    texts = [TEXT.encode("ascii", "ignore").decode()] * 3 + ["hello world abc abcd ab!! 123 4567"] * 20
    train_family_bpe(tmp_path / "a", pattern or LLAMA3_PATTERN, vocab_size=300, texts=texts, special=("<unk>",),
                     all_bytes=False)
    tj = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    tj["model"]["unk_token"] = None if unk == "dropped" else "<unk>"
    tj["model"]["fuse_unk"] = unk == "fused unk"
    if pattern is None:  # the GPT-2 layout: ByteLevel does the split with its own regex
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True}
    alphabet = set(data.bytes_to_unicode().values())
    assert len(alphabet - set(tj["model"]["vocab"])) > 100  # many bytes really are missing
    assert isinstance(tj["model"]["merges"][0], list)
    for merges_as in ("lists", "strings"):
        if merges_as == "strings":
            tj["model"]["merges"] = [" ".join(pair) for pair in tj["model"]["merges"]]
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(tj))
        ref = tokenizers.Tokenizer.from_file(str(tmp_path / "b" / "tokenizer.json"))
        ours = data.load_tokenizer(str(tmp_path / "b"), bos_id=0)
        for text in (texts[-1], TEXT, RARE, RARE * 3):
            assert ours.encode(text, bos=False) == ref.encode(text).ids, (merges_as, text)
    if unk == "dropped":
        assert ours.decode(ours.encode(texts[-1])) == texts[-1]


def test_bpe_errors_name_the_file_read(tmp_path):
    """A merge whose result the vocabulary lacks is refused, naming tokenizer.json (not vocab.json/merges.txt)."""
    train_family_bpe(tmp_path, LLAMA3_PATTERN, vocab_size=300, all_bytes=False)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    del tj["model"]["vocab"]["".join(tj["model"]["merges"][5])]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(data.DataError, match=r"tokenizer\.json: a merge produces the token") as e:
        data.load_tokenizer(str(tmp_path), 0)
    assert "vocab.json" not in str(e.value)
    tj["model"]["merges"] = [[1, 2]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(data.DataError, match=r"tokenizer\.json: its BPE model is malformed"):
        data.load_tokenizer(str(tmp_path), 0)


# -----------------------------------------------------------------------------
# data.py and eval.py


def test_calibration_is_reproducible_and_seeded(tmp_path):
    """Same seed, same windows; another seed, other windows; never the global RNG."""
    path = tmp_path / "c.txt"
    path.write_text("".join(f"sentence number {i} of a long text. " for i in range(2000)))
    tok = CharTokenizer()
    a = data.calibration(str(path), tok, 8, 64, seed=0)
    torch.manual_seed(123)
    import random
    random.seed(123)
    b = data.calibration(str(path), tok, 8, 64, seed=0)
    c = data.calibration(str(path), tok, 8, 64, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_leaves_the_global_random_state_alone(tmp_path):
    """Sampling windows uses a local RNG: Python's and torch's global generators are untouched."""
    import random
    (tmp_path / "t.txt").write_text("abcdefghij" * 300)
    random.seed(7)
    torch.manual_seed(7)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    data.calibration(str(tmp_path / "t.txt"), CharTokenizer(), 4, 32, seed=123)
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)


def test_c4_calibration_finds_the_one_long_document_among_many_short_ones(tmp_path):
    """Windows come from documents longer than seqlen however rare: the draws give up only after 100 per window
    plus 10 per document (one long document among 300 is found, not reported missing)."""
    docs = [{"text": "short"}] * 300 + [{"text": "the one long document " * 10}]
    (tmp_path / "c4.json").write_text("".join(json.dumps(d) + "\n" for d in docs))
    windows = data.calibration(str(tmp_path / "c4.json"), CharTokenizer(), 1, 32, seed=2)  # its 378th draw
    ids = CharTokenizer().encode(docs[-1]["text"])
    assert any(ids[j:j + 32] == windows[0].tolist() for j in range(len(ids) - 31))


def test_c4_json_gz_documents_and_windows(tmp_path):
    """A C4 shard (.json.gz) is read back; the windows are the references' for the seed, from documents longer
    than seqlen only (one of exactly seqlen tokens is skipped)."""
    docs = [{"text": "short"}] * 4 + [{"text": "x" * 99}] + [{"text": f"long document {i} " * 40, "url": "x"}
                                                             for i in range(5)]
    path = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    kind, read = data.read_documents(str(path))
    assert kind == "c4" and read == [d["text"] for d in docs]
    w = data.calibration(str(path), CharTokenizer(), 6, 100, seed=0)
    texts = ["".join(chr(i - 1) for i in row.tolist()) for row in w]
    assert all("long document" in t for t in texts)
    import random
    random.seed(0)  # Wanda's and SparseGPT's get_c4, as written there
    expected = []
    for _ in range(6):
        while True:
            i = random.randint(0, len(docs) - 1)
            trainenc = CharTokenizer().encode(docs[i]["text"])
            if len(trainenc) > 100:
                break
        i = random.randint(0, len(trainenc) - 100 - 1)
        expected.append(trainenc[i:i + 100])
    assert w.tolist() == expected
    with pytest.raises(data.DataError, match="longest has 6"):
        data.calibration(str(path), CharTokenizer(), 2, 1000, seed=0)


def test_c4_validation_stream_convention(tmp_path):
    """C4 evaluation: the first 1100 documents joined with ' ', cut to 256 x seqlen tokens."""
    path = tmp_path / "c4-validation.00000-of-00008.json"
    path.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(1200)))
    for seqlen in (4, 32):  # 1024 tokens: the cut shows; 8192: all 1100 documents (5,490 tokens) show
        ids = data.eval_tokens(str(path), CharTokenizer(), seqlen)
        expected = CharTokenizer().encode(" ".join(f"d{i}" for i in range(1100)))[: 256 * seqlen]
        assert ids.tolist() == expected


def test_wikitext_join_matches_the_datasets_rows(tmp_path):
    """WikiText rows (blank lines as '', others with their newline) joined with two newlines, tokenized once."""
    raw = " \n = Title = \n \n Body text @-@ here . \n"
    assert data.wikitext_join(raw, "\n\n") == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Body text @-@ here . \n"
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(raw * 20)
    (folder / "test-00000-of-00001.parquet").write_bytes(b"PAR1")  # a name with the split, of a format we don't read
    ids = data.eval_tokens(str(folder), CharTokenizer(), 8)
    assert ids.tolist() == CharTokenizer().encode(data.wikitext_join(raw * 20, "\n\n"))
    (folder / "copy.txt").write_text(raw * 20)  # a .txt with "wiki" in its path is read as WikiText too
    assert data.eval_tokens(str(folder / "copy.txt"), CharTokenizer(), 8).tolist() == ids.tolist()


def test_wikitext_calibration_windows_are_the_references(tmp_path):
    """WikiText calibration as Wanda's and SparseGPT's get_wikitext2 builds it: the train rows joined with " ",
    tokenized once, then for each window random.randint(0, len - seqlen - 1) after random.seed(seed), and no
    other draw between them."""
    import random
    rows = ["", " = Title = \n", ""] + [f" Sentence {i} of the body , with words @-@ here . \n" for i in range(60)]
    (tmp_path / "wiki.train.raw").write_text("".join(row or " \n" for row in rows))  # a blank line is " \n"
    tok = CharTokenizer()
    trainenc = tok.encode(" ".join(rows))
    for seqlen, n in ((64, 10), (len(trainenc) - 3, 20)):  # the second: 3 starts, where the range's end shows
        random.seed(3)  # the reference, as written there
        expected = []
        for _ in range(n):
            i = random.randint(0, len(trainenc) - seqlen - 1)
            expected.append(trainenc[i:i + seqlen])
        assert data.calibration(str(tmp_path), tok, n, seqlen, seed=3).tolist() == expected


def test_data_errors_name_the_problem(tmp_path):
    """Missing, empty and unknown-format files, and a too-short evaluation or calibration text, each say what is
    wrong."""
    with pytest.raises(data.DataError, match="does not exist"):
        data.eval_tokens(str(tmp_path / "none.txt"), CharTokenizer(), 8)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="holds no text"):
        data.eval_tokens(str(tmp_path / "empty.txt"), CharTokenizer(), 8)
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(data.DataError, match="unknown data format"):
        data.eval_tokens(str(tmp_path / "x.parquet"), CharTokenizer(), 8)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.eval_tokens(str(tmp_path / "short.txt"), CharTokenizer(), 8)
    with pytest.raises(data.DataError, match="too few for a calibration window of seqlen=8"):
        data.calibration(str(tmp_path / "short.txt"), CharTokenizer(), 2, 8, seed=0)
