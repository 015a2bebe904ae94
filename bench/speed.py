"""
Real speed of a deployed sparse model: dense vs 2:4 semi-structured sparse (PyTorch's
`to_sparse_semi_structured`, sparse tensor cores of Ampere and later GPUs) at LLaMA-2-7B shapes, bf16.

    python bench/speed.py                  # needs a CUDA GPU; on a CPU-only machine it says so and exits
    python bench/speed.py --blocks 4 --tokens 2048

Reports tokens/s of each projection (q/k/v/o: 4096 x 4096, gate/up: 11008 x 4096, down: 4096 x 11008) and of a
forward through `--blocks` decoder blocks, with the weights' memory and the peak GPU memory, and writes
bench/speed_results.json. Unstructured sparsity (any fraction, as EPTS, Wanda and SparseGPT deploy by
default) stores zeros in dense tensors: dense kernels run at the same speed, so it buys nothing here.
"""

import argparse
import json
import os
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import model as M  # noqa: E402
import prune  # noqa: E402


def two_four(W):
    """W with the 2 smallest magnitudes of every 4 consecutive inputs zeroed (the 2:4 pattern)."""
    return W * prune.nm_mask(W.abs().float(), 2, 4)


def timed(fn, repeat=20):
    """Seconds per call of fn on the GPU, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def projections(cfg, tokens):
    """tokens/s of each distinct projection shape, dense and 2:4."""
    from torch.sparse import to_sparse_semi_structured
    C, Fd = cfg.hidden_size, cfg.intermediate_size
    rows = []
    for name, (out_f, in_f) in {"q/k/v/o": (C, C), "gate/up": (Fd, C), "down": (C, Fd)}.items():
        x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device="cuda")
        W = two_four(torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda") * 0.02)
        Ws = to_sparse_semi_structured(W)
        dense, sparse = timed(lambda: F.linear(x, W)), timed(lambda: F.linear(x, Ws))
        rows.append({"layer": name, "shape": [out_f, in_f], "dense_tok_s": tokens / dense,
                     "sparse_2_4_tok_s": tokens / sparse, "speedup": dense / sparse})
    return rows


def forward(cfg, n_blocks, tokens, sparse):
    """tokens/s and memory of a forward through n_blocks random blocks of the config's shapes."""
    from torch.sparse import to_sparse_semi_structured
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    blocks = [M.LlamaBlock(cfg).to("cuda", torch.bfloat16) for _ in range(n_blocks)]
    for block in blocks:
        for lin in block.linears().values():
            W = two_four(lin.weight.data.normal_(0, 0.02))
            lin.weight = torch.nn.Parameter(to_sparse_semi_structured(W) if sparse else W, requires_grad=False)
    weights = torch.cuda.memory_allocated()
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")

    def run():
        with torch.no_grad():
            h = x
            for block in blocks:
                h = block(h)
    seconds = timed(run, repeat=10)
    return {"tok_s": tokens / seconds, "weights_gib": weights / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "llama-2-7b.json"))
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/speed.py measures 2:4 sparse tensor cores and needs a CUDA GPU; none is visible here, "
              "so nothing was measured.")
        return
    with open(a.config) as f:
        cfg = M.config_from_dict(json.load(f))
    results = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "config": os.path.basename(a.config), "tokens": a.tokens, "blocks": a.blocks,
               "projections": projections(cfg, a.tokens),
               "forward": {"dense": forward(cfg, a.blocks, a.tokens, False),
                           "2:4": forward(cfg, a.blocks, a.tokens, True)}}
    with open(os.path.join(HERE, "speed_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for row in results["projections"]:
        print(f"{row['layer']:8} dense {row['dense_tok_s']:12.0f} tok/s  2:4 {row['sparse_2_4_tok_s']:12.0f} tok/s  "
              f"x{row['speedup']:.2f}")
    for kind, r in results["forward"].items():
        print(f"{a.blocks} blocks {kind:5}: {r['tok_s']:.0f} tok/s, weights {r['weights_gib']:.2f} GiB, "
              f"peak {r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
