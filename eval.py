"""Perplexity over non-overlapping windows, as Wanda and SparseGPT report it, and zero-shot accuracy on
local copies of lm-eval-harness's tasks, scored by its conventions."""

import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F


def runs_on(model, device):
    """Whether the model's weights are on `device`; if not (--offload: in CPU memory), its blocks visit `device`."""
    return next(model.parameters()).device == torch.empty(0, device=device).device


PROGRESS_EVERY = 30.0  # seconds between progress lines: a short evaluation prints none


def with_progress(batches, what):
    """Yield the batches; at most every PROGRESS_EVERY seconds say on stderr how many are done and about how long
    the rest takes (thousands of zero-shot requests, or a large model on the CPU, take long)."""
    t0 = last = time.time()
    for i, batch in enumerate(batches, 1):
        yield batch
        now = time.time()
        if now - last >= PROGRESS_EVERY:
            left = (now - t0) / i * (len(batches) - i)
            print(f"{what}: batch {i}/{len(batches)}, {now - t0:.0f}s elapsed, ~{left:.0f}s left", file=sys.stderr,
                  flush=True)
            last = now


@torch.no_grad()
def final_states(model, batches, device, state_bytes=2**33):
    """model.hidden(x) (B, T, C) for each batch of ids x, in order, on `device`.

    A model that lives elsewhere (in CPU memory, --offload) never moves to `device` whole: the batches' states wait
    in CPU memory (at most `state_bytes` at a time) and each block visits `device` once for all of them, as in
    pruning; the embeddings and head (small) stay on `device` meanwhile, for the caller's model.head.
    """
    if runs_on(model, device):
        yield from (model.hidden(x.to(device)) for x in batches)
        return
    home = next(model.parameters()).device
    token_bytes = model.cfg.hidden_size * next(model.parameters()).element_size()
    try:
        for name, child in model.named_children():
            if name != "blocks":
                child.to(device)
        group, size = [], 0
        for i, x in enumerate(batches):
            group.append(x)
            size += x.numel() * token_bytes
            if size >= state_bytes or i == len(batches) - 1:
                states = [model.embed(x.to(device)).to(home) for x in group]  # each (B, T, C)
                for block in model.blocks:
                    block.to(device)
                    for j, h in enumerate(states):
                        states[j] = block(h.to(device)).to(home)
                    block.to(home)
                yield from (h.to(device) for h in states)
                group, size = [], 0
    finally:
        model.to(home)


@torch.no_grad()
def perplexity(model, ids, seqlen, batch_size=4, device="cpu", logit_bytes=2**28):
    """exp(mean NLL) over every predicted token of the non-overlapping `seqlen` windows of `ids` (1-D).

    The remainder after the last full window is dropped. NLL is summed in float64 so that hundreds of
    windows do not lose precision. Logits are formed a slice of tokens at a time (at most `logit_bytes` of
    float32): with a 128k vocabulary the whole batch's logits would take 4 GiB at B=4, T=2048.
    """
    n = len(ids) // seqlen
    batches = ids[: n * seqlen].view(n, seqlen).split(batch_size)  # each (B, T)
    chunk = max(1, logit_bytes // (4 * model.lm_head.weight.shape[0]))  # tokens per slice of logits
    nll, count = torch.zeros((), dtype=torch.float64), 0
    # final_states first: zip runs it to its end
    for h, x in zip(final_states(model, batches, device), with_progress(batches, "perplexity")):
        h = h[:, :-1].reshape(-1, h.shape[-1])  # (B*(T-1), C): every position that predicts a token
        targets = x[:, 1:].reshape(-1).to(device)  # (B*(T-1),)
        for j in range(0, len(targets), chunk):
            logits = model.head(h[j:j + chunk]).float()  # (chunk, V)
            nll += F.cross_entropy(logits, targets[j:j + chunk], reduction="sum").double().cpu()
        count += len(targets)
    try:
        return math.exp(nll.item() / count)
    except OverflowError:  # a finite but huge mean NLL: the caller reports a non-finite perplexity
        return math.inf


# -----------------------------------------------------------------------------
# zero-shot accuracy by lm-eval-harness's conventions: each choice scored by the summed log-probability of
# its continuation given the context; acc picks the highest, acc_norm the highest per character


class TaskError(ValueError):
    """A task file that cannot be used: the message names the expected path and fields."""


def hellaswag_clean(text):
    """lm-eval's HellaSwag preprocessing: WikiHow's "[title]" markers become sentence breaks, other [..] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def choice_of(doc, key="answerKey"):
    """The index of the answer key among an ARC/OpenBookQA item's choice labels."""
    return doc["choices"]["label"].index(doc[key].strip())


def label_of(doc, *keys):
    """The gold label under the first of `keys` the item has (datasets name it differently), as an int."""
    return int(next(doc[k] for k in keys if k in doc))


# task -> (fields each JSON line needs, alternatives joined by "|"; doc -> ([(context, continuation)], gold);
# whether lm-eval reports acc_norm). Continuations start with lm-eval's target delimiter, one space.
TASKS = {
    "boolq": (("passage", "question", "label|answer"),
              lambda d: ([(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", f" {c}") for c in ("no", "yes")],
                         label_of(d, "label", "answer")), False),
    "rte": (("sentence1|premise", "sentence2|hypothesis", "label"),
            lambda d: ([(f"{d.get('sentence1', d.get('premise'))}\nQuestion: {d.get('sentence2', d.get('hypothesis'))}"
                         " True or False?\nAnswer:", f" {c}") for c in ("True", "False")], label_of(d, "label")), False),
    "hellaswag": (("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                  lambda d: ([(hellaswag_clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
                               f" {hellaswag_clean(e)}") for e in d["endings"]], label_of(d, "label")), True),
    # WinoGrande's partial scoring: the sentence up to the blank, with each option, as the context; the rest of
    # the sentence, the same for both, as the continuation
    "winogrande": (("sentence", "option1", "option2", "answer"),
                   lambda d: ([(d["sentence"][:d["sentence"].index("_")] + o,
                                " " + d["sentence"][d["sentence"].index("_") + 1:].strip())
                               for o in (d["option1"], d["option2"])], label_of(d, "answer") - 1), False),
    "arc_easy": (("question", "choices", "answerKey"),
                 lambda d: ([(f"Question: {d['question']}\nAnswer:", f" {c}") for c in d["choices"]["text"]],
                            choice_of(d)), True),
    "openbookqa": (("question_stem", "choices", "answerKey"),
                   lambda d: ([(d["question_stem"], f" {c}") for c in d["choices"]["text"]], choice_of(d)), True),
    "piqa": (("goal", "sol1", "sol2", "label"),
             lambda d: ([(f"Question: {d['goal']}\nAnswer:", f" {c}") for c in (d["sol1"], d["sol2"])],
                        label_of(d, "label")), True),
}
TASKS["arc_challenge"] = TASKS["arc_easy"]


def item_problem(name, doc):
    """Why an item of task `name` cannot be scored, or None: its text fields must be strings (lists of strings for
    endings and choices), its prompts must build, and its gold answer must be one of its choices."""
    fields, to_pairs, _ = TASKS[name]
    for key in (k for f in fields for k in f.split("|") if k in doc and k not in ("label", "answer", "answerKey")):
        value = doc[key]
        texts = value.get("text", None) if key == "choices" and isinstance(value, dict) else value
        if key in ("endings", "choices"):
            ok = isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        else:
            ok = isinstance(value, str)
        if not ok:
            return f"field {key!r} is {value!r}, not {'a list of strings' if key in ('endings', 'choices') else 'text'}"
    try:
        pairs, gold = to_pairs(doc)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        return f"the item cannot be scored ({type(e).__name__}: {e})"
    if len(pairs) < 2 or not 0 <= gold < len(pairs):
        return f"its answer (choice {gold}) is not one of its {len(pairs)} choices"
    if not all(x.strip() for _, x in pairs):  # acc_norm would divide by its length, 0
        return "one of its choices (or the text after WinoGrande's blank) is empty"
    return None


def read_task(tasks_dir, name):
    """The items of `tasks_dir/name.jsonl` (one JSON object per line, the public dataset's field names)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    fields = TASKS[name][0]
    path = os.path.join(tasks_dir, f"{name}.jsonl")
    hint = f"{path} must hold one JSON object per line with the fields {', '.join(fields)}"
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"task {name}: {path} could not be read ({type(e).__name__}: {e}); {hint}.") from None
    for n, doc in enumerate(docs, 1):
        missing = [f for f in fields if not isinstance(doc, dict) or not any(k in doc for k in f.split("|"))]
        if missing:
            raise TaskError(f"task {name}: {path} line {n} lacks {', '.join(missing)}; {hint}.")
        problem = item_problem(name, doc)
        if problem:
            raise TaskError(f"task {name}: {path} line {n}: {problem}; {hint}.")
    if not docs:
        raise TaskError(f"task {name}: {path} holds no items; {hint}.")
    return docs


def encode_pair(tok, context, continuation, prefix_id):
    """lm-eval's tokens for one request: (context ids, continuation ids). The context's trailing spaces move
    to the continuation; the continuation's ids are those of context + continuation past the context's own
    count. No BOS, as lm-eval; an empty context is [prefix_id] (lm-eval's BOS, else EOS), the continuation then
    encoded alone."""
    if context == "":
        return [prefix_id], tok.encode(continuation, bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tok.encode(context, bos=False)
    return ctx, tok.encode(context + continuation, bos=False)[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, pairs, tok, device="cpu", batch_size=8, max_len=None):
    """log P(continuation | context) summed over the continuation's tokens, for every (context, continuation)
    pair. Batches of similar length, right-padded (causal attention never looks right); a window longer than
    max_len (default: the model's positions, lm-eval's max_length) keeps its last max_len tokens."""
    max_len = max_len or model.cfg.max_position_embeddings
    prefix_id = tok.bos_id if tok.bos_id is not None else model.cfg.eos_token_id
    encoded = [encode_pair(tok, c, x, prefix_id) for c, x in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, encoded[i])))
    batches, inputs = [], []  # per batch: (pair indices, token rows, each continuation's start); ids (B, T)
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        rows = [(encoded[i][0] + encoded[i][1])[-(max_len + 1):] for i in batch]
        starts = [max(1, len(row) - len(encoded[i][1])) for row, i in zip(rows, batch)]  # continuation's first
        idx = torch.zeros(len(rows), max(len(row) for row in rows) - 1, dtype=torch.long)
        for j, row in enumerate(rows):
            idx[j, :len(row) - 1] = torch.tensor(row[:-1])
        batches.append((batch, rows, starts))
        inputs.append(idx)
    out = [0.0] * len(pairs)
    for h, (batch, rows, starts) in zip(final_states(model, inputs, device), with_progress(batches, "zero-shot")):
        for j, (row, start) in enumerate(zip(rows, starts)):
            logp = model.head(h[j, start - 1:len(row) - 1]).float().log_softmax(-1)  # (n_cont, V)
            target = torch.tensor(row[start:], device=logp.device)
            out[batch[j]] = logp.gather(1, target[:, None]).sum().item()
    return out


def zero_shot(model, tok, name, docs, device="cpu", batch_size=8):
    """{'acc': ..., 'acc_norm': ... (where lm-eval reports it)} of `model` on the items of task `name`."""
    _, to_pairs, has_norm = TASKS[name]
    items = [to_pairs(d) for d in docs]
    scores = iter(loglikelihoods(model, [p for pairs, _ in items for p in pairs], tok, device, batch_size))
    acc = acc_norm = 0
    for pairs, gold in items:
        ll = [next(scores) for _ in pairs]
        chars = [len(x) - 1 for _, x in pairs]  # acc_norm: per character of the choice, without the delimiter
        acc += max(range(len(ll)), key=ll.__getitem__) == gold
        acc_norm += max(range(len(ll)), key=lambda k: ll[k] / chars[k]) == gold
    result = {"acc": acc / len(items)}
    if has_norm:
        result["acc_norm"] = acc_norm / len(items)
    return result
