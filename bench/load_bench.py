"""
Loading at real sizes, and the elastic file's size there: for each configs/NAME.json, a checkpoint with the
real config and ONE decoder block of random bf16 weights (sharded, as real releases are) is written, then a
fresh process loads it with model.load_model and saves one block's elastic record (G = 7 groups, rank 8:
the paper's settings; the file's size depends only on the shapes). Then the whole model's elastic file (one
such record per block of the real model: 3 GB for LLaMA-2-70B) is written with run.save and read back with
run.load_elastic, every checksum verified.

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
NAMES = ("llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "llama-3.2-1b", "opt-1.3b",
         "llama-2-70b")


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


def measure(folder, n_blocks):
    """Run in a fresh process: RSS after importing torch, peak RSS while loading, the load time, the size of
    one block's elastic record as epts.py saves it, and the size, save and load time of an elastic file of
    `n_blocks` such records."""
    import torch
    import epts
    import run
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
    rec = run.checked(epts.block_record(layers, True, norms, [0.0] * 10))
    run.save(rec, os.path.join(folder, "block.pt"))
    block_bytes = 2 * sum(p.numel() for p in block.parameters())
    del model, block, layers
    # distinct copies: torch.save would store one storage shared by every record only once
    copy = lambda r: {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v  # noqa: E731
                      for k, v in r.items()}
    elastic = {"format": run.FORMAT, "blocks": [copy(rec) for _ in range(n_blocks)]}
    elastic["sha256"] = run.file_checksum(elastic)
    path = os.path.join(folder, "elastic.pt")
    t0 = time.time()
    run.save(elastic, path)
    save_seconds = time.time() - t0
    del elastic
    t0 = time.time()
    loaded = run.load_elastic(path)
    load_elastic_seconds = time.time() - t0
    assert len(loaded["blocks"]) == n_blocks and all(torch.equal(b["B"][n], t) for b in loaded["blocks"][-1:]
                                                      for n, t in rec["B"].items())
    return {"file_bytes": files, "rss_before_load": before, "peak_rss": peak, "load_seconds": round(seconds, 2),
            "load_growth_over_file": round((peak - before) / files, 3),
            "elastic_file_bytes": os.path.getsize(path), "elastic_save_seconds": round(save_seconds, 2),
            "elastic_load_seconds": round(load_elastic_seconds, 2),
            "elastic_block_bytes": os.path.getsize(os.path.join(folder, "block.pt")),
            "block_bytes": block_bytes}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
        return
    import model as M
    from random_checkpoint import save_random
    results = {}
    for name in NAMES:
        with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
            raw = json.load(f)
        with tempfile.TemporaryDirectory() as folder:
            save_random(raw, folder, n_blocks=1)
            # measure in a fresh process, so that nothing of the writer's memory counts
            out = subprocess.run([sys.executable, __file__, "--measure", folder, str(raw["num_hidden_layers"])],
                                 check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        model_bytes = full_model_bytes(raw)
        r["elastic_over_block"] = round(r["elastic_block_bytes"] / r["block_bytes"], 4)
        r["elastic_over_model"] = round(r["elastic_file_bytes"] / model_bytes, 4)
        results[name] = r
        print(f"{name:14s} file {r['file_bytes'] / 2**30:5.2f} GiB  load {r['load_seconds']:5.2f} s  peak RSS "
              f"{r['peak_rss'] / 2**30:5.2f} GiB (+{r['load_growth_over_file']:.2f}x the file)  elastic/block "
              f"{100 * r['elastic_over_block']:.2f} %  elastic/model {100 * r['elastic_over_model']:.2f} % "
              f"({r['elastic_file_bytes'] / 2**30:.2f} GiB: saved {r['elastic_save_seconds']:.1f} s, loaded and "
              f"checked {r['elastic_load_seconds']:.1f} s)",
              flush=True)
    M.save_json(results, os.path.join(HERE, "load_results.json"))


if __name__ == "__main__":
    main()
