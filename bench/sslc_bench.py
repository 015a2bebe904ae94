"""
SSLC (sparse + low-rank) on the bench fixtures against Wanda and SparseGPT at the same parameter count (0.5 and
0.6), over rank ratios 0.1 / 0.25 / 0.4, the defaults (momentum 0.8, at most 10 alternations, and 5) against plain
alternation (momentum 0, 20 and 80), with the time per block; then one LLaMA-2-7B-shaped layer (random weights,
CPU, float32) where SSLC, plain alternation and OATS's own loop (a full SVD per iteration) are timed to the same
weighted error beside SparseGPT, and one such block. Writes bench/sslc_results.json and the tables of
docs/methods.md.

    python bench/sslc_bench.py [--skip-7b]
"""

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import prune  # noqa: E402

SPARSITIES = [0.5, 0.6]
RATIOS = [0.1, 0.25, 0.4]
SETTINGS = [(10, 0.8), (5, 0.8), (20, 0.0), (80, 0.0)]  # (alternations, momentum): the defaults first
OATS_ITERATIONS = 12  # OATS's loop on the 7B-shaped layer: ~20 s per full SVD on 2 cores


def fixture_rows(kind):
    """Perplexity, seconds per block and kept parameters of Wanda, SparseGPT and every SSLC setting."""
    model, calib, ppl = bench.fixture_and_data(kind)
    rows = [{"method": "dense", "ppl": ppl(model)}]
    settings = [("wanda", None, None, None), ("sparsegpt", None, None, None)] + \
        [("sslc", ratio, n, beta) for ratio in RATIOS for n, beta in SETTINGS]
    for s in SPARSITIES:
        for method, ratio, n, beta in settings:
            pruned = prune.prunable_copy(model)
            config = prune.PruneConfig(rank_ratio=ratio or 0.0, alternations=n or 1, sslc_momentum=beta or 0.0)
            t0 = time.time()
            prune.prune_model(pruned, method, s, calib, config=config)
            rows.append({"method": method, "sparsity": s, "rank_ratio": ratio, "alternations": n, "momentum": beta,
                         "block_s": (time.time() - t0) / len(model.blocks), "kept": prune.kept_share(pruned),
                         "ppl": ppl(pruned)})
            bench.log(f"{kind} {method} {s} {ratio} {n} {beta}: ppl {rows[-1]['ppl']:.2f}, "
                      f"{rows[-1]['block_s']:.2f}s/block")
    return rows


def oats_loop(W, act_norm, sparsity, rank_ratio, target, iterations):
    """OATS's alternation as its paper and code describe it (METHODS.md §3; written here from that description):
    a full SVD of W D - S truncated to rank r, then S = the k largest entries per row of the rest, no forced keep.
    Runs until its weighted error reaches `target` or for `iterations`; returns (seconds, errors)."""
    Wd = W.float() * act_norm
    r, k = prune.sslc_budget(*W.shape, sparsity, rank_ratio)
    S, errors, t0 = torch.zeros_like(Wd), [], time.time()
    for _ in range(iterations):
        U, s, Vh = torch.linalg.svd(Wd - S, full_matrices=False)
        R = Wd - (U[:, :r] * s[:r]) @ Vh[:r]
        S = R * ~prune.lowest_k(R.abs(), W.shape[1] - k)
        errors.append(torch.linalg.norm(R - S).item())
        bench.log(f"oats loop: iteration {len(errors)}, error {errors[-1]:.2f}, {time.time() - t0:.0f}s")
        if errors[-1] <= target:
            break
    return time.time() - t0, errors


def layer_cost(name="llama-2-7b", shape=(11008, 4096), tokens=512):
    """One layer of a real model's shape at 0.5 (random weights, float32), the same calibration statistics of
    `tokens` random inputs for all: seconds and weighted error ||(W - S - U V) D|| of SSLC's defaults, of plain
    alternation (momentum 0, 20 alternations) and of OATS's loop run until it reaches the defaults' error; and
    SparseGPT's seconds."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    stats = prune.InputStats(in_f, hessian=True, device="cpu")
    stats.add(torch.randn(tokens, in_f, generator=gen))
    runs = {}
    for label, kw in (("sslc", {}), ("plain", dict(alternations=20, momentum=0.0))):
        t0 = time.time()
        errors = prune.sslc_prune(W, stats.act_norm, 0.5, **kw)[3]
        runs[label] = {"s": time.time() - t0, "alternations": len(errors), "error": errors[-1]}
        bench.log(f"{name} {out_f}x{in_f}: {label} {runs[label]['s']:.1f}s, {len(errors)} alternations, error "
                  f"{errors[-1]:.2f}")
    seconds, errors = oats_loop(W, stats.act_norm, 0.5, 0.25, runs["sslc"]["error"], OATS_ITERATIONS)
    runs["oats"] = {"s": seconds, "alternations": len(errors), "error": errors[-1], "errors": errors,
                    "reached": errors[-1] <= runs["sslc"]["error"]}
    t0 = time.time()
    prune.sparsegpt_prune(W, stats.H, 0.5)
    sparsegpt = time.time() - t0
    bench.log(f"{name} {out_f}x{in_f}: sparsegpt {sparsegpt:.1f}s")
    return {"layer": f"{name} {out_f}x{in_f}", **runs, "sparsegpt_s": sparsegpt}


def block_cost(name="llama-2-7b", windows=4, seqlen=128):
    """Seconds of prune_model with SSLC (defaults) and with SparseGPT on one block of a real model's shape at 0.5
    (random weights, float32), each with its calibration pass of `windows` x `seqlen` tokens: the time per block
    that issue 26's 10x is about (SparseGPT's down_proj, 11008 inputs, costs it far more than a gate_proj)."""
    return bench.block_seconds(("sparsegpt", "sslc"), name, windows, seqlen)


def real_shape():
    return {**layer_cost(), "one_block": block_cost()}


def tables(results):
    lines = ["| model | sparsity | method | rank ratio | alternations | momentum | ppl | s / block | kept params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in results["fixtures"].items():
        dense = rows[0]["ppl"]
        lines.append(f"| {kind} | 0 | dense | | | | {dense:.2f} | | 100 % |")
        for r in rows[1:]:
            lines.append(f"| {kind} | {r['sparsity']} | {r['method']} | {r['rank_ratio'] or '—'} | "
                         f"{r['alternations'] or '—'} | {'—' if r.get('momentum') is None else r['momentum']} | "
                         f"{r['ppl']:.2f} | {r['block_s']:.2f} | {100 * r['kept']:.1f} % |")
    if "real_shape" in results:
        c = results["real_shape"]
        lines += ["", f"| {c['layer']} at 0.5 (CPU, float32) | seconds | alternations | weighted error | "
                  "/ SparseGPT's seconds |", "|---|---|---|---|---|"]
        for label, what in (("sslc", "SSLC, defaults (momentum 0.8, warm low-rank steps)"),
                            ("plain", "plain alternation (momentum 0), 20 alternations"),
                            ("oats", "OATS's loop (full SVD), until the defaults' error")):
            run = c[label]
            note = "" if label != "oats" or run["reached"] else " (not reached)"
            lines.append(f"| {what} | {run['s']:.1f} | {run['alternations']}{note} | {run['error']:.2f} | "
                         f"{run['s'] / c['sparsegpt_s']:.1f} |")
        lines.append(f"| SparseGPT | {c['sparsegpt_s']:.1f} | | | 1.0 |")
        b = c["one_block"]
        lines += ["", "| one block (calibration pass included) | SSLC, defaults | SparseGPT | SSLC / SparseGPT |",
                  "|---|---|---|---|",
                  f"| {b['block']} | {b['sslc']:.1f} s | {b['sparsegpt']:.1f} s | {b['sslc'] / b['sparsegpt']:.1f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    bench.methods_bench("sslc", fixture_rows, real_shape, tables, __doc__)
