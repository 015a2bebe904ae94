"""
Our Wanda and SparseGPT against the reference algorithms' code, as llm-compressor carries it (ports of the
authors' repositories: the same statistics, masks and OBS updates, and the same block-by-block pipeline).

llm-compressor is not a dependency of this project, and it pins its own transformers: install it in a virtual
environment of its own, e.g. `python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install
llmcompressor==0.14.0.1` (our code does not use transformers), then

    /tmp/llmc/bin/python bench/reference_check.py [OUT.json]

(`make references` does both.)

Layers: its files wanda_sparsify.py and sgpt_sparsify.py on the same calibration batches as prune.prune_layer.
Theirs accumulate the reference's statistics (||X_j||^2 and H averaged per sample), ours prune.InputStats (per
token); both scalings cancel in the masks and updates. One deliberate difference: the reference's SparseGPT
prunes int(count * s) + 1 weights per lazy batch (a `<=` on the threshold), ours exactly int(count * s); so the
reference runs at the sparsity at which it prunes our count.

Whole model: its `oneshot` (sequential pipeline: each block calibrated on the outputs of the blocks already
pruned) on a random 3-block transformers LLaMA and OPT, against prune.prune_model on the same checkpoint and windows.

Printed per case: the share of weights whose kept/pruned state differs, and the largest difference between the
pruned weights.
"""

import functools
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import prune  # noqa: E402


@functools.cache
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


def linear(W):
    """A Linear without bias holding a copy of W (out, in): what both programs prune."""
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    return lin


def ours(method, W, batches, sparsity):
    stats = prune.InputStats(W.shape[1], hessian=method == "sparsegpt", device="cpu")
    for x in batches:
        stats.add(x)
    with torch.no_grad():
        return prune.prune_layer(method, linear(W), stats, sparsity, prune.PruneConfig()).weight.detach().clone()


def theirs(method, W, batches, sparsity, blocksize=128):
    """The reference's pruned W, and its statistic (||X_j||^2 per sample, or H)."""
    lin = linear(W)
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


def pipeline(family, method, sparsity, root):
    """(mask mismatch, max weight difference) over every block Linear: llm-compressor's oneshot on a random
    transformers LLaMA or OPT of 3 blocks against prune.prune_model on the same checkpoint and 8 windows of 32
    tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network
    import datasets
    import tokenizers
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    import model as M
    torch.manual_seed(0)
    size = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size, intermediate_size=128,
                                                                     num_key_value_heads=2))
    else:
        ref = transformers.OPTForCausalLM(transformers.OPTConfig(**size, ffn_dim=128, word_embed_proj_dim=64))
    with torch.no_grad():  # off the initial values, so that every layer's statistics matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = os.path.join(root, "ckpt")
    ref.save_pretrained(ckpt)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    windows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    processor = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0")
    nm = isinstance(sparsity, tuple)
    s = 0.5 if nm else sparsity
    if method == "sparsegpt" and not nm:  # every layer's lazy batch holds 64 x 64 or 128 x 64 weights
        s = reference_sparsity(sparsity, 128 * 64)
        assert all(int(n * s) + 1 == int(n * sparsity) for n in (64 * 64, 128 * 64)), "no one reference sparsity"
    kind = WandaPruningModifier if method == "wanda" else SparseGPTModifier
    modifier = kind(sparsity=s, mask_structure=f"{sparsity[0]}:{sparsity[1]}" if nm else "0:0",
                    targets=["re:.*layers\\.\\d+\\..*(proj|fc1|fc2)$"], ignore=["re:.*lm_head"])
    ref = type(ref).from_pretrained(ckpt, dtype=torch.float32)
    oneshot(model=ref, processor=processor, dataset=windows, recipe=[modifier], num_calibration_samples=8,
            max_seq_length=32, pipeline="sequential", batch_size=1, shuffle_calibration_samples=False)
    ours = prune.prune_model(M.load_model(ckpt), method, sparsity, ids, "cpu", prune.PruneConfig(batch_size=1))
    theirs, mine, names = ref.state_dict(), ours.state_dict(), M.hf_name_map(ours.cfg)
    keys = [f"blocks.{i}.{n}.weight" for i, block in enumerate(ours.blocks) for n in block.linears()]
    assert len(keys) == 3 * (7 if family == "llama" else 6)
    flat = lambda sd, name: torch.cat([sd[name(k)].reshape(-1) for k in keys])  # noqa: E731
    return differ(flat(mine, lambda k: k), flat(theirs, names.get))


def main(out=None):
    import tempfile
    layers, models = [], []
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
                layers.append(case)
                print(f"{str(shape):12} {method:10} {str(case['sparsity']):5} "
                      + "  ".join(f"{k}: mask {v[0]:.1e}, weights {v[1]:.1e}" for k, v in case.items()
                                  if k.startswith("from")))
    for family in ("llama", "opt"):
        for method, sparsities in (("wanda", (0.5, 0.7, (2, 4))), ("sparsegpt", (0.5, (2, 4)))):
            for s in sparsities:
                with tempfile.TemporaryDirectory() as root:
                    mask, weights = pipeline(family, method, s, root)
                models.append({"family": family, "method": method, "sparsity": prune.format_sparsity(s),
                               "mask_mismatch": mask, "max_weight_diff": weights})
                print(f"3-block {family:5} {method:10} {str(prune.format_sparsity(s)):5} mask {mask:.1e}, "
                      f"weights {weights:.1e}")
    if out:
        with open(out, "w") as f:
            json.dump({"pairs": "[share of weights whose kept/pruned state differs, max |W_ours - W_ref|]",
                       "layers": layers, "models": models}, f, indent=2)
    return layers, models


if __name__ == "__main__":
    main(*sys.argv[1:2])
