"""eval.py: perplexity and zero-shot accuracy by the reference conventions."""

import itertools
import json
import math
import os
import re
import types

import pytest
import torch

import cli
import eval as eval_module
import model as M
from eval import perplexity
from conftest import (CharTokenizer, hf_tiny, interrupt_after_first_block, main, needs_transformers, run_command,
                      TASK_EXAMPLES, tiny_llama, torchrun)
from model import UserError


# -----------------------------------------------------------------------------
# data.py and eval.py


@needs_transformers
def test_perplexity_equals_transformers_loss(tmp_path):
    """exp(mean NLL) over non-overlapping windows equals exp of transformers' mean loss on the same windows."""
    ref = hf_tiny("llama_gqa")
    ref.save_pretrained(tmp_path)
    ours = M.load_model(str(tmp_path))
    ids = torch.randint(0, 101, (5 * 32 + 7,), generator=torch.Generator().manual_seed(0))  # remainder dropped
    windows = ids[: 5 * 32].view(5, 32)
    with torch.no_grad():
        loss = ref(windows, labels=windows).loss  # mean over all 5 * 31 predicted tokens
    assert abs(perplexity(ours, ids, 32, batch_size=2) / math.exp(loss.item()) - 1) <= 1e-5
    # logits formed 7 tokens at a time (7 x 101 float32, as a 128k vocabulary needs) give the same value
    rows, head = [], ours.head
    ours.head = lambda h: rows.append(len(h)) or head(h)
    assert abs(perplexity(ours, ids, 32, batch_size=2, logit_bytes=7 * 4 * 101) / math.exp(loss.item()) - 1) <= 1e-5
    assert max(rows) == 7 and sum(rows) == 5 * 31


def test_long_evaluation_shows_progress(monkeypatch, capsys):
    """Perplexity and zero-shot scoring say on stderr how many batches are done and about how long the rest takes,
    at most every PROGRESS_EVERY seconds (none for a short evaluation)."""
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (5 * 32,), generator=torch.Generator().manual_seed(0))
    quiet = perplexity(model, ids, 32, batch_size=2)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(eval_module, "PROGRESS_EVERY", 0.0)
    clock = itertools.count()  # a clock that ticks one second per reading: 1 s per batch
    monkeypatch.setattr(eval_module, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    assert perplexity(model, ids, 32, batch_size=2) == quiet
    assert capsys.readouterr().err.splitlines() == ["perplexity: batch 1/3, 1s elapsed, ~2s left",
                                                    "perplexity: batch 2/3, 2s elapsed, ~1s left"]
    eval_module.loglikelihoods(model, [("a b", " c")] * 3, CharTokenizer(), batch_size=1)
    assert capsys.readouterr().err.count("zero-shot: batch") == 2


# -----------------------------------------------------------------------------
# offloading


def test_evaluation_of_a_model_elsewhere_runs_block_by_block(monkeypatch):
    """A model that is not on the evaluation's device (--offload) is evaluated block by block, each block visiting
    the device once per group of batches, with the same perplexity and log-likelihoods as batch by batch."""
    model = tiny_llama(vocab_size=257)  # CharTokenizer's ids
    ids = torch.randint(0, 257, (7 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    pairs = [("Question: a list?", " a sequence"), ("Hi", " there"), ("x", " y and z, with more words")]
    ppl = perplexity(model, ids, 16, batch_size=3)
    ll = eval_module.loglikelihoods(model, pairs, CharTokenizer(), "cpu", 2)
    assert eval_module.runs_on(model, "cpu")
    with torch.device("meta"):
        assert not eval_module.runs_on(tiny_llama(), "cpu")
    moves, real_to = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: moves.append(self) or real_to(self, *a, **kw))
    monkeypatch.setattr(eval_module, "runs_on", lambda model, device: False)  # as if the device were a GPU
    assert perplexity(model, ids, 16, batch_size=3) == ppl
    assert [m for m in moves if m in model.blocks] == [b for b in model.blocks for _ in range(2)]  # there, home
    assert eval_module.loglikelihoods(model, pairs, CharTokenizer(), "cpu", 2) == ll
    moves.clear()
    batches = [torch.randint(0, 64, (2, 5)) for _ in range(3)]
    states = list(eval_module.final_states(model, batches, "cpu", state_bytes=1))  # every batch its own group
    assert [m for m in moves if m in model.blocks] == [b for b in model.blocks for _ in range(2)] * 3
    small = [model.embed_tokens, model.norm, model.lm_head]  # wait on the device for the caller's model.head
    assert [m for m in moves if any(m is s for s in small)] == small and moves[-1] is model  # then all go home
    assert all(torch.equal(h, model.hidden(x)) for h, x in zip(states, batches))


# -----------------------------------------------------------------------------
# reliability: nothing lost, nothing silent (each case of the reliability section of the README)


def test_task_items_are_checked_when_read(tmp_path):
    """A malformed zero-shot item is a TaskError naming file, line and problem when the file is read: a label
    outside the choices, null or a number for a sentence, boolq's label 'yes', a WinoGrande sentence without '_',
    an ARC answer key not among its labels, HellaSwag without endings, an empty ARC choice, one choice only, and a
    file without items."""
    good = {name: doc for name, (doc, _, _) in TASK_EXAMPLES.items()}
    cases = [("boolq", dict(label="yes"), "cannot be scored"), ("boolq", dict(passage=None), "'passage' is None"),
             ("rte", dict(label=2), "not one of its 2 choices"), ("piqa", dict(goal=5), "'goal' is 5"),
             ("winogrande", dict(sentence="No blank here."), "cannot be scored"),
             ("arc_easy", dict(answerKey="Z"), "cannot be scored"), ("hellaswag", dict(endings=[]), "not one of"),
             ("arc_easy", dict(choices={"text": ["frozen water", " "], "label": ["A", "B"]}), "choices (or the text "
              "after WinoGrande's blank) is empty"),
             ("arc_easy", dict(choices={"text": ["frozen water"], "label": ["A"]}, answerKey="A"),
              "not one of its 1 choices")]
    for name, change, message in cases:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(good[name]) + "\n" + json.dumps({**good[name], **change}))
        with pytest.raises(eval_module.TaskError, match=f"line 2: .*{re.escape(message)}"):
            eval_module.read_task(str(tmp_path), name)
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(good[name]))
        assert eval_module.read_task(str(tmp_path), name) == [good[name]]
    (tmp_path / "piqa.jsonl").write_text("\n")
    with pytest.raises(eval_module.TaskError, match="piqa.jsonl holds no items"):
        eval_module.read_task(str(tmp_path), "piqa")


# -----------------------------------------------------------------------------
# eval.py: zero-shot tasks by lm-eval's conventions


def test_task_prompts_are_lm_evals():
    """Every task turns its item into lm-eval's contexts, continuations and gold index (checked by hand)."""
    assert set(TASK_EXAMPLES) == set(eval_module.TASKS)
    for name, (doc, pairs, gold) in TASK_EXAMPLES.items():
        assert eval_module.TASKS[name][1](doc) == (pairs, gold), name
    premise = {"premise": "A man walks.", "hypothesis": "A person moves.", "label": 0}  # SuperGLUE's field names
    assert eval_module.TASKS["rte"][1](premise) == eval_module.TASKS["rte"][1](TASK_EXAMPLES["rte"][0])
    google = {"passage": "Cats sleep a lot.", "question": "do cats sleep", "answer": True}
    assert eval_module.TASKS["boolq"][1](google) == eval_module.TASKS["boolq"][1](TASK_EXAMPLES["boolq"][0])
    # the tasks whose lm-eval configs list acc_norm among their metrics
    assert {name for name, (_, _, norm) in eval_module.TASKS.items() if norm} == {
        "hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"}


@needs_transformers
def test_loglikelihoods_batched_equal_one_at_a_time(tiny):
    """Summed continuation log-probabilities from right-padded batches equal each pair scored alone from the
    full logits; a context's trailing space moves to the continuation, as in lm-eval."""
    model, tok = cli.load(tiny["ckpt"])
    pairs = [("Question: what is a list?\nAnswer:", " a sequence"), ("Hi", " there, friend of mine"),
             ("A longer context that goes on and on about lists and tuples ", "and sets."), ("x", " y")]
    got = eval_module.loglikelihoods(model, pairs, tok, batch_size=3)
    for (context, continuation), ll in zip(pairs, got):
        ctx, cont = eval_module.encode_pair(tok, context, continuation, tok.bos_id)
        ids = torch.tensor(ctx + cont)
        logp = model(ids[None, :-1])[0].log_softmax(-1)
        expected = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
        assert ll == pytest.approx(expected, abs=1e-4)
    ctx, cont = eval_module.encode_pair(tok, "on and on ", "and sets.", tok.bos_id)
    assert tok.decode(ctx) == "on and on" and tok.decode(cont) == " and sets."
    # an empty context: lm-eval's prefix token (BOS, else EOS) as context, every token of the continuation scored
    bos_id = tok.bos_id
    for tok.bos_id, prefix in ((5, 5), (None, model.cfg.eos_token_id)):
        cont = tok.encode("lists and tuples", bos=False)
        logp = model(torch.tensor([[prefix] + cont[:-1]]))[0].log_softmax(-1)
        expected = sum(logp[k, t].item() for k, t in enumerate(cont))
        got = eval_module.loglikelihoods(model, [("", "lists and tuples")], tok)[0]
        assert got == pytest.approx(expected, abs=1e-4)
    tok.bos_id = bos_id
    ctx, cont = eval_module.encode_pair(tok, *pairs[2], tok.bos_id)  # longer than max_len = 8: the last 8 + 1 tokens count
    ids = torch.tensor((ctx + cont)[-9:])
    logp = model(ids[None, :-1])[0].log_softmax(-1)
    expected = sum(logp[8 - len(cont) + k, t].item() for k, t in enumerate(cont))
    assert eval_module.loglikelihoods(model, [pairs[2]], tok, max_len=8)[0] == pytest.approx(expected, abs=1e-4)
    # a continuation longer than the window: its tokens in the window count, but the first (nothing predicts it)
    ctx, cont = eval_module.encode_pair(tok, *pairs[1], tok.bos_id)
    assert len(cont) > 4
    ids = torch.tensor(cont[-4:])
    logp = model(ids[None, :-1])[0].log_softmax(-1)
    expected = sum(logp[k, t].item() for k, t in enumerate(ids[1:].tolist()))
    assert eval_module.loglikelihoods(model, [pairs[1]], tok, max_len=3)[0] == pytest.approx(expected, abs=1e-4)
    # by default a window is cut at the model's positions, as lm-eval's max_length (not at 2048 tokens)
    model.cfg.max_position_embeddings, long = 4096, ("lists and tuples " * 400, "and sets.")
    assert len(sum(eval_module.encode_pair(tok, *long, tok.bos_id), [])) > 2049
    assert eval_module.loglikelihoods(model, [long], tok) == \
        eval_module.loglikelihoods(model, [long], tok, max_len=4096)


def test_acc_and_acc_norm_follow_the_definitions(monkeypatch):
    """acc takes the highest log-likelihood, acc_norm the highest per character of the choice; tasks without
    acc_norm in lm-eval report acc alone."""
    docs = [TASK_EXAMPLES["piqa"][0]] * 2  # choices of 13 and 11 characters, gold 0
    # item 1: acc wrong, acc_norm right: -10/13 > -8.5/11 (counting the delimiter would flip it: -10/14 < -8.5/12);
    # item 2: both right
    scores = iter([-10.0, -8.5, -10.0, -12.0])
    monkeypatch.setattr(eval_module, "loglikelihoods", lambda model, pairs, *a: [next(scores) for _ in pairs])
    assert eval_module.zero_shot(None, None, "piqa", docs) == {"acc": 0.5, "acc_norm": 1.0}
    scores = iter([-1.0, -2.0])
    assert eval_module.zero_shot(None, None, "boolq", [TASK_EXAMPLES["boolq"][0]]) == {"acc": 0.0}
    # lm-eval divides by len(choice), its delimiter not counted: a HellaSwag ending that starts with a [..] marker
    # cleans to " Ab." (4 characters, its space counted) and wins -3.5/4 > -4.5/5 ("Abcd.")
    doc = dict(TASK_EXAMPLES["hellaswag"][0], endings=["[step] Ab.", "Abcd."])
    assert [x for _, x in eval_module.TASKS["hellaswag"][1](doc)[0]] == ["  Ab.", " Abcd."]
    scores = iter([-3.5, -4.5])
    assert eval_module.zero_shot(None, None, "hellaswag", [doc]) == {"acc": 1.0, "acc_norm": 1.0}


@needs_transformers
def test_zero_shot_tasks_through_main(tiny, tmp_path):
    """--tasks gives one row per task and their mean, in the table and --json; a missing task file or field is
    a clear error naming the expected path and fields."""
    (tmp_path / "tasks").mkdir()
    for name, key, golds in (("boolq", "label", (0, 1)), ("winogrande", "answer", ("1", "2"))):
        # the same item twice with each answer: whatever the model picks, the accuracy is 1/2
        items = [dict(TASK_EXAMPLES[name][0], **{key: gold}) for gold in golds]
        (tmp_path / "tasks" / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    report = main(**dict(tiny, methods=["dense"], tasks=["boolq", "winogrande"], tasks_dir=str(tmp_path / "tasks")))
    rows = {row["eval"]: row for row in report["results"]}
    assert set(rows) == {"eval.txt", "boolq", "winogrande", "zero-shot mean"}  # the mean is over the tasks alone
    assert rows["boolq"]["acc"] == rows["winogrande"]["acc"] == rows["zero-shot mean"]["acc"] == 0.5
    with pytest.raises(eval_module.TaskError, match=r"piqa\.jsonl.*fields goal, sol1, sol2, label"):
        main(**dict(tiny, methods=["dense"], tasks=["piqa"], tasks_dir=str(tmp_path / "tasks")))
    (tmp_path / "tasks" / "piqa.jsonl").write_text('{"goal": "x", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(eval_module.TaskError, match="line 1 lacks label"):
        main(**dict(tiny, methods=["dense"], tasks=["piqa"], tasks_dir=str(tmp_path / "tasks")))
    with pytest.raises(UserError, match="--tasks needs --tasks-dir"):
        main(**dict(tiny, methods=["dense"], tasks=["piqa"]))


@needs_transformers
def test_group_parallel_resumes_an_interrupted_run(tiny, tmp_path, monkeypatch):
    """A run interrupted after its first block and resumed by 2 torchrun processes ends with the elastic model
    of an uninterrupted single-process run (to float32 round-off): rank 0 reads the finished block and shares it."""
    flags = dict(seqlen=16, nsamples=5, epochs=2, batch_size=2, methods=["epts"], sparsities=[0.5])
    args = ["--ckpt", tiny["ckpt"], "--calib", tiny["calib"], "--eval", *tiny["evals"], "--seqlen", "16",
            "--nsamples", "5", "--epochs", "2", "--batch-size", "2", "--methods", "epts", "--sparsities", "0.5"]
    one = run_command(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    interrupt_after_first_block(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(**dict(tiny, **flags, out=str(tmp_path / "resumed")))
    assert sorted(os.listdir(tmp_path / "resumed" / "partial")) == ["block_000.pt", "run.json"]
    many = torchrun(2, *args, "--out", str(tmp_path / "resumed"))
    assert many.returncode == 0, many.stderr[-3000:]
    assert "blocks 0..0 are done" in many.stderr
    a, b = (torch.load(tmp_path / run / "elastic.pt", weights_only=True) for run in ("one", "resumed"))
    for ra, rb in zip(a["blocks"], b["blocks"]):
        for key in ("A", "B"):
            for name in ra[key]:
                torch.testing.assert_close(rb[key][name], ra[key][name], atol=1e-5, rtol=1e-4)
