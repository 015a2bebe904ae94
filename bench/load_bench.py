"""
Loading at real sizes, and the elastic file's size there: for each configs/NAME.json, a checkpoint with the
real config and ONE decoder block of random bf16 weights (sharded, as real releases are) is written, then a
fresh process loads it with model.load_model and saves one block's elastic record (G = 7 groups, rank 8:
the paper's settings; the file's size depends only on the shapes).

    python bench/load_bench.py        # prints a table; writes bench/load_results.json
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
NAMES = ("llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "llama-3.2-1b", "opt-1.3b")


def status_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def full_model_bytes(raw):
    """Bytes of the whole model (all its blocks) in bf16, from its config alone."""
    import torch
    import model as M
    with torch.device("meta"):
        return 2 * sum(p.numel() for p in M.build_model(M.config_from_dict(raw)).parameters())


def measure(folder):
    """Run in a fresh process: RSS after importing torch, peak RSS while loading, the load time, and the size
    of one block's elastic record as epts.py saves it."""
    import torch
    import epts
    import model as M
    before = status_bytes("VmRSS")
    t0 = time.time()
    model = M.load_model(folder, torch.bfloat16)
    seconds = time.time() - t0
    peak = status_bytes("VmHWM")
    files = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    block = model.blocks[0]
    norms = {name: torch.ones(lin.in_features) for name, lin in block.linears().items()}
    layers = epts.elastic_layers(block, norms, n_groups=7, rank=8)
    epts.save(epts.block_record(layers, True, norms, [0.0] * 10), os.path.join(folder, "block.pt"))
    return {"file_bytes": files, "rss_before_load": before, "peak_rss": peak, "load_seconds": round(seconds, 2),
            "load_growth_over_file": round((peak - before) / files, 3),
            "elastic_block_bytes": os.path.getsize(os.path.join(folder, "block.pt")),
            "block_bytes": 2 * sum(p.numel() for p in block.parameters())}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    import model as M
    results = {}
    for name in NAMES:
        with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
            raw = json.load(f)
        with tempfile.TemporaryDirectory() as folder:
            M.save_random(raw, folder, n_blocks=1)
            # measure in a fresh process, so that nothing of the writer's memory counts
            out = subprocess.run([sys.executable, __file__, "--measure", folder], check=True, capture_output=True,
                                 text=True).stdout
        r = json.loads(out)
        model_bytes = full_model_bytes(raw)
        r["elastic_over_block"] = round(r["elastic_block_bytes"] / r["block_bytes"], 4)
        # every block of the real model has the same shapes, so its elastic file is n_blocks records of this size
        r["elastic_over_model"] = round(raw["num_hidden_layers"] * r["elastic_block_bytes"] / model_bytes, 4)
        results[name] = r
        print(f"{name:14s} file {r['file_bytes'] / 2**30:5.2f} GiB  load {r['load_seconds']:5.2f} s  peak RSS "
              f"{r['peak_rss'] / 2**30:5.2f} GiB (+{r['load_growth_over_file']:.2f}x the file)  elastic/block "
              f"{100 * r['elastic_over_block']:.2f} %  elastic/model {100 * r['elastic_over_model']:.2f} %",
              flush=True)
    with open(os.path.join(HERE, "load_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
