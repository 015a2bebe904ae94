"""
Check the README's peak-memory formula for one EPTS block against a measurement on a smaller shape (CPU).

    python bench/memory_check.py      # prints formula vs measured growth of resident memory, in MB
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPE = dict(C=1024, F=2816, heads=16, kv_heads=4, N=16, T=512, G=7, r=8, elt=4)  # float32 on the CPU


def epts_block_bytes(C, F, heads, kv_heads, N, T, G, r, elt, batch=1):
    """The README's terms for one block under EPTS, besides the block's own weights: bytes by term."""
    kv = kv_heads * C // heads
    layers = [(C, C), (C, kv), (C, kv), (C, C), (C, F), (C, F), (F, C)]  # (in, out) of q k v o gate up down
    P = sum(i * o for i, o in layers)
    return {
        "ranks (int16)": 2 * P,
        "adapters + grads + Adam (fp32)": 4 * 4 * G * r * sum(i + o for i, o in layers),
        "saved mask + merged weight": P * (1 + elt),
        "transient fp32 merge of the largest layer": 12 * max(i * o for i, o in layers),
        "activations of one window": batch * T * (12 * C + 4 * F) * elt,
        "streams (dense in, target, pruned in, mixed out)": 4 * N * T * C * elt,
    }


def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


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
    model(calib[:1, :8])  # start torch's thread pools before the baseline
    before = status_bytes("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        epts.run_epts(model, calib, out, epochs=1)
    return {"rss_before": before, "peak": status_bytes("VmHWM")}


def main():
    if sys.argv[1:] == ["--measure"]:
        print(json.dumps(measure()))
        return
    terms = epts_block_bytes(**SHAPE)
    out = json.loads(subprocess.run([sys.executable, __file__, "--measure"], check=True, capture_output=True,
                                    text=True).stdout)
    for name, b in terms.items():
        print(f"{name:<50} {b / 1e6:8.1f} MB")
    print(f"{'formula total':<50} {sum(terms.values()) / 1e6:8.1f} MB")
    print(f"{'measured: peak RSS growth during run_epts':<50} {(out['peak'] - out['rss_before']) / 1e6:8.1f} MB")


if __name__ == "__main__":
    main()
