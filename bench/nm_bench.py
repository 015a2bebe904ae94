"""
N:M pruning on the bench fixtures: magnitude, Wanda, SparseGPT, RIA and EGGS-PTP at 2:4 and 4:8 (perplexity,
pruning time, and how many inputs each pattern leaves without a weight in some m x m tile), then the cost of
RIA and EGGS beside Wanda at one LLaMA-2-7B-shaped block (random weights, CPU). Writes bench/nm_results.json
and the tables of docs/methods.md.

    python bench/nm_bench.py [--skip-7b]
"""

import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import prune  # noqa: E402

PATTERNS = [(2, 4), (4, 8)]
# (row label, method, EGGS diagonals b)
METHODS = [("magnitude", "magnitude", 1), ("wanda", "wanda", 1), ("sparsegpt", "sparsegpt", 1), ("ria", "ria", 1),
           ("eggs b=1", "eggs", 1), ("eggs b=2", "eggs", 2)]


def disconnected(model, m):
    """The share of (tile, input) pairs with no weight left: m x m tiles of every prunable layer, an input column
    of a tile counted when all m of its weights are zero. EGGS with b >= 1 makes this 0 by construction."""
    empty = total = 0
    for block in model.blocks:
        for lin in block.linears().values():
            out_f, in_f = lin.weight.shape
            rows = out_f // m * m
            kept = (lin.weight[:rows] != 0).view(rows // m, m, in_f).sum(1)  # (row tiles, in)
            empty += (kept == 0).sum().item()
            total += kept.numel()
    return empty / total


def fixture_rows(kind):
    model, calib, ppl = bench.fixture_and_data(kind)
    rows = [{"method": "dense", "sparsity": "0", "ppl": ppl(model)}]
    for n, m in PATTERNS:
        for label, method, b in METHODS:
            pruned = prune.prunable_copy(model)
            t0 = time.time()
            prune.prune_model(pruned, method, (n, m), calib, config=prune.PruneConfig(eggs_diagonals=b))
            seconds = time.time() - t0
            rows.append({"method": label, "sparsity": f"{n}:{m}", "seconds": seconds,
                         "ppl": ppl(pruned),
                         "disconnected": disconnected(pruned, m)})
            bench.log(f"{kind} {label} {n}:{m}: ppl {rows[-1]['ppl']:.2f}, {seconds:.2f}s")
    return rows


def block_cost(name="llama-2-7b", repeat=3, windows=4, seqlen=128):
    """Seconds, best of `repeat`, for Wanda, RIA and EGGS 2:4 (and Wanda, RIA at 0.5) on one block of a real model's
    shape (random weights, float32): prune_model as a whole (its calibration pass of `windows` x `seqlen` tokens
    and the masks), and the masks of the block's layers alone (prune_layer, from the same statistics)."""
    model, calib = bench.random_block(name, windows, seqlen)
    layers = model.blocks[0].linears()
    stats = {n: prune.InputStats(lin.in_features, False, "cpu") for n, lin in layers.items()}
    for s in stats.values():
        s.add(torch.randn(256, s.sq.shape[0]))
    times = {}
    for method, s in (("wanda", (2, 4)), ("ria", (2, 4)), ("eggs", (2, 4)), ("wanda", 0.5), ("ria", 0.5)):
        whole = masks = float("inf")
        for _ in range(repeat):
            whole = min(whole, bench.prune_seconds(model, method, s, calib))
            copies = {n: copy.deepcopy(lin) for n, lin in layers.items()}
            t0 = time.time()
            with torch.no_grad():
                for n, lin in copies.items():
                    prune.prune_layer(method, lin, stats[n], s, prune.PruneConfig())
            masks = min(masks, time.time() - t0)
        key = f"{method} {prune.format_sparsity(s)}"
        times[key], times[key + " masks"] = whole, masks
        bench.log(f"{name} block: {key} {whole:.2f}s, masks alone {masks:.2f}s")
    return times


def tables(results):
    lines = ["| model | method | 2:4 ppl | 4:8 ppl | 2:4 s | 4:8 s | inputs cut off in a tile, 2:4 / 4:8 |",
             "|---|---|---|---|---|---|---|"]
    for kind, rows in results["fixtures"].items():
        dense = next(r for r in rows if r["method"] == "dense")
        lines.append(f"| {kind} | dense | {dense['ppl']:.2f} | | | | |")
        for label, _, _ in METHODS:
            cell = {r["sparsity"]: r for r in rows if r["method"] == label}
            a, b = cell["2:4"], cell["4:8"]
            lines.append(f"| {kind} | {label} | {a['ppl']:.2f} | {b['ppl']:.2f} | {a['seconds']:.2f} | "
                         f"{b['seconds']:.2f} | {100 * a['disconnected']:.2f} % / {100 * b['disconnected']:.2f} % |")
    if "real_shape" in results:
        t = results["real_shape"]
        lines += ["", "| LLaMA-2-7B block (CPU) | Wanda | RIA | EGGS b=1 | RIA / Wanda | EGGS / RIA |",
                  "|---|---|---|---|---|---|"]
        for s, what in (("2:4", ""), ("2:4", " masks"), ("0.5", ""), ("0.5", " masks")):
            w, r, e = (t.get(f"{m} {s}{what}") for m in ("wanda", "ria", "eggs"))
            label = f"{s}, {'the masks alone' if what else 'prune_model (calibration pass + masks)'}"
            lines.append(f"| {label} | {w:.2f} s | {r:.2f} s | {f'{e:.2f} s' if e else '—'} | {r / w:.2f} | "
                         f"{f'{e / r:.2f}' if e else '—'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    bench.methods_bench("nm", fixture_rows, block_cost, tables, __doc__)
