"""
Peak resident memory and time of loading a synthetic ~1 GB bf16 safetensors LLaMA with model.load_model.

    python bench/load_bench.py        # prints one JSON line; writes bench/load_results.json
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# ~536M parameters: 1.07 GB in bf16
CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=16, bos_token_id=1, eos_token_id=2)


def write_checkpoint(folder):
    import torch
    import model as M
    cfg = M.config_from_dict(CONFIG)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.build_model(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {hf: torch.randn(shapes[key], generator=gen).to(torch.bfloat16)
               for key, hf in M.hf_name_map(cfg).items()}
    M.save_safetensors(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f)


def status_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(folder):
    """Run in a fresh process: RSS after importing torch, peak RSS while loading, and the load time."""
    import torch
    import model as M
    import prune
    before = status_bytes("VmRSS")
    t0 = time.time()
    model = M.load_model(folder, torch.bfloat16)
    seconds = time.time() - t0
    peak = status_bytes("VmHWM")
    params = prune.param_bytes(model)
    size = os.path.getsize(os.path.join(folder, "model.safetensors"))
    return {"file_bytes": size, "param_bytes": params, "rss_before_load": before, "peak_rss": peak,
            "load_seconds": round(seconds, 2), "peak_rss_over_file": round(peak / size, 3),
            "load_growth_over_file": round((peak - before) / size, 3)}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder)
        # measure in a fresh process, so that nothing of the writer's memory counts
        out = subprocess.run([sys.executable, __file__, "--measure", folder], check=True, capture_output=True,
                             text=True).stdout
    result = json.loads(out)
    with open(os.path.join(HERE, "load_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
