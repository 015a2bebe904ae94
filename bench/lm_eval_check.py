"""
Our zero-shot scoring (eval.py) against lm-evaluation-harness itself, on every task of eval.TASKS.

lm-eval is not a dependency of this project (it pulls datasets, pandas, pyarrow, ...): install it beside it,
e.g. `python -m venv --system-site-packages /tmp/lmeval && /tmp/lmeval/bin/pip install lm_eval==0.4.13`, then

    /tmp/lmeval/bin/python bench/lm_eval_check.py OUT.json CKPT [CKPT ...]

(`make references` does both, on the benchmark fixtures.)

The real task sets are not on this machine, so each task gets items in its dataset's own fields, built from
WikiText-2 test sentences (a sentence's opening as the context, its own rest or other sentences' rests as the
choices; a few HellaSwag items carry WikiHow's [title] and [step] markers). Sentences holding WikiText v1's
`<unk>` are left out: with a tokenizer.model we encode that string as text, transformers as the unk token (the
README's known limitations).

lm-eval runs its own task definitions on the items (datasets.load_dataset answers with them) through its HFLM on
the transformers model of CKPT; we run eval.py on our model of CKPT. Printed per task: the largest difference
between the two log-likelihoods of one choice, and both programs' acc and acc_norm.
"""

import json
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import cli  # noqa: E402
from eval import TASKS, loglikelihoods, zero_shot  # noqa: E402

WIKITEXT = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt")


def sentences(path, rng):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = [s.strip() + "." for line in text.splitlines() if not line.strip().startswith("=")
             for s in line.split(" . ") if 14 <= len(s.split()) <= 40 and "<unk>" not in s]
    rng.shuffle(found)
    return found


def task_items(pool, n, rng):
    """n items of every task in its dataset's fields; each draws fresh sentences from `pool`."""
    def split(s):  # (opening, rest) of a sentence
        words = s.split()
        cut = rng.randint(5, len(words) - 5)
        return " ".join(words[:cut]), " ".join(words[cut:])

    def draw(k):
        return [split(pool.pop()) for _ in range(k)]

    items = {name: [] for name in TASKS}
    for _ in range(n):
        (a, ra), (b, rb) = draw(2)
        items["boolq"].append({"passage": a + " " + ra, "question": b.lower(), "label": rng.randint(0, 1)})
        (a, ra), (b, rb) = draw(2)
        items["rte"].append({"sentence1": a + " " + ra, "sentence2": b + " " + rb, "label": rng.randint(0, 1)})
        parts, gold = draw(4), rng.randint(0, 3)
        (ctx, true), endings = parts[0], [rest for _, rest in parts[1:]]
        endings.insert(gold, true)
        words = ctx.split()
        if rng.random() < 0.3:  # WikiHow's markers, which lm-eval's preprocessing rewrites
            endings = [f"[step] {e}" if rng.random() < 0.5 else e for e in endings]
            words[1:1] = ["[title]"]
        items["hellaswag"].append({"activity_label": words[0], "ctx_a": " ".join(words[:-2]),
                                   "ctx_b": " ".join(words[-2:]).lower(), "endings": endings, "label": str(gold)})
        (a, ra), (b, rb) = draw(2)
        true = rng.randint(1, 2)
        options = [a, b] if true == 1 else [b, a]
        items["winogrande"].append({"sentence": "_ " + ra, "option1": options[0], "option2": options[1],
                                    "answer": str(true)})
        for name, key in (("arc_easy", "question"), ("arc_challenge", "question"), ("openbookqa", "question_stem")):
            parts, gold = draw(4), rng.randint(0, 3)
            choices = [rest for _, rest in parts[1:]]
            choices.insert(gold, parts[0][1])
            items[name].append({key: parts[0][0], "choices": {"text": choices, "label": list("ABCD")},
                                "answerKey": "ABCD"[gold]})
        (a, ra), (b, rb) = draw(2)
        gold = rng.randint(0, 1)
        items["piqa"].append({"goal": a, "sol1": [ra, rb][gold], "sol2": [rb, ra][gold], "label": gold})
    return items


# lm-eval's dataset (path, name) of each task, as its YAML files name them
DATASETS = {("aps/super_glue", "boolq"): "boolq", ("nyu-mll/glue", "rte"): "rte",
            ("Rowan/hellaswag", None): "hellaswag", ("allenai/winogrande", "winogrande_xl"): "winogrande",
            ("allenai/ai2_arc", "ARC-Easy"): "arc_easy", ("allenai/ai2_arc", "ARC-Challenge"): "arc_challenge",
            ("allenai/openbookqa", "main"): "openbookqa", ("baber/piqa", None): "piqa"}


def lm_eval_scores(ckpt, items):
    """{task: (per-item log-likelihoods of every choice, acc, acc_norm or None)} from lm-eval."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network
    import datasets
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    def load_dataset(path=None, name=None, **kwargs):  # the items above, in every split lm-eval may read
        docs = datasets.Dataset.from_list(items[DATASETS[(path, name)]])
        return datasets.DatasetDict({split: docs for split in ("train", "validation", "test")})

    datasets.load_dataset = load_dataset
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(ckpt), batch_size=8)
    out = simple_evaluate(model=lm, tasks=list(items), num_fewshot=0, log_samples=True, bootstrap_iters=0)
    found = {}
    for task in items:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        lls = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
        metrics = out["results"][task]
        found[task] = (lls, metrics["acc,none"], metrics.get("acc_norm,none"))
    return found


def our_scores(ckpt, items):
    model, tok = cli.load(ckpt)
    found = {}
    for task, docs in items.items():
        per_item = [TASKS[task][1](d)[0] for d in docs]
        flat = iter(loglikelihoods(model, [p for pairs in per_item for p in pairs], tok, batch_size=8))
        lls = [[next(flat) for _ in pairs] for pairs in per_item]
        metrics = zero_shot(model, tok, task, docs, batch_size=8)
        found[task] = (lls, metrics["acc"], metrics.get("acc_norm"))
    return found


def check(ckpt, items):
    """Both programs' scores of the items on one checkpoint, printed; {task: {max_ll_diff, acc, acc_norm}}."""
    theirs, ours, found = lm_eval_scores(ckpt, items), our_scores(ckpt, items), {}
    print(f"{ckpt}\n{'task':14} {'max |ll diff|':>13} {'acc lm-eval':>11} {'acc ours':>9} {'norm lm-eval':>12} "
          f"{'norm ours':>9}")
    for task in items:
        (ll_t, acc_t, norm_t), (ll_o, acc_o, norm_o) = theirs[task], ours[task]
        assert [len(x) for x in ll_t] == [len(y) for y in ll_o], f"{task}: the programs scored other requests"
        diff = max(abs(a - b) for x, y in zip(ll_t, ll_o) for a, b in zip(x, y))
        found[task] = {"max_ll_diff": diff, "acc": [acc_t, acc_o], "acc_norm": [norm_t, norm_o]}
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{task:14} {diff:13.2e} {acc_t:11.4f} {acc_o:9.4f} {fmt(norm_t):>12} {fmt(norm_o):>9}")
    return found


if __name__ == "__main__":
    import lm_eval
    out, ckpts, n, seed = sys.argv[1], sys.argv[2:], 60, 0
    rng = random.Random(seed)
    items = task_items(sentences(WIKITEXT, rng), n, rng)
    report = {"lm_eval": lm_eval.__version__, "items_per_task": n, "seed": seed,
              "pairs": "[lm-eval, ours]", "checkpoints": {ckpt: check(ckpt, items) for ckpt in ckpts}}
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
