"""
The outlier test bed: what real LLMs have and small trained models lack (Sun et al. 2024, "Massive activations
in large language models"): a few input channels whose activations are very large while the weights reading
them are small. Magnitude pruning, which sees |W_ij| alone, removes exactly those weights first; Wanda's score
|W_ij| ||X_j|| does not care. On SmolLM2-135M magnitude at 0.5 is 7.6x Wanda's perplexity (564 against 74);
on our fixtures the two are within 1 %, so nothing there can show what a method does about it.

add_outliers makes the fixtures so, without changing what they compute: for a few channels j of the hidden
state, every norm that feeds a linear layer (LLaMA's input_layernorm and post_attention_layernorm, pre-LN OPT's
two LayerNorms) gets its gamma_j (and beta_j) multiplied by k, and the columns W[:, j] of the layers it feeds
(q, k, v; gate, up; fc1) divided by k. For k a power of two every product is the same to the last bit, so the
model's logits and Wanda's masks are unchanged, and magnitude's masks empty those columns.

    python bench/outliers.py     # every method on both fixtures, plain and with outliers; bench/outliers_results.json
"""

import os
import sys
from datetime import date

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import prune  # noqa: E402

CHANNELS, K = 2, 64.0  # real LLMs: 2-4 of 4096 hidden channels, activations 100-1000x the median
METHODS = ("magnitude", "wanda", "sparsegpt", "magnitude+si", "wanda+si")  # +si: Eq. 5 (si_default.py: ours)
EQ5 = prune.PruneConfig(si_init="eq5")
SPARSITIES = (0.5, 0.7)


@torch.no_grad()
def outlier_channels(model, calib, n=CHANNELS):
    """The n hidden channels that carry the outliers, the same in every block (as in real LLMs): those the first
    block's attention norm gives the largest ||x_j|| on the calibration windows. Real outlier channels are the most
    active ones, and the model relies on them; two channels drawn at random change magnitude's perplexity on the
    LLaMA fixture by less than 1 % (42.37 against 41.99 at 0.5), these two by 28 % at 0.7 (71.68 against 55.94)."""
    block = model.blocks[0]
    stats = prune.new_stats(block, hessian=False, device="cpu")
    prune.run_block(block, model.embed(calib), "cpu", 8, stats)
    first = next(iter(stats.values()))  # q_proj's inputs: the attention norm's outputs
    return first.act_norm.topk(n).indices


@torch.no_grad()
def add_outliers(model, channels, k=K):
    """In place: in every block, the norms that feed linear layers multiply channels `channels` by k and the
    layers they feed divide those input columns by k (the norm -> linear pairs of Block.scale_pairs)."""
    for block in model.blocks:
        pairs = {n: p for n, p in block.scale_pairs().items() if n in ("attn_in", "mlp_in")}
        scales = {n: torch.ones(size).index_fill_(0, channels, 1 / k) for n, (size, _) in pairs.items()}
        for module, (row, col) in prune.si_factors(block, pairs, scales).items():
            m = block.get_submodule(module)
            m.weight.mul_(row.view(-1, 1) * col if m.weight.dim() == 2 else row)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(row)
    return model


def rows(kind):
    """Dense and every method at SPARSITIES on the fixture `kind`, plain and with outliers."""
    import bench
    model, calib, ppl = bench.fixture_and_data(kind)
    found = []
    for bed in ("plain", "outliers"):
        if bed == "outliers":
            add_outliers(model, outlier_channels(model, calib))
        found.append({"model": kind, "bed": bed, "method": "dense", "sparsity": 0.0, "ppl": ppl(model)})
        for method in METHODS:
            for s in SPARSITIES:
                pruned = prune.prunable_copy(model)
                prune.prune_model(pruned, method, s, calib, config=EQ5)
                found.append({"model": kind, "bed": bed, "method": method, "sparsity": s, "ppl": ppl(pruned)})
                bench.log(f"{kind} {bed} {method} {s}: {found[-1]['ppl']:.2f}")
    return found


def table(results):
    lines = ["| fixture | method | plain 0.5 / 0.7 | with outliers 0.5 / 0.7 |", "|---|---|---|---|"]
    by = {(r["model"], r["bed"], r["method"], r["sparsity"]): r["ppl"] for r in results["rows"]}
    for kind in dict.fromkeys(r["model"] for r in results["rows"]):
        lines.append(f"| {kind} | dense | {by[kind, 'plain', 'dense', 0.0]:.2f} | "
                     f"{by[kind, 'outliers', 'dense', 0.0]:.2f} |")
        for method in METHODS:
            cells = [" / ".join(f"{by[kind, bed, method, s]:.2f}" for s in SPARSITIES) for bed in ("plain", "outliers")]
            lines.append(f"| {kind} | {method} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import bench
    import model as M
    if not os.path.isdir(bench.SHARED):
        print(f"outliers.py needs ../shared/data, absent at {bench.SHARED}; nothing to do.")
        sys.exit(0)
    results = {"date": str(date.today()), "command": "python bench/outliers.py", "machine": bench.machine(),
               "channels": CHANNELS, "k": K, "rows": [r for kind in bench.FIXTURES for r in rows(kind)]}
    M.save_json(results, os.path.join(HERE, "outliers_results.json"))
    print(table(results))
