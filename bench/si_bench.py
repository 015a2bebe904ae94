"""
Sparsity Induction as the paper writes it (--si-init eq5) on the bench fixtures: magnitude, Wanda and SparseGPT
alone, with +si (Eq. 5's scales clamped to 10x their median, and the shift), with the scales clamped to 2x and
4x, and with the shift alone (--si-clamp 1), at 0.5, 0.7 and 2:4, with the pruning time per block; Wanda with the
mean bias correction alone; one EPTS run's time on the same calibration windows; then the time +si adds to one
LLaMA-2-7B-shaped block (random weights, CPU). Writes bench/si_results.json and the tables of docs/methods.md.
Our default (--si-init act) against it and against the methods alone: bench/si_default.py.

    python bench/si_bench.py [--skip-7b]
"""

import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import epts  # noqa: E402
import run  # noqa: E402
import prune  # noqa: E402
from eval import perplexity  # noqa: E402

SPARSITIES = [0.5, 0.7, (2, 4)]
BASES = ["magnitude", "wanda", "sparsegpt"]
EQ5 = prune.PruneConfig(si_init="eq5")  # the paper's Eq. 5 as written, whose clamp this bench varies
VARIANTS = [("", prune.PruneConfig()), ("+si shift only", replace(EQ5, si_clamp=1)),  # clamp 1: no scales
            ("+si clamp 2", replace(EQ5, si_clamp=2)), ("+si clamp 4", replace(EQ5, si_clamp=4)),
            ("+si", EQ5)]  # Eq. 5's default clamp, 10


@torch.no_grad()
def mean_corrected_wanda(model, calib, s):
    """Wanda with the bias correction alone, no Sparsity Induction: each pruned layer gets b + (W - P) E[x], the
    mean contribution of its removed weights (the shift at its initial value, on Wanda's uncentred masks)."""
    X = prune.embed_calibration(model, calib, "cpu", 8, n_streams=2, reserve_bytes=0)
    for block in model.blocks:
        stats = prune.new_stats(block, False, "cpu")
        prune.run_block(block, X, "cpu", 8, stats)
        for n, lin in block.linears().items():
            W = lin.weight.clone()
            prune.prune_layer("wanda", lin, stats[n], s, prune.PruneConfig())
            b = torch.zeros(lin.out_features) if lin.bias is None else lin.bias
            lin.bias = torch.nn.Parameter(b + (W - lin.weight) @ stats[n].mean, requires_grad=False)
        X = prune.run_block(block, X, "cpu", 8)
    return model


def fixture_rows(kind):
    """Perplexity and seconds per block of every base method and variant; one EPTS run's seconds."""
    model, calib, ppl = bench.fixture_and_data(kind)
    rows = [{"method": "dense", "ppl": ppl(model)}]
    for base in BASES:
        for label, config in VARIANTS:
            for s in SPARSITIES:
                pruned = prune.prunable_copy(model)
                t0 = time.time()
                prune.prune_model(pruned, base + label.split()[0] if label else base, s, calib, config=config)
                rows.append({"method": base + label, "sparsity": prune.format_sparsity(s),
                             "block_s": (time.time() - t0) / len(model.blocks), "ppl": ppl(pruned)})
                bench.log(f"{kind} {base}{label} {s}: ppl {rows[-1]['ppl']:.2f}, {rows[-1]['block_s']:.2f}s/block")
    on_calib = lambda m: perplexity(m, calib.reshape(-1), calib.shape[1], 8)  # noqa: E731
    for s in SPARSITIES:  # and both on the calibration windows themselves: a mismatch with the test text, or not
        plain, corrected = prune.prunable_copy(model), mean_corrected_wanda(prune.prunable_copy(model), calib, s)
        prune.prune_model(plain, "wanda", s, calib)
        rows.append({"method": "wanda, mean bias only", "sparsity": prune.format_sparsity(s), "block_s": 0,
                     "ppl": ppl(corrected), "calib_ppl": on_calib(corrected), "wanda_calib_ppl": on_calib(plain)})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        run.run_epts(prune.prunable_copy(model), calib, out, epts.EPTSConfig(epochs=bench.RUN["epochs"]))
        rows.append({"method": "epts (one run)", "block_s": (time.time() - t0) / len(model.blocks)})
    return rows


def block_cost(name="llama-2-7b", windows=4, seqlen=128):
    """Seconds of prune_model on one block of a real model's shape (random weights, float32) at 0.5, for each base
    method alone and with +si (its calibration pass of `windows` x `seqlen` tokens included)."""
    return bench.block_seconds([m + si for m in BASES for si in ("", "+si")], name, windows, seqlen)


def tables(results):
    lines = ["| model | method | 0.5 | 0.7 | 2:4 | s / block |", "|---|---|---|---|---|---|"]
    for kind, rows in results["fixtures"].items():
        dense = next(r for r in rows if r["method"] == "dense")
        lines.append(f"| {kind} | dense | {dense['ppl']:.2f} | | | |")
        for base in BASES:
            for label, _ in VARIANTS:
                cell = {r["sparsity"]: r for r in rows if r["method"] == base + label}
                lines.append(f"| {kind} | {base}{label} | " + " | ".join(f"{cell[prune.format_sparsity(s)]['ppl']:.2f}"
                                                                     for s in SPARSITIES) +
                             f" | {max(r['block_s'] for r in cell.values()):.2f} |")
        cell = {r["sparsity"]: r for r in rows if r["method"] == "wanda, mean bias only"}
        lines.append(f"| {kind} | wanda, mean bias only (no SI) | " +
                     " | ".join(f"{cell[prune.format_sparsity(s)]['ppl']:.2f}" for s in SPARSITIES) + " | |")
        pairs = [cell[prune.format_sparsity(s)] for s in SPARSITIES]
        lines.append(f"| {kind} | the same on the calibration windows: Wanda → mean bias | " +
                     " | ".join(f"{r['wanda_calib_ppl']:.2f} → {r['calib_ppl']:.2f}" for r in pairs) + " | |")
        epts_s = next(r for r in rows if r["method"] == "epts (one run)")["block_s"]
        lines.append(f"| {kind} | one EPTS run (for its time) | | | | {epts_s:.2f} |")
    if "real_shape" in results:
        t = results["real_shape"]
        lines += ["", f"| one {t['block']} (CPU, 0.5) | alone | +si | added by +si |", "|---|---|---|---|"]
        lines += [f"| {m} | {t[m]:.1f} s | {t[m + '+si']:.1f} s | {t[m + '+si'] - t[m]:.1f} s |" for m in BASES]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.methods_bench("si", fixture_rows, block_cost, tables, __doc__)
