"""
EPTS: Elastic Post-Training Sparsity (Xu et al., KDD 2026), for LLaMA and OPT.

One block-wise optimisation yields an *elastic* model: the dense weights, one Wanda score per weight
(kept as activation norms) and G nested LoRA pairs per layer (MS-HiLoRA). Any sparsity in the
trained range is then deployed in seconds, without calibration data.

    python epts.py --ckpt PATH --sparsities 0.3,0.5,0.7
"""

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import data
import model as M
import prune
from eval import perplexity
from model import UserError

# the paper's seven groups over (0, 0.7]: group g covers (edges[g], edges[g+1]]
DEFAULT_EDGES = (0.0, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70)
FORMAT = "epts-elastic-v1"

# -----------------------------------------------------------------------------
# sparsity groups


def extend_edges(edges, max_sparsity, step=0.05):
    """Add groups in `step`s until the range covers `max_sparsity`."""
    edges = list(edges)
    while edges[-1] < max_sparsity - 1e-9:
        edges.append(round(edges[-1] + step, 10))
    if edges[-1] >= 1:
        raise UserError(f"sparsity {max_sparsity} needs groups reaching {edges[-1]} >= 1; choose a sparsity "
                        "below 1 or give --groups edges explicitly.")
    return edges


def group_of(edges, s):
    """The group g whose range (edges[g], edges[g+1]] holds s (s = 0 falls in group 0)."""
    for g in range(len(edges) - 1):
        if s <= edges[g + 1] + 1e-9:
            return g
    raise UserError(f"sparsity {s} is above the elastic model's range (up to {edges[-1]}); train a new elastic "
                    f"model with --sparsities including {s} (groups extend in 0.05 steps).")


def stratified_draws(lo, hi, n, gen):
    """n sparsities from (lo, hi]: the range cut into n equal intervals, shuffled, one uniform draw in each."""
    order = torch.randperm(n, generator=gen, dtype=torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return (lo + (order + 1 - u) * (hi - lo) / n).tolist()  # 1 - u in (0, 1]: never lo itself


def mixer_weights(n_groups):
    """MSFM weights: lower half of the groups 1, upper half 2, normalised (the paper's .1 x4, .2 x3 for G = 7)."""
    lower = (n_groups + 1) // 2
    w = torch.tensor([1.0] * lower + [2.0] * (n_groups - lower), dtype=torch.float64)
    return (w / w.sum()).tolist()


# -----------------------------------------------------------------------------
# MS-HiLoRA: a frozen Linear with G nested LoRA pairs


class ElasticLinear(nn.Module):
    """W_eff = (W + scale * sum_{k<=g} B_k A_k) ⊙ M_s (EPTS, MS-HiLoRA); the mask keeps the merged weight sparse.

    The mask comes from per-row ranks of the Wanda score, computed once, so M_s for any s is one comparison
    and M_0.7 ⊆ M_0.5 by construction. Adapters are float32 whatever the model's dtype.
    """

    def __init__(self, linear, act_norm, n_groups, rank, scale=1.0, generator=None):
        super().__init__()
        self.W = linear.weight.detach()  # (out, in), frozen, in the model's dtype
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act_norm = act_norm  # (in,)
        out_f, in_f = self.W.shape
        self.scale = scale
        A = torch.empty(n_groups, rank, in_f)
        for k in range(n_groups):
            nn.init.kaiming_uniform_(A[k], a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(self.W.device))  # (G, r, in)
        self.B = nn.Parameter(torch.zeros(n_groups, out_f, rank, device=self.W.device))  # (G, out, r), zero-init

    @functools.cached_property
    def ranks(self):
        """Per-row ranks of the Wanda score (out, in), built on first use: training needs them for many
        sparsities, deployment at one sparsity does not (deploy_mask)."""
        ranks = prune.row_ranks(prune.wanda_score(self.W, self.act_norm))
        return ranks.to(torch.int16 if self.W.shape[1] < 2 ** 15 else torch.int32)

    def mask(self, s):
        return prune.mask_from_ranks(self.ranks, s)

    def deploy_mask(self, s):
        """The same mask as mask(s), by selection instead of a full sort."""
        return prune.row_mask(prune.wanda_score(self.W, self.act_norm), s)

    def stacked(self, g):
        """The pairs 0..g side by side: B (out, (g+1)r) and A ((g+1)r, in), so that B @ A = sum_{k<=g} B_k A_k."""
        G1, out_f, r = g + 1, self.B.shape[1], self.B.shape[2]
        return self.B[:G1].permute(1, 0, 2).reshape(out_f, G1 * r), self.A[:G1].reshape(G1 * r, -1)

    def weight(self, g, mask, adapters=True):
        if not adapters:
            return self.W * mask
        # W + scale * B @ A in one fp32 matrix product (addmm adds W and applies the scale inside the GEMM);
        # autograd keeps the bool mask itself for backward (1 B per weight), not a float copy
        B, A = self.stacked(g)
        return (torch.addmm(self.W.float(), B, A, alpha=self.scale) * mask).to(self.W.dtype)

    def forward(self, x, g, mask, adapters=True):
        return F.linear(x, self.weight(g, mask, adapters), self.bias)


def elastic_layers(block, act_norms, n_groups, rank, generator=None):
    return {name: ElasticLinear(lin, act_norms[name], n_groups, rank, generator=generator)
            for name, lin in block.linears().items()}


def block_forward(block, layers, x, g, s, adapters=True):
    """The block at sparsity s in group g: its own forward, with every Linear's weight replaced by W_eff."""
    weights = {f"{name}.weight": layer.weight(g, layer.mask(s), adapters) for name, layer in layers.items()}
    return functional_call(block, weights, (x,))


# -----------------------------------------------------------------------------
# phase 1: block-wise multi-sparsity reconstruction


def train_block(block, layers, X, Y, edges, epochs, lr, batch_size, device, gen):
    """Train the adapters of one block so that every group's output matches the dense output Y.

    Per step: loss_0 = MSE(out_0, Y); loss_g = 0.5 MSE(out_g, Y) + 0.5 MSE(out_g, out_0) for g > 0, each
    group's gradient accumulated, one Adam step with a cosine-decayed learning rate. Returns the mean loss
    of each epoch.
    """
    N, G = X.shape[0], len(edges) - 1
    per_epoch = math.ceil(N / batch_size)
    steps = epochs * per_epoch
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    draws = [stratified_draws(edges[g], edges[g + 1], steps, gen) for g in range(G)]
    epoch_losses = []
    for epoch in range(epochs):
        order = torch.randperm(N, generator=gen)
        total = torch.zeros(())
        for b in range(per_epoch):
            step = epoch * per_epoch + b
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, y = X[idx].to(device), Y[idx].to(device).float()  # (B, T, C)
            for g in range(G):
                out = block_forward(block, layers, x, g, draws[g][step]).float()
                if g == 0:
                    loss = F.mse_loss(out, y)
                    out0 = out.detach()
                else:
                    loss = 0.5 * F.mse_loss(out, y) + 0.5 * F.mse_loss(out, out0)
                loss.backward()  # gradients of all groups accumulate before the one step
                total += loss.detach().cpu()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        epoch_losses.append(total.item() / (per_epoch * G))
    return epoch_losses


@torch.no_grad()
def group_error(block, layers, X, Y, g, s, device, batch_size, adapters=True):
    """Mean squared error of the block's output at sparsity s against Y."""
    err = 0.0
    for i in range(0, X.shape[0], batch_size):
        out = block_forward(block, layers, X[i:i + batch_size].to(device), g, s, adapters)
        err += F.mse_loss(out.float(), Y[i:i + batch_size].to(device).float(), reduction="sum").item()
    return err / Y.numel()


def low_group_check(block, layers, X, Y, s, device, batch_size):
    """True if adapter 0 lowers the block's error at the lowest group's sparsity s; else deploy group 0 bare."""
    with_adapter = group_error(block, layers, X, Y, 0, s, device, batch_size, adapters=True)
    without = group_error(block, layers, X, Y, 0, s, device, batch_size, adapters=False)
    return with_adapter < without


# -----------------------------------------------------------------------------
# phase 2: the multi-sparsity feature mixer (MSFM)


@torch.no_grad()
def mix_outputs(block, layers, X, edges, use_adapter0, device, batch_size, gen):
    """Next block's pruned inputs: sum_g w_g * block(X) at one sparsity drawn from each group g."""
    G = len(edges) - 1
    w = mixer_weights(G)
    out = torch.empty_like(X)
    for i in range(0, X.shape[0], batch_size):
        x = X[i:i + batch_size].to(device)
        s = [edges[g] + (1 - torch.rand((), generator=gen, dtype=torch.float64).item()) * (edges[g + 1] - edges[g])
             for g in range(G)]
        mixed = sum(w[g] * block_forward(block, layers, x, g, s[g], g > 0 or use_adapter0).float()
                    for g in range(G))
        out[i:i + batch_size] = mixed.to(out.dtype).to(out.device)
    return out


# -----------------------------------------------------------------------------
# the elastic model: what is new, nothing else


def fingerprint(model):
    """A hash of the source weights (names, shapes, 4096 values of each rounded to bf16), dtype-independent."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        n, k = flat.numel(), min(4096, flat.numel())
        # evenly spaced indices in exact integer arithmetic: a float32 linspace rounds past the end above 2^24
        sample = flat[torch.arange(k) * (n - 1) // max(k - 1, 1)]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def block_record(layers, use_adapter0, act_norms, losses):
    return {"act_norm": {n: a.float().cpu() for n, a in act_norms.items()},
            "A": {n: layer.A.detach().cpu() for n, layer in layers.items()},
            "B": {n: layer.B.detach().cpu() for n, layer in layers.items()},
            "use_adapter0": bool(use_adapter0), "losses": losses}


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_elastic(path):
    """The elastic model of an --out folder, or of the elastic.pt file itself."""
    if os.path.isdir(path):
        path = os.path.join(path, "elastic.pt")
    if not os.path.isfile(path):
        raise UserError(f"no elastic model at {path!r}; pass --elastic the --out folder of a finished EPTS run "
                        "(it holds elastic.pt).")
    try:
        elastic = torch.load(path, map_location="cpu", weights_only=True)
        assert elastic.get("format") == FORMAT
    except Exception:
        raise UserError(f"{path!r} is not an EPTS elastic model file ({FORMAT}); it may be truncated or from "
                        "another program.") from None
    return elastic


def restore_layers(block, rec, n_groups, rank):
    layers = elastic_layers(block, {n: a.to(block_device(block)) for n, a in rec["act_norm"].items()}, n_groups, rank)
    for name, layer in layers.items():
        layer.A.data.copy_(rec["A"][name])
        layer.B.data.copy_(rec["B"][name])
    return layers


def block_device(block):
    return next(block.parameters()).device


# -----------------------------------------------------------------------------
# the EPTS run: one optimisation for every sparsity


def run_epts(model, calib, out_dir, edges=DEFAULT_EDGES, epochs=10, lr=1e-3, rank=8, batch_size=1, seed=0,
             device="cpu", check_sparsity=0.3):
    """Train the elastic model block by block; saves each finished block in out_dir and resumes from them."""
    edges, G = [float(e) for e in edges], len(edges) - 1
    settings = {"edges": edges, "epochs": epochs, "lr": lr, "rank": rank, "batch_size": batch_size, "seed": seed,
                "nsamples": calib.shape[0], "seqlen": calib.shape[1], "check_sparsity": check_sparsity,
                "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
                "fingerprint": fingerprint(model)}
    final = os.path.join(out_dir, "elastic.pt")
    if os.path.isfile(final):
        elastic = load_elastic(final)
        if {k: elastic.get(k) for k in settings} == settings:
            print(f"epts: {final} already holds a finished run with these settings; reusing it", file=sys.stderr)
            return elastic
    partial = os.path.join(out_dir, "partial")
    done = resume_records(partial, settings)
    home = model.embed_tokens.weight.device
    # four streams: dense inputs, their outputs (the target), pruned inputs, mixed outputs; beside them one
    # block's weights, ranks, saved tensors and activations, about 6x its weights (README, "Scale")
    X_dense = prune.embed_calibration(model, calib, device, batch_size, n_streams=4,
                                      reserve_bytes=6 * prune.param_bytes(model.blocks[0]))  # (N, T, C)
    X_pruned = X_dense.clone()
    s_check = min(max(check_sparsity, edges[0]), edges[1])  # inside group 0's range
    progress = prune.Progress(len(model.blocks), "epts", start=len(done))
    if done:
        print(f"epts: resuming {out_dir}: blocks 0..{len(done) - 1} are done, replaying their outputs",
              file=sys.stderr)
    records = []
    for i, block in enumerate(model.blocks):
        block.to(device)
        gen = torch.Generator().manual_seed(seed * 100_003 + 2 * i)
        mix_gen = torch.Generator().manual_seed(seed * 100_003 + 2 * i + 1)
        if i < len(done):
            rec = done[i]
            layers = restore_layers(block, rec, G, rank)
            Y = prune.run_block(block, X_dense, device, batch_size)
        else:
            stats = prune.new_stats(block, hessian=False, device=device)
            Y = prune.run_block(block, X_dense, device, batch_size, stats)  # target; act norms of DENSE inputs
            act_norms = {n: s.act_norm for n, s in stats.items()}
            layers = elastic_layers(block, act_norms, G, rank, generator=gen)
            losses = train_block(block, layers, X_pruned, Y, edges, epochs, lr, batch_size, device, gen)
            use0 = low_group_check(block, layers, X_pruned, Y, s_check, device, batch_size)
            rec = block_record(layers, use0, act_norms, losses)
            os.makedirs(partial, exist_ok=True)
            atomic_save(rec, os.path.join(partial, f"block_{i:03d}.pt"))
        records.append(rec)
        X_pruned = mix_outputs(block, layers, X_pruned, edges, rec["use_adapter0"], device, batch_size, mix_gen)
        X_dense = Y
        del layers
        block.to(home)
        if i >= len(done):
            progress.step(f", loss {rec['losses'][0]:.3g} -> {rec['losses'][-1]:.3g}, "
                          f"adapter 0 {'on' if rec['use_adapter0'] else 'off'}")
    elastic = {"format": FORMAT, "model_type": model.cfg.raw.get("model_type"), **settings, "blocks": records}
    atomic_save(elastic, final)
    shutil.rmtree(partial, ignore_errors=True)
    return elastic


def resume_records(partial, settings):
    """Finished blocks of an interrupted run with the same settings, in order."""
    meta = os.path.join(partial, "run.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise UserError(f"{os.path.dirname(partial)!r} holds an unfinished EPTS run with other settings "
                            f"({', '.join(changed)}); rerun with the same settings to resume it, or pass another "
                            "--out.")
    else:
        os.makedirs(partial, exist_ok=True)
        with open(meta + ".tmp", "w") as f:
            json.dump(settings, f)
        os.replace(meta + ".tmp", meta)
    records = []
    while os.path.isfile(path := os.path.join(partial, f"block_{len(records):03d}.pt")):
        records.append(torch.load(path, map_location="cpu", weights_only=True))
    return records


# -----------------------------------------------------------------------------
# deployment: merge adapters, apply the mask; no adapters at inference time


@torch.no_grad()
def deploy(model, elastic, sparsity):
    """Turn the dense `model` into the sparse model at `sparsity` (one float, or one per block), in place."""
    if elastic["fingerprint"] != fingerprint(model):
        raise UserError("the elastic model was trained on a different checkpoint (fingerprints differ); deploy it "
                        "on the --ckpt it was trained with, or train a new one for this checkpoint.")
    n_blocks = len(model.blocks)
    per_block = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * n_blocks
    if len(per_block) != n_blocks or len(elastic["blocks"]) != n_blocks:
        raise UserError(f"deploy needs one sparsity per block ({n_blocks} blocks), got {len(per_block)}.")
    edges, G = elastic["edges"], len(elastic["edges"]) - 1
    for block, rec, s in zip(model.blocks, elastic["blocks"], per_block):
        g = group_of(edges, s)
        layers = restore_layers(block, rec, G, elastic["rank"])
        for name, lin in block.linears().items():
            layer = layers[name]
            lin.weight.copy_(layer.weight(g, layer.deploy_mask(s), adapters=g > 0 or rec["use_adapter0"]))
    return model


# -----------------------------------------------------------------------------
# command line

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "epts")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(cfg, device):
    """The checkpoint's own dtype on a GPU; float32 on the CPU, where half-precision kernels may be slow."""
    if not str(device).startswith("cuda"):
        return "float32"
    stored = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype")  # transformers >= 5 writes "dtype"
    return stored if stored in DTYPES else "float32"


def evaluate(model, eval_sets, seqlen, device, batch_size):
    home = model.embed_tokens.weight.device
    model.to(device)
    ppl = {name: perplexity(model, ids, seqlen, batch_size, device) for name, ids in eval_sets.items()}
    model.to(home)
    return ppl


def main(ckpt=None, sparsities=(0.5,), methods=("dense", "epts"), calib=None, evals=(), nsamples=None,
         seqlen=None, seed=0, device="cpu", dtype=None, out=None, json_path=None, elastic_path=None,
         export=None, groups=None, epochs=None, lr=1e-3, rank=8, batch_size=1, offload=False, eval_batch_size=4):
    """Run the requested methods at every sparsity, print the perplexity table, write --json/--out/--export."""
    torch.manual_seed(seed)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu or install a "
                        "CUDA build of PyTorch.")
    if ckpt is None:
        import builtin
        ckpt, defaults = builtin.ensure_default()
        calib = calib or defaults["calib"]
        evals = evals or [defaults["eval"]]
        seqlen = seqlen or defaults["seqlen"]
        nsamples = nsamples or defaults["nsamples"]
        epochs = epochs or defaults["epochs"]
    cfg = M.read_config(ckpt)
    # never the 131072 positions of a LLaMA-3.1 config: Wanda users ran out of memory exactly so
    seqlen, nsamples, epochs = seqlen or min(2048, cfg.max_position_embeddings), nsamples or 128, epochs or 10
    dtype = dtype or default_dtype(cfg, device)
    print(f"model: {ckpt} ({cfg.raw.get('model_type')}, {cfg.num_hidden_layers} blocks), dtype {dtype}, "
          f"seqlen {seqlen}", file=sys.stderr)
    load = lambda: M.load_model(ckpt, DTYPES[dtype]).to("cpu" if offload else device)  # noqa: E731
    model = load()
    tok = M.load_tokenizer(ckpt, model.cfg.bos_token_id, model.cfg.eos_token_id)
    if not evals:
        raise UserError("no evaluation data: pass --eval FILE (e.g. WikiText-2 wiki.test.raw) to measure "
                        "perplexity.")
    needs_calib = any(m in ("wanda", "sparsegpt") for m in methods) or ("epts" in methods and not elastic_path)
    if needs_calib and not calib:
        raise UserError("no calibration data: pass --calib FILE (e.g. a C4 train shard .json.gz or WikiText-2 "
                        "wiki.train.raw).")
    fractional = [s for s in sparsities if not isinstance(s, tuple)]
    if "epts" in methods and len(fractional) < len(sparsities):
        print("note: epts deploys fractional sparsities only; N:M patterns run for the baselines",
              file=sys.stderr)
    pruned_rows = [(m, s) for m in methods if m != "dense" for s in (fractional if m == "epts" else sparsities)]
    if export and len(pruned_rows) != 1:
        raise UserError(f"--export writes one pruned model, but {len(pruned_rows)} were requested: give exactly "
                        "one pruned method and one sparsity.")
    eval_sets = {os.path.basename(p): data.eval_tokens(p, tok, seqlen) for p in evals}
    calib_ids = data.calibration(calib, tok, nsamples, seqlen, seed) if needs_calib else None
    report = {"ckpt": ckpt, "seqlen": seqlen, "nsamples": nsamples, "seed": seed, "dtype": dtype, "results": []}

    def record(method, sparsity, m, seconds):
        for name, ppl in evaluate(m, eval_sets, seqlen, device, eval_batch_size).items():
            row = {"method": method, "sparsity": prune.format_sparsity(sparsity), "eval": name, "ppl": ppl,
                   "seconds": round(seconds, 3)}
            if method != "dense":
                row["achieved_sparsity"] = round(prune.sparsity_report(m)[1], 6)
            report["results"].append(row)
            print_row(row, widths)
        if json_path:
            write_json(report, json_path)
        if export and method != "dense":
            M.save_model(m, export, tokenizer_dir=ckpt)
            print(f"exported {method} at {prune.format_sparsity(sparsity)} to {export}", file=sys.stderr)

    widths = table_widths(eval_sets)
    print_header(widths)
    if "dense" in methods:
        record("dense", 0.0, model, 0.0)
    for method in ("magnitude", "wanda", "sparsegpt"):
        if method in methods:
            for s in sparsities:
                m, t0 = load(), time.time()
                prune.prune_model(m, method, s, calib_ids, device, batch_size=8,
                                  warn=lambda msg: print(msg, file=sys.stderr))
                record(method, s, m, time.time() - t0)
    if "epts" in methods and fractional:
        if elastic_path:
            elastic = load_elastic(elastic_path)
        else:
            edges = extend_edges(groups or DEFAULT_EDGES, max(fractional))
            out_dir = out or os.path.join("runs", f"epts-{os.path.basename(os.path.normpath(ckpt))}")
            os.makedirs(out_dir, exist_ok=True)
            t0 = time.time()
            elastic = run_epts(model, calib_ids, out_dir, edges, epochs, lr, rank, batch_size, seed, device)
            train_seconds = time.time() - t0
            size = os.path.getsize(os.path.join(out_dir, "elastic.pt"))
            model_bytes = prune.param_bytes(model)  # a tied head once
            print(f"epts: one optimisation took {train_seconds:.1f}s; elastic model {out_dir}/elastic.pt is "
                  f"{size / 2**20:.2f} MiB ({100 * size / model_bytes:.1f}% of the model's "
                  f"{model_bytes / 2**20:.1f} MiB)", file=sys.stderr)
            report["epts"] = {"out": out_dir, "train_seconds": round(train_seconds, 3), "elastic_bytes": size,
                              "model_bytes": model_bytes, "edges": edges}
        for s in fractional:
            m, t0 = load(), time.time()
            deploy(m, elastic, s)
            record("epts", s, m, time.time() - t0)
    if json_path:
        write_json(report, json_path)
    return report


def table_widths(eval_names):
    return {"method": 10, "sparsity": 9, "eval": max(14, *map(len, eval_names)) + 1, "ppl": 10, "seconds": 9}


def print_header(widths):
    print(" ".join(f"{name:<{w}}" for name, w in widths.items()))


def print_row(row, widths):
    cells = {k: row[k] for k in widths}
    cells["ppl"] = f"{row['ppl']:.3f}"
    cells["seconds"] = f"{row['seconds']:.1f}"
    print(" ".join(f"{str(cells[name]):<{w}}" for name, w in widths.items()), flush=True)


def write_json(report, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description="EPTS: one optimisation, an elastic sparse model for every sparsity.")
    p.add_argument("--ckpt", help="Hugging Face-format LLaMA/OPT folder (default: the built-in small model)")
    p.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma-separated fractions or N:M patterns")
    p.add_argument("--methods", default="dense,epts", help=f"comma-separated, any of {','.join(METHODS)}")
    p.add_argument("--calib", help="calibration data: C4 .json(.gz) shard, WikiText-2 file/folder, or .txt")
    p.add_argument("--eval", nargs="+", default=[], help="evaluation file(s) for perplexity")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128; built-in model: less)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, the model's positions); "
                   "built-in model: less)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="default: the checkpoint's torch_dtype on cuda, float32 on cpu")
    p.add_argument("--offload", action="store_true", help="keep blocks in CPU memory, move one at a time")
    p.add_argument("--out", help="EPTS run folder (elastic.pt; resumable); default runs/epts-<ckpt name>")
    p.add_argument("--elastic", help="deploy an earlier EPTS run (its --out folder or elastic.pt), no training")
    p.add_argument("--export", help="write the one pruned model as a Hugging Face-format folder")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--groups", help="EPTS group edges, e.g. 0,0.4,0.45,0.5,0.55,0.6,0.65,0.7")
    p.add_argument("--epochs", type=int, help="EPTS epochs per block (default 10; built-in model: less)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1, help="EPTS calibration windows per step")
    a = p.parse_args(argv)
    try:
        sparsities = [prune.parse_sparsity(s) for s in a.sparsities.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--sparsities: {e}")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    groups = None
    if a.groups:
        try:
            groups = [float(e) for e in a.groups.split(",")]
        except ValueError:
            p.error(f"--groups: {a.groups!r} is not a comma-separated list of numbers")
        if groups[0] != 0 or any(b <= c for b, c in zip(groups[1:], groups)) or groups[-1] >= 1 or len(groups) < 2:
            p.error("--groups: edges must start at 0, increase strictly and stay below 1, e.g. 0,0.4,0.5,0.7")
    for name in ("nsamples", "seqlen", "epochs", "rank", "batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not a.device.startswith(("cpu", "cuda")):
        p.error(f"--device: {a.device!r} is not cpu or cuda")
    return dict(ckpt=a.ckpt, sparsities=sparsities, methods=methods, calib=a.calib, evals=a.eval,
                nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, device=a.device, dtype=a.dtype, out=a.out,
                json_path=a.json, elastic_path=a.elastic, export=a.export, groups=groups, epochs=a.epochs,
                lr=a.lr, rank=a.rank, batch_size=a.batch_size, offload=a.offload)


if __name__ == "__main__":
    kwargs = parse_args(sys.argv[1:])
    try:
        main(**kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished EPTS blocks are saved; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
