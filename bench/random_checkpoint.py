"""Random-weight checkpoints at a real model's shapes, for the tests' real-shape tier and the benchmarks."""

import os

import torch

from model import build_model, config_from_dict, hf_name_map, save_json, save_safetensors


def save_random(raw, out_dir, n_blocks, seed=0, dtype=torch.bfloat16):
    """A checkpoint folder with a real model's config.json but `n_blocks` decoder blocks and random weights
    (N(0, 0.02); norms near 1), sharded as real releases are: embeddings and head in one file, blocks in another.

    Real tensor sizes at a fraction of the disk: for tests and benchmarks at the shapes users bring.
    """
    raw = dict(raw, num_hidden_layers=n_blocks)
    cfg = config_from_dict(raw)
    with torch.device("meta"):
        shapes = {key: t.shape for key, t in build_model(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards = ({}, {})
    for key, hf in hf_name_map(cfg).items():
        t = torch.empty(shapes[key], dtype=dtype).normal_(0, 0.02, generator=gen)  # drawn in dtype: no fp32 copy
        if "norm" in key and key.endswith("weight"):
            t.add_(1)
        shards[key.startswith("blocks.")][hf] = t
    os.makedirs(out_dir, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_safetensors(tensors, os.path.join(out_dir, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for sh in shards for t in sh.values())},
             "weight_map": {hf: name for name, sh in zip(names, shards) for hf in sh}}
    save_json(index, os.path.join(out_dir, "model.safetensors.index.json"))
    save_json(raw, os.path.join(out_dir, "config.json"))
    return out_dir
