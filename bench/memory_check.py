"""
The peak-memory formula of bench/README.md ("Scale") for EPTS, block by block: evaluated for LLaMA-7B and
LLaMA-2-70B, and checked against measurements on the CPU: a small fp32 block, and one bf16 block of
LLaMA-2-70B's shapes with short windows.

    python bench/memory_check.py              # the formula, and the small block measured (a minute)
    python bench/memory_check.py --llama-70b  # also the 70B-shaped block measured (8 GB of RAM, 4 minutes)

An EPTS block holds its weights, their per-row Wanda order and the adapters throughout; on top of that comes either the
training phase (three streams and autograd's state) or the mixing phase (four streams, no gradients), so
the peak is the larger of the two.

Resident memory over-reports live tensors: glibc keeps freed heap memory for reuse, and its mmap threshold
grows after large frees, so later large tensors come from that heap too. The second measurement fixes the
threshold (MALLOC_MMAP_THRESHOLD_), so every large tensor is its own mapping, returned when freed; that is
the closer analogue of torch.cuda.max_memory_allocated on a GPU.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from load_bench import status_bytes  # noqa: E402

SHAPE = dict(C=1024, F=2816, heads=16, kv_heads=4, N=16, T=512, G=7, r=8, elt=4)  # float32 on the CPU
LLAMA_7B = dict(C=4096, F=11008, heads=32, kv_heads=32, N=128, T=2048, G=7, r=8, elt=2)  # bf16, 128 x 2048
LLAMA_70B = dict(C=8192, F=28672, heads=64, kv_heads=8, N=128, T=2048, G=7, r=8, elt=2)  # LLaMA-2-70B's block
LLAMA_70B_SHORT = dict(LLAMA_70B, N=2, T=128)  # the same block with two 128-token windows: measurable here


def layer_shapes(shape):
    """(in, out) of the block's q k v o gate up down, for shape {C, F, heads, kv_heads, ...}."""
    C, F = shape["C"], shape["F"]
    kv = shape["kv_heads"] * C // shape["heads"]
    return [(C, C), (C, kv), (C, kv), (C, C), (C, F), (C, F), (F, C)]


def epts_block_bytes(shape, batch=1):
    """Bytes of one EPTS block besides its own weights, by phase: {phase: {term: bytes}}. shape: {C, F, heads,
    kv_heads, N, T, G, r, elt} as SHAPE below."""
    C, F, N, T, G, r, elt = (shape[k] for k in ("C", "F", "N", "T", "G", "r", "elt"))
    layers = layer_shapes(shape)
    P = sum(i * o for i, o in layers)  # weights of the block
    adapters = 4 * G * r * sum(i + o for i, o in layers)  # fp32 A and B of every group
    stream = N * T * C * elt  # one (N, T, C) calibration stream
    largest = max(i * o for i, o in layers)  # weights of the largest layer
    activations = batch * T * (12 * C + 4 * F) * elt  # one batch through the block
    return {
        "throughout": {"order (int16)": 2 * P, "adapters (fp32)": adapters},
        "training": {"3 streams (dense in, target, pruned in)": 3 * stream,
                     "adapter gradients + Adam's two moments": 3 * adapters,
                     "saved for backward: bool mask + merged weight": P * (1 + elt),
                     "backward of the largest layer: dL/dW_eff, masked": 2 * elt * largest,
                     "activations of one batch": activations},
        "mixing": {"4 streams (+ mixed outputs)": 4 * stream,
                   "merged weight of the largest layer": elt * largest,
                   "activations of one batch": activations},
    }


def sslc_layer_bytes(out_f, in_f, r):
    """Bytes prune.sslc_prune holds for one layer beside the model at its peak, the sparsify step: seven 4-byte
    out x in buffers (W D, the best S so far, the residual, the scores, the new S, and lowest_k's k-th value
    selection and int32 tie count), four bool masks (the top 1 %, below, tied, kept), U and V, and svd_lowrank's
    (out + in) x (r + 10) bases."""
    return {"7 out x in 4-byte buffers": 7 * 4 * out_f * in_f, "4 bool masks": 4 * out_f * in_f,
            "U and V": 4 * r * (out_f + in_f), "randomized SVD bases": 2 * 4 * (r + 10) * (out_f + in_f)}


def peak_bytes(terms):
    """The formula's peak: what is held throughout plus the larger phase."""
    return sum(terms["throughout"].values()) + max(sum(terms["training"].values()), sum(terms["mixing"].values()))


def print_terms(terms, unit, scale):
    for phase, parts in terms.items():
        for name, b in parts.items():
            print(f"  {phase + ': ' + name:<63} {b / scale:8.2f} {unit}")
    print(f"  {'formula peak = throughout + max(training, mixing)':<63} {peak_bytes(terms) / scale:8.2f} {unit}")


def block_model(shape, dtype):
    """A one-block LLaMA of `shape` (random weights, vocabulary 256) in `dtype`."""
    import torch
    import model as M
    cfg = M.config_from_dict(dict(model_type="llama", vocab_size=256, hidden_size=shape["C"],
                                  intermediate_size=shape["F"], num_hidden_layers=1,
                                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"]))
    torch.manual_seed(0)
    return M.build_model(cfg).to(dtype).eval().requires_grad_(False)


def measure(shape):
    """Peak resident-memory growth of one EPTS run (one epoch) over a block of `shape`, in a fresh process."""
    import torch
    import epts
    import run
    dtype = torch.float32 if shape["elt"] == 4 else torch.bfloat16
    with tempfile.TemporaryDirectory() as out:  # a run on 2 x 8 tokens pages in torch's code and thread pools
        run.run_epts(block_model(SHAPE, dtype), torch.randint(0, 256, (2, 8)), out, epts.EPTSConfig(epochs=1))
    model = block_model(shape, dtype)
    calib = torch.randint(0, 256, (shape["N"], shape["T"]))
    before = status_bytes("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    with tempfile.TemporaryDirectory() as out:
        elastic = run.run_epts(model, calib, out, epts.EPTSConfig(epochs=1))
    kept = sum(t.numel() * t.element_size() for rec in elastic["blocks"] for k in ("act_norm", "A", "B")
               for t in rec[k].values())
    # what stays resident once run_epts has returned, beyond the elastic model it returns: no tensor holds it
    return {"rss_before": before, "peak": status_bytes("VmHWM"), "untracked": status_bytes("VmRSS") - before - kept}


def print_measured(shape, label, env):
    """measure(shape) in a fresh process with `env`, against the formula."""
    out = json.loads(subprocess.run([sys.executable, __file__, "--measure", json.dumps(shape)], check=True,
                                    capture_output=True, text=True, env={**os.environ, **env}).stdout)
    growth, formula = out["peak"] - out["rss_before"], peak_bytes(epts_block_bytes(shape))
    print(f"  {'measured peak RSS growth, ' + label:<63} {growth / 1e6:8.2f} MB "
          f"({growth / formula:.2f}x the formula; {out['untracked'] / 1e6:.1f} MB still resident "
          "after the run with no tensor holding it)", flush=True)


def print_device_peak(name, shape):
    """The formula for one block of a real model on a GPU: streams on the device, or in CPU memory."""
    terms = epts_block_bytes(shape)
    weights = shape["elt"] * sum(i * o for i, o in layer_shapes(shape))
    print(f"{name}, bf16, {shape['N']} x {shape['T']} calibration, G = {shape['G']}, r = {shape['r']} (estimate):")
    print_terms(terms, "GB", 1e9)
    print(f"  {'+ the block itself (bf16)':<63} {weights / 1e9:8.2f} GB")
    no_streams = {ph: {n: b for n, b in parts.items() if "streams" not in n} for ph, parts in terms.items()}
    print(f"  {'device peak, streams on the device':<63} {(weights + peak_bytes(terms)) / 1e9:8.2f} GB")
    print(f"  {'device peak, streams in CPU memory':<63} {(weights + peak_bytes(no_streams)) / 1e9:8.2f} GB")


def main():
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    print_device_peak("LLaMA-7B", LLAMA_7B)
    print_device_peak("\nLLaMA-2-70B", LLAMA_70B)
    print("\nSSLC, one LLaMA-2-7B gate_proj (11008 x 4096) at 0.5, rank ratio 0.25 (r = 373), float32:")
    terms = sslc_layer_bytes(11008, 4096, 373)
    for name, b in terms.items():
        print(f"  {name:<63} {b / 1e9:8.2f} GB")
    print(f"  {'peak beside the model':<63} {sum(terms.values()) / 1e9:8.2f} GB")
    returned = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    print("\nsmall block on this CPU (C = 1024, F = 2816, 16 x 512 tokens, fp32), formula:")
    print_terms(epts_block_bytes(SHAPE), "MB", 1e6)
    for label, env in [("default malloc", {}), ("freed memory returned", returned)]:
        print_measured(SHAPE, label, env)
    if "--llama-70b" in sys.argv:
        print("\nLLaMA-2-70B's block on this CPU (bf16, 2 x 128 tokens), formula:")
        print_terms(epts_block_bytes(LLAMA_70B_SHORT), "MB", 1e6)
        print_measured(LLAMA_70B_SHORT, "freed memory returned", returned)


if __name__ == "__main__":
    main()
