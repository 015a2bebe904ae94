"""
The README's peak-memory formula for EPTS, block by block: evaluated for LLaMA-7B, and checked against a
measurement on a smaller shape on the CPU.

    python bench/memory_check.py      # prints both, in GB / MB

An EPTS block holds its weights, their ranks and the adapters throughout; on top of that comes either the
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


def epts_block_bytes(shape, batch=1):
    """Bytes of one EPTS block besides its own weights, by phase: {phase: {term: bytes}}. shape: {C, F, heads,
    kv_heads, N, T, G, r, elt} as SHAPE below."""
    C, F, heads, kv_heads, N, T, G, r, elt = (shape[k] for k in ("C", "F", "heads", "kv_heads", "N", "T", "G", "r",
                                                                 "elt"))
    kv = kv_heads * C // heads
    layers = [(C, C), (C, kv), (C, kv), (C, C), (C, F), (C, F), (F, C)]  # (in, out) of q k v o gate up down
    P = sum(i * o for i, o in layers)  # weights of the block
    adapters = 4 * G * r * sum(i + o for i, o in layers)  # fp32 A and B of every group
    stream = N * T * C * elt  # one (N, T, C) calibration stream
    largest = max(i * o for i, o in layers)  # weights of the largest layer
    activations = batch * T * (12 * C + 4 * F) * elt  # one batch through the block
    return {
        "throughout": {"ranks (int16)": 2 * P, "adapters (fp32)": adapters},
        "training": {"3 streams (dense in, target, pruned in)": 3 * stream,
                     "adapter gradients + Adam's two moments": 3 * adapters,
                     "saved for backward: bool mask + merged weight": P * (1 + elt),
                     "backward of the largest layer: dL/dW_eff, masked": 2 * elt * largest,
                     "activations of one batch": activations},
        "mixing": {"4 streams (+ mixed outputs)": 4 * stream,
                   "merged weight of the largest layer": elt * largest,
                   "activations of one batch": activations},
    }


def peak_bytes(terms):
    """The formula's peak: what is held throughout plus the larger phase."""
    return sum(terms["throughout"].values()) + max(sum(terms["training"].values()), sum(terms["mixing"].values()))


def print_terms(terms, unit, scale):
    for phase, parts in terms.items():
        for name, b in parts.items():
            print(f"  {phase + ': ' + name:<63} {b / scale:8.2f} {unit}")
    print(f"  {'formula peak = throughout + max(training, mixing)':<63} {peak_bytes(terms) / scale:8.2f} {unit}")


def measure():
    import torch
    import epts
    import model as M
    s = SHAPE
    cfg = M.config_from_dict(dict(model_type="llama", vocab_size=256, hidden_size=s["C"], intermediate_size=s["F"],
                                  num_hidden_layers=1, num_attention_heads=s["heads"],
                                  num_key_value_heads=s["kv_heads"]))
    torch.manual_seed(0)
    model = M.build_model(cfg).eval().requires_grad_(False)
    calib = torch.randint(0, 256, (s["N"], s["T"]))
    with tempfile.TemporaryDirectory() as out:  # a run on 2 x 8 tokens pages in torch's code and thread pools
        epts.run_epts(model, calib[:2, :8], out, epts.EPTSConfig(epochs=1))
    before = status_bytes("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    with tempfile.TemporaryDirectory() as out:
        elastic = epts.run_epts(model, calib, out, epts.EPTSConfig(epochs=1))
    kept = sum(t.numel() * t.element_size() for rec in elastic["blocks"] for k in ("act_norm", "A", "B")
               for t in rec[k].values())
    # what stays resident once run_epts has returned, beyond the elastic model it returns: no tensor holds it
    return {"rss_before": before, "peak": status_bytes("VmHWM"), "untracked": status_bytes("VmRSS") - before - kept}


def main():
    if sys.argv[1:] == ["--measure"]:
        print(json.dumps(measure()))
        return
    big = epts_block_bytes(LLAMA_7B)
    C, F, elt = LLAMA_7B["C"], LLAMA_7B["F"], LLAMA_7B["elt"]
    weights = elt * (4 * C * C + 3 * C * F)  # q k v o + gate up down
    print("LLaMA-7B, bf16, 128 x 2048 calibration, G = 7, r = 8 (estimate):")
    print_terms(big, "GB", 1e9)
    print(f"  {'+ the block itself (bf16)':<63} {weights / 1e9:8.2f} GB")
    no_streams = {ph: {n: b for n, b in parts.items() if "streams" not in n} for ph, parts in big.items()}
    print(f"  {'device peak, streams on the device':<63} {(weights + peak_bytes(big)) / 1e9:8.2f} GB")
    print(f"  {'device peak, streams in CPU memory':<63} {(weights + peak_bytes(no_streams)) / 1e9:8.2f} GB")
    terms = epts_block_bytes(SHAPE)
    print("\nsmall block on this CPU (C = 1024, F = 2816, 16 x 512 tokens, fp32), formula:")
    print_terms(terms, "MB", 1e6)
    for label, env in [("default malloc", {}), ("freed memory returned", {"MALLOC_MMAP_THRESHOLD_": "65536"})]:
        out = json.loads(subprocess.run([sys.executable, __file__, "--measure"], check=True, capture_output=True,
                                        text=True, env={**os.environ, **env}).stdout)
        growth = out["peak"] - out["rss_before"]
        print(f"  {'measured peak RSS growth, ' + label:<63} {growth / 1e6:8.2f} MB "
              f"({growth / peak_bytes(terms):.2f}x the formula; {out['untracked'] / 1e6:.1f} MB still resident "
              "after the run with no tensor holding it)")


if __name__ == "__main__":
    main()
