"""
EPTS speed and memory on a GPU at real shapes: a random bf16 checkpoint with a real model's config.json and
`--blocks` decoder blocks, one EPTS optimisation over it, measured.

    python bench/gpu.py                              # LLaMA-2-7B and LLaMA-3.1-8B shapes, cuda, bf16
    python bench/gpu.py --configs llama-2-7b --offload
    python bench/gpu.py --configs llama-2-70b --offload --blocks 1   # a 70B block's peak memory
    python bench/gpu.py --configs llama-2-7b --profile 3   # and where 3 steps' time goes, operator by operator

Reports per model shape: the time of one training step (G groups, forward + backward of one block, batch 1),
the matrix-product bound of that step (6 T P FLOPs per group, P = the block's prunable weights, at the bf16
throughput measured here on a T x C x F product) and the step's ratio to it, the time of one block (every
step of an `--epochs` x `--nsamples` run plus the no-gradient passes), the peak GPU memory (measured, and with
the real model's other blocks added: their weights, unless --offload keeps them in CPU memory), and the
extrapolated time of a full run (10 epochs, 128 x 2048, every block of the real model). Writes
bench/gpu_results.json. `--device cpu` runs the same measurements on the CPU (slowly: use a small
`--seqlen`); the tests run it so on a tiny config.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from datetime import date

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import run  # noqa: E402
import epts  # noqa: E402
import model as M  # noqa: E402
import prune  # noqa: E402
from random_checkpoint import save_random  # noqa: E402


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(T, C, F, device, dtype):
    """Measured throughput of a (T, C) x (C, F) product, the block's largest, in TFLOP/s."""
    a, b = torch.randn(T, C, device=device, dtype=dtype), torch.randn(C, F, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * T * C * F * n / (time.perf_counter() - t0) / 1e12


def profile_steps(block, layers, streams, config, steps, rows=25):
    """The operators of `steps` training steps (batch 1, one epoch) by their own time on the block's device (the
    CPU's where it runs) — the table that shows where a step's time goes beside the matrix products — and how
    often the CPU waited for the GPU (CUDA *Synchronize calls; one is the epoch's loss, read at its end).
    streams = (X, Y) as train_block's."""
    from torch.profiler import ProfilerActivity, profile
    (X, Y), cuda = streams, prune.device_of(block).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    one_epoch = dataclasses.replace(config, epochs=1, batch_size=1)
    with profile(activities=activities) as prof:  # the loss read at the epoch's end waits for every step
        epts.train_block(block, layers, (X[:steps], Y[:steps]), one_epoch, torch.Generator().manual_seed(1))
    ops = prof.key_averages()
    syncs = sum(e.count for e in ops if "Synchronize" in e.key) if cuda else None
    return ops.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows), syncs


def full_model_peak(peak_gib, n_layers, blocks, block_bytes, offload):
    """The peak GPU memory of the real model's run, from the measured one of a `blocks`-block checkpoint: without
    --offload the other n_layers - blocks blocks sit on the device too (weights only: they are not being
    computed); with it they are in CPU memory and add nothing."""
    if peak_gib is None:
        return None
    return peak_gib + (0 if offload else (n_layers - blocks) * block_bytes / 2**30)


def measure(raw, args):
    """One shape: a random checkpoint, then the step, the block and the whole run's figures."""
    device, dtype = args.device, getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as ckpt:
        save_random(raw, ckpt, args.blocks)
        model = M.load_model(ckpt, dtype).to("cpu" if args.offload else device)
    cfg, T, G = model.cfg, args.seqlen, len(epts.EPTSConfig.edges) - 1
    P = sum(lin.weight.numel() for lin in model.blocks[0].linears().values())
    calib = torch.randint(0, cfg.vocab_size, (args.nsamples, T), generator=torch.Generator().manual_seed(0))
    config = epts.EPTSConfig(epochs=args.epochs)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        sync(device)
        t0 = time.perf_counter()
        run.run_epts(model, calib, out, config, device)
        sync(device)
        run_seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else None
    peak_full = full_model_peak(peak, raw["num_hidden_layers"], args.blocks, prune.param_bytes(model.blocks[0]),
                                args.offload)
    # one block's training steps alone, timed over the same settings
    block = model.blocks[0].to(device)
    X = prune.embed_calibration(model, calib, device, 1, n_streams=2, reserve_bytes=0)
    stats = prune.new_stats(block, hessian=False, device=device)
    Y = prune.run_block(block, X, device, 1, stats)
    layers = epts.elastic_layers(block, {n: s.act_norm for n, s in stats.items()}, G, config.rank)
    sync(device)
    t0 = time.perf_counter()
    epts.train_block(block, layers, (X, Y), config, torch.Generator().manual_seed(0))
    sync(device)
    steps = args.epochs * args.nsamples
    step = (time.perf_counter() - t0) / steps
    tflops = matmul_tflops(T, cfg.hidden_size, cfg.intermediate_size, device, dtype)
    bound = 6 * T * P * G / (tflops * 1e12)
    table, syncs = profile_steps(block, layers, (X, Y), config, args.profile) if args.profile else (None, None)
    per_block = run_seconds / args.blocks
    # the full run: 10 epochs x 128 windows of training steps per block; the no-gradient passes scale with the
    # windows (128 / nsamples), and there are num_hidden_layers blocks
    other = max(per_block - steps * step, 0.0)
    full_block = 10 * 128 * step + other * 128 / args.nsamples
    return {"config": raw.get("_name"), "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "seqlen": T, "dtype": args.dtype, "groups": G, "step_ms": 1e3 * step, "bound_ms": 1e3 * bound,
            "ratio": bound / step,
            "matmul_tflops": tflops, "block_s": per_block, "peak_gib": peak,
            "peak_full_model_gib": peak_full,
            "full_run_min": full_block * raw["num_hidden_layers"] / 60, "blocks": args.blocks,
            "epochs": args.epochs, "nsamples": args.nsamples, "offload": args.offload, "profile": table,
            "profile_steps": args.profile, "profile_syncs": syncs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama-2-7b,llama-3.1-8b", help="names in configs/, or paths")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=128,
                   help="windows of the measured run; 128, the full run's, makes its streams and so its peak memory "
                        "the full run's")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many training steps and print the operators' table (0: none)")
    p.add_argument("--out", default=os.path.join(HERE, "gpu_results.json"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU is visible, so nothing was measured (--device cpu runs it on the CPU).")
        return None
    rows = []
    for name in args.configs.split(","):
        path = name if os.path.isfile(name) else os.path.join(ROOT, "configs", f"{name}.json")
        with open(path) as f:
            raw = dict(json.load(f), _name=name)
        rows.append(measure(raw, args))
        r = rows[-1]
        peak = ("not measured (CPU)" if r["peak_gib"] is None else
                f"{r['peak_gib']:.1f} GiB ({r['peak_full_model_gib']:.1f} GiB with every block of the model)")
        print(f"{name}: step {r['step_ms']:.1f} ms, bound {r['bound_ms']:.1f} ms (ratio {r['ratio']:.2f}, "
              f"{r['matmul_tflops']:.1f} TFLOP/s), block {r['block_s']:.1f} s, peak {peak}, "
              f"full run ~{r['full_run_min']:.1f} min", flush=True)
        if r["profile"]:
            print(r["profile"], flush=True)
        if r["profile_syncs"] is not None:
            print(f"{name}: the CPU waited for the GPU {r['profile_syncs']} times in {args.profile} profiled steps "
                  f"(1 is the epoch's loss)", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"date": str(date.today()), "device": device, "torch": torch.__version__,
               "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    M.save_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
