"""
Our Wanda and SparseGPT layers against the reference algorithms' code, as llm-compressor carries it (a port of
the authors' repositories: the same statistics, masks and OBS updates).

llm-compressor is not a dependency of this project, and its own dependencies would replace transformers: install
it alone beside the project, e.g. `python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install
--no-deps llmcompressor==0.14.0.1 loguru`, then

    /tmp/llmc/bin/python bench/reference_check.py [OUT.json]

Only its two files wanda_sparsify.py and sgpt_sparsify.py are loaded (not the package). Each layer gets the same
calibration batches: theirs accumulate the reference's statistics (||X_j||^2 and H averaged per sample), ours
prune.InputStats (per token); both scalings cancel in the masks and updates. One deliberate difference: the
reference's SparseGPT prunes int(count * s) + 1 weights per lazy batch (a `<=` on the threshold), ours exactly
int(count * s); so the reference runs at the sparsity at which it prunes our count. Printed per case: the share
of weights whose kept/pruned state differs, and the largest difference between the pruned weights, each method
from its own statistics and SparseGPT also from the reference's H.
"""

import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import prune  # noqa: E402


def reference(name):
    """llm-compressor's file modifiers/pruning/{name}, loaded as a module of its own."""
    root = importlib.util.find_spec("llmcompressor").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "modifiers", "pruning", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibration(n_in, n_samples=16, T=64, seed=0):
    """Correlated inputs (n_samples, T, in), with a few loud channels as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=gen) / n_in ** 0.5
    X = torch.randn(n_samples, T, n_in, generator=gen) @ mix
    X[..., :4] *= 10
    return X


def ours(method, W, batches, sparsity):
    stats = prune.InputStats(W.shape[1], hessian=method == "sparsegpt", device="cpu")
    for x in batches:
        stats.add(x)
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    with torch.no_grad():
        return prune.prune_layer(method, lin, stats, sparsity, prune.PruneConfig()).weight.detach().clone()


def theirs(method, W, batches, sparsity, blocksize=128):
    """The reference's pruned W, and its statistic (||X_j||^2 per sample, or H)."""
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    n, m = sparsity if isinstance(sparsity, tuple) else (0, 0)
    pruned = m - n if m else 0  # the reference's prune_n counts the weights pruned of every m
    if method == "wanda":
        ref = reference("wanda/wanda_sparsify.py")
        S, count = ref.make_empty_row_scalars(lin), 0
        for x in batches:
            S, count = ref.accumulate_row_scalars(x, lin, S, count)
        return ref.sparsify_weight(lin, {lin: S.clone()}, 0.0 if m else sparsity, pruned, m), S
    ref = reference("sparsegpt/sgpt_sparsify.py")
    H, count = ref.make_empty_hessian(lin), 0
    for x in batches:
        H, count = ref.accumulate_hessian(x, lin, H, count)
    s = 0.0 if m else reference_sparsity(sparsity, W.shape[0] * blocksize)
    return ref.sparsify_weight(lin, {lin: H.clone()}, s, pruned, m, blocksize, 0.01, False)[1], H


def reference_sparsity(sparsity, numel):
    """The sparsity at which the reference's `<=` on its threshold, which prunes int(numel * s) + 1 of a lazy
    batch's numel weights, prunes our int(numel * sparsity)."""
    return (int(numel * sparsity) - 1 + 0.5) / numel


def differ(a, b):
    """(share of weights kept by one and pruned by the other, largest |a - b|)."""
    return ((a == 0) != (b == 0)).float().mean().item(), (a - b).abs().max().item()


def main(out=None):
    cases = []
    for shape in ((96, 256), (512, 1024)):
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
        batches = calibration(shape[1]).split(4)  # 4 batches of 4 windows
        for method in ("wanda", "sparsegpt"):
            for s in (0.5, 0.7, (2, 4), (4, 8)):
                ref, stat = theirs(method, W, batches, s)
                case = {"shape": list(shape), "method": method, "sparsity": prune.format_sparsity(s),
                        "max_abs_W": W.abs().max().item(),
                        "from_own_statistics": differ(ours(method, W, batches, s), ref)}
                if method == "sparsegpt":  # the reference's own H: what remains is the algorithm alone
                    case["from_the_reference_H"] = differ(prune.sparsegpt_prune(W, stat.clone(), s), ref)
                cases.append(case)
                print(f"{str(shape):12} {method:10} {str(case['sparsity']):5} "
                      + "  ".join(f"{k}: mask {v[0]:.1e}, weights {v[1]:.1e}" for k, v in case.items()
                                  if k.startswith("from")))
    if out:
        with open(out, "w") as f:
            json.dump({"pairs": "[share of weights whose kept/pruned state differs, max |W_ours - W_ref|]",
                       "cases": cases}, f, indent=2)
    return cases


if __name__ == "__main__":
    main(*sys.argv[1:2])
