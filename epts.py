"""
EPTS: Elastic Post-Training Sparsity (Xu et al., KDD 2026), for LLaMA and OPT.

One block-wise optimisation yields an *elastic* model: the dense weights, one Wanda score per weight
(kept as activation norms) and G nested LoRA pairs per layer (MS-HiLoRA). Any sparsity in the
trained range is then deployed in seconds, without calibration data.

    python epts.py --ckpt PATH --sparsities 0.3,0.5,0.7
"""

import argparse
import contextlib
import copy
import fcntl
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
FORMAT = "epts-elastic-v2"  # v2: integer-indexed fingerprint, a checksum of every block's tensors

# -----------------------------------------------------------------------------
# sparsity groups


def extend_edges(edges, max_sparsity, step=0.05):
    """Add groups in `step`s until the range covers `max_sparsity`."""
    edges = list(edges)
    while edges[-1] < max_sparsity - 1e-9:
        edges.append(round(edges[-1] + step, 10))
    if edges[-1] >= 1:
        raise UserError(f"EPTS adds groups in {step} steps up to the highest sparsity, and {max_sparsity} would "
                        f"need one reaching {edges[-1]:g}; give --groups whose last edge lies between "
                        f"{max_sparsity} and 1 (e.g. {','.join(f'{e:g}' for e in edges[:-1])},{max_sparsity:g}).")
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
        # W + scale * B @ A by one fp32 matrix product into an fp32 copy of W, masked in place: neither
        # step's output is needed by backward (addmm keeps B and A, mul keeps the bool mask: 1 B per weight),
        # so one full-size fp32 temporary serves both, where out-of-place ops would allocate three
        B, A = self.stacked(g)
        W32 = self.W.to(torch.float32, copy=True)  # a copy even when W is float32: it is written in place
        return W32.addmm_(B, A, alpha=self.scale).mul_(mask).to(self.W.dtype)

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
                    out0 = out.detach()
                loss = group_loss(out, y, None if g == 0 else out0)
                loss.backward()  # gradients of all groups accumulate before the one step
                total += loss.detach().cpu()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        epoch_losses.append(total.item() / (per_epoch * G))
    return epoch_losses


def group_loss(out, y, out0=None):
    """Group 0: MSE(out, Y). Group g > 0: 0.5 MSE(out, Y) + 0.5 MSE(out, out_0), out_0 detached: a higher
    sparsity is pulled towards the dense target and towards what group 0 already reaches."""
    if out0 is None:
        return F.mse_loss(out, y)
    return 0.5 * F.mse_loss(out, y) + 0.5 * F.mse_loss(out, out0)


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


class MSFM:
    """The multi-sparsity feature mixer (EPTS phase 2): the next block's pruned inputs are
    sum_g w_g * block(X) at one sparsity drawn uniformly from each group g's range (edges[g], edges[g+1]].

    Default weights: the lower half of the groups 1, the upper half 2, normalised (the paper's .1 x4, .2 x3
    for G = 7), so the later blocks learn most from the high sparsities where pruning hurts most.
    """

    def __init__(self, edges, weights=None):
        self.edges = list(edges)
        G = len(self.edges) - 1
        lower = (G + 1) // 2
        w = weights if weights is not None else [1.0] * lower + [2.0] * (G - lower)
        self.weights = [x / sum(w) for x in w]

    def draw(self, gen):
        """One sparsity from each group's range (lo, hi]; 1 - u in (0, 1] never gives lo itself."""
        return [lo + (1 - torch.rand((), generator=gen, dtype=torch.float64).item()) * (hi - lo)
                for lo, hi in zip(self.edges, self.edges[1:])]

    @torch.no_grad()
    def mix(self, block, layers, X, use_adapter0, device, batch_size, gen):
        """The mixed outputs (N, T, C) of the block over the pruned stream X, fresh draws for every batch."""
        out = torch.empty_like(X)
        for i in range(0, X.shape[0], batch_size):
            x = X[i:i + batch_size].to(device)
            draws = self.draw(gen)
            mixed = sum(w * block_forward(block, layers, x, g, s, adapters=g > 0 or use_adapter0).float()
                        for g, (w, s) in enumerate(zip(self.weights, draws)))
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
    rec = {"act_norm": {n: a.float().cpu() for n, a in act_norms.items()},
           "A": {n: layer.A.detach().cpu() for n, layer in layers.items()},
           "B": {n: layer.B.detach().cpu() for n, layer in layers.items()},
           "use_adapter0": bool(use_adapter0), "losses": losses}
    rec["sha256"] = record_checksum(rec)
    return rec


def record_checksum(rec):
    """sha256 of a block record's tensors and flag: flipped bytes in a saved file must not deploy silently."""
    h = hashlib.sha256(str(rec["use_adapter0"]).encode())
    for key in ("act_norm", "A", "B"):
        for name in sorted(rec[key]):
            h.update(f"{key}.{name}".encode())
            h.update(rec[key][name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(obj, path):
    with M.atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_checked(path, what, fix, fmt=None):
    """torch.load of a file this program wrote (of format `fmt`, if given), every block record's checksum
    verified; `fix` tells the user what to do when it is damaged."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path!r} is damaged ({type(e).__name__}; truncated or overwritten?); {fix}") from None
    found = obj.get("format") if isinstance(obj, dict) else None
    if fmt is not None and found != fmt:
        raise UserError(f"{path!r} is not an EPTS elastic model file of format {fmt} (found {found!r}); it may be "
                        f"from an older version of this program, or from another program: {fix}")
    records = obj.get("blocks", [obj]) if isinstance(obj, dict) else None
    if records is None or any(not isinstance(r, dict) or r.get("sha256") != record_checksum(r) for r in records):
        raise UserError(f"{path!r}: {what} fails its checksum (its bytes were changed after it was written); {fix}")
    return obj


def load_elastic(path):
    """The elastic model of an --out folder, or of the elastic.pt file itself, checksums verified."""
    if os.path.isdir(path):
        path = os.path.join(path, "elastic.pt")
    if not os.path.isfile(path):
        raise UserError(f"no elastic model at {path!r}; pass --elastic the --out folder of a finished EPTS run "
                        "(it holds elastic.pt).")
    return load_checked(path, "the elastic model", "train it again (or restore it from a copy).", fmt=FORMAT)


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
    """Train the elastic model block by block; saves each finished block in out_dir and resumes from them.

    A finished run in out_dir with the same settings is reused; one with other settings is refused, never
    overwritten. Only one process at a time may work in out_dir.
    """
    settings = {"edges": [float(e) for e in edges], "epochs": epochs, "lr": lr, "rank": rank,
                "batch_size": batch_size, "seed": seed, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                "check_sparsity": check_sparsity,
                "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
                "fingerprint": fingerprint(model)}
    os.makedirs(out_dir, exist_ok=True)
    with exclusive(out_dir):
        final = os.path.join(out_dir, "elastic.pt")
        if os.path.isfile(final):
            elastic = load_elastic(final)
            changed = changed_settings(elastic, settings)
            if changed:
                raise UserError(f"{out_dir!r} already holds a finished EPTS run with other settings "
                                f"({', '.join(changed)}); it is not overwritten: pass another --out, or delete "
                                f"{final} to train again there.")
            print(f"epts: {final} already holds a finished run with these settings; reusing it", file=sys.stderr)
            return elastic
        try:
            elastic = train_elastic(model, calib, out_dir, settings, device)
        except KeyboardInterrupt:
            print(f"interrupted: the finished EPTS blocks are saved in {out_dir}/partial; run the same command "
                  "again to resume from the first unfinished block", file=sys.stderr)
            raise
        save(elastic, final)
    shutil.rmtree(os.path.join(out_dir, "partial"), ignore_errors=True)
    return elastic


def changed_settings(previous, settings):
    """Names of the settings in which an earlier run (its saved dict) differs from this one."""
    return sorted(k for k in settings if previous.get(k) != settings[k])


@contextlib.contextmanager
def exclusive(out_dir):
    """Hold out_dir/lock for the run: a second process working in the same folder is refused. The kernel
    releases the lock when the process dies, so a killed run never leaves a stale lock behind."""
    with open(os.path.join(out_dir, "lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"another EPTS run (pid {f.read().strip() or '?'}) is working in {out_dir!r}; wait for "
                            "it to finish, or pass another --out.") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def train_elastic(model, calib, out_dir, settings, device):
    """Phase 1 and 2 for every block in turn (the loop of EPTS), each finished block saved in out_dir/partial."""
    edges, rank, batch_size = settings["edges"], settings["rank"], settings["batch_size"]
    G = len(edges) - 1
    partial = os.path.join(out_dir, "partial")
    done = resume_records(partial, settings)
    home = model.embed_tokens.weight.device
    # four streams: dense inputs, their outputs (the target), pruned inputs, mixed outputs; beside them one
    # block's weights, ranks, saved tensors and activations, about 6x its weights (README, "Scale")
    X_dense = prune.embed_calibration(model, calib, device, batch_size, n_streams=4,
                                      reserve_bytes=6 * prune.param_bytes(model.blocks[0]))  # (N, T, C)
    X_pruned = X_dense.clone()
    s_check = min(max(settings["check_sparsity"], edges[0]), edges[1])  # inside group 0's range
    progress = prune.Progress(len(model.blocks), "epts", start=len(done))
    msfm = MSFM(edges)
    if done:
        print(f"epts: resuming {out_dir}: blocks 0..{len(done) - 1} are done, replaying their outputs",
              file=sys.stderr)
    records = []
    for i, block in enumerate(model.blocks):
        block.to(device)
        # two independent streams per block (training draws, mixer draws), the same for a resumed run
        gen = torch.Generator().manual_seed(settings["seed"] * 100_003 + 2 * i)
        mix_gen = torch.Generator().manual_seed(settings["seed"] * 100_003 + 2 * i + 1)
        if i < len(done):
            rec = done[i]
            layers = restore_layers(block, rec, G, rank)
            Y = prune.run_block(block, X_dense, device, batch_size)
        else:
            stats = prune.new_stats(block, hessian=False, device=device)
            Y = prune.run_block(block, X_dense, device, batch_size, stats)  # target; act norms of DENSE inputs
            act_norms = {n: s.act_norm for n, s in stats.items()}
            layers = elastic_layers(block, act_norms, G, rank, generator=gen)
            losses = train_block(block, layers, X_pruned, Y, edges, settings["epochs"], settings["lr"], batch_size,
                                 device, gen)
            use0 = low_group_check(block, layers, X_pruned, Y, s_check, device, batch_size)
            rec = block_record(layers, use0, act_norms, losses)
            os.makedirs(partial, exist_ok=True)
            save(rec, os.path.join(partial, f"block_{i:03d}.pt"))
        records.append(rec)
        X_pruned = msfm.mix(block, layers, X_pruned, rec["use_adapter0"], device, batch_size, mix_gen)
        X_dense = Y
        del layers
        block.to(home)
        if i >= len(done):
            progress.step(f", loss {rec['losses'][0]:.3g} -> {rec['losses'][-1]:.3g}, "
                          f"adapter 0 {'on' if rec['use_adapter0'] else 'off'}")
    return {"format": FORMAT, "model_type": model.cfg.raw.get("model_type"), **settings, "blocks": records}


def resume_records(partial, settings):
    """Finished blocks of an interrupted run with the same settings, in order."""
    meta = os.path.join(partial, "run.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                previous = json.load(f)
            assert isinstance(previous, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            raise UserError(f"{meta!r} is damaged, so the unfinished run's settings are unknown; delete "
                            f"{partial!r} to start over.") from None
        if previous != settings:
            raise UserError(f"{os.path.dirname(partial)!r} holds an unfinished EPTS run with other settings "
                            f"({', '.join(changed_settings(previous, settings))}); rerun with the same settings to resume it, or pass another "
                            "--out.")
    else:
        os.makedirs(partial, exist_ok=True)
        with M.atomic_write(meta) as f:
            json.dump(settings, f)
    records = []
    while os.path.isfile(path := os.path.join(partial, f"block_{len(records):03d}.pt")):
        records.append(load_checked(path, f"block {len(records)}", f"delete it and run the same command again to "
                                    f"train block {len(records)} anew and resume from there."))
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
    """Run the requested methods at every sparsity, print the perplexity table, write --json/--out/--export.

    Every check of the request runs first, so a bad flag never costs the time of the methods before it.
    """
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
    check_seqlen(cfg, seqlen)
    if not evals:
        raise UserError("no evaluation data: pass --eval FILE (e.g. WikiText-2 wiki.test.raw) to measure "
                        "perplexity.")
    fractional = [s for s in sparsities if not isinstance(s, tuple)]
    train_epts = "epts" in methods and not elastic_path
    if "epts" in methods and not fractional:
        raise UserError("EPTS deploys fractional sparsities such as 0.5, and --sparsities holds only N:M patterns; "
                        "add a fraction, or run the N:M patterns without epts in --methods.")
    if "epts" in methods and len(fractional) < len(sparsities):
        print("note: epts deploys fractional sparsities only; N:M patterns run for the baselines",
              file=sys.stderr)
    needs_calib = any(m in ("wanda", "sparsegpt") for m in methods) or train_epts
    if needs_calib and not calib:
        raise UserError("no calibration data: pass --calib FILE (e.g. a C4 train shard .json.gz or WikiText-2 "
                        "wiki.train.raw).")
    pruned_rows = [(m, s) for m in methods if m != "dense" for s in (fractional if m == "epts" else sparsities)]
    if export:
        if len(pruned_rows) != 1:
            raise UserError(f"--export writes one pruned model, but {len(pruned_rows)} were requested: give "
                            "exactly one pruned method and one sparsity.")
        if os.path.realpath(export) == os.path.realpath(ckpt):
            raise UserError(f"--export {export!r} is the checkpoint folder itself; choose a new folder.")
        M.check_new_folder(export, "--export")
    if json_path:
        check_writable_file(json_path, "--json")
    elastic, out_dir, edges = None, None, None
    if "epts" in methods and elastic_path:
        elastic = load_elastic(elastic_path)
        for s in fractional:
            group_of(elastic["edges"], s)  # every requested sparsity inside the trained range, or a clear error
    if train_epts:
        edges = extend_edges(groups or DEFAULT_EDGES, max(fractional))
        out_dir = out or os.path.join("runs", f"epts-{os.path.basename(os.path.normpath(ckpt))}")
        check_writable_folder(out_dir, "--out")

    model = M.load_model(ckpt, DTYPES[dtype]).to("cpu" if offload else device)
    tok = M.load_tokenizer(ckpt, model.cfg.bos_token_id, model.cfg.eos_token_id)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} "
                        "embedding rows; the tokenizer files belong to another model.")
    eval_sets = {name: data.eval_tokens(p, tok, seqlen) for name, p in eval_names(evals).items()}
    calib_ids = data.calibration(calib, tok, nsamples, seqlen, seed,
                                 warn=lambda msg: print(msg, file=sys.stderr)) if needs_calib else None
    report = {"ckpt": ckpt, "seqlen": seqlen, "nsamples": nsamples, "seed": seed, "dtype": dtype, "results": []}

    def record(method, sparsity, m, seconds):
        for name, ppl in evaluate(m, eval_sets, seqlen, device, eval_batch_size).items():
            if not math.isfinite(ppl):
                raise UserError(f"{method} at sparsity {prune.format_sparsity(sparsity)} gives perplexity {ppl} on "
                                f"{name}: the model's outputs are not finite (a damaged checkpoint, or float16 "
                                "overflow: try --dtype bfloat16 or float32).")
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
                m, t0 = prunable_copy(model), time.time()
                prune.prune_model(m, method, s, calib_ids, device, batch_size=8,
                                  warn=lambda msg: print(msg, file=sys.stderr))
                record(method, s, m, time.time() - t0)
    if train_epts:
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
    if "epts" in methods:
        for s in fractional:
            m, t0 = prunable_copy(model), time.time()
            deploy(m, elastic, s)
            record("epts", s, m, time.time() - t0)
    if json_path:
        write_json(report, json_path)
    return report


def prunable_copy(model):
    """A copy of the dense model to prune in place: its blocks are copied, the embeddings, final norm and head
    are shared (pruning never changes them), so each method costs one set of blocks, not a reload."""
    shared = {id(p): p for name, p in model.named_parameters() if not name.startswith("blocks.")}
    return copy.deepcopy(model, memo=shared)


def check_seqlen(cfg, seqlen):
    """At least two tokens per window (one to predict); OPT has no positions past its table, LLaMA extrapolates."""
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} leaves no token to predict; use at least 2 (2048 is the convention).")
    if seqlen > cfg.max_position_embeddings:
        if isinstance(cfg, M.OPTConfig):
            raise UserError(f"--seqlen {seqlen} is longer than OPT's {cfg.max_position_embeddings} learned "
                            f"positions; use --seqlen {cfg.max_position_embeddings} or less.")
        print(f"warning: --seqlen {seqlen} is longer than the model's max_position_embeddings "
              f"({cfg.max_position_embeddings}); RoPE extrapolates beyond what the model was trained on",
              file=sys.stderr)


def check_writable_file(path, flag):
    """A file we will write later: its folder must exist and be writable now, before any time is spent."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file name.")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path!r} cannot be written: the folder {folder!r} is missing or not writable.")


def check_writable_folder(path, flag):
    """A folder we will create or write into later."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file, not a folder; choose a folder name.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise UserError(f"{flag} {path!r} cannot be written: {existing!r} is not writable.")


def eval_names(paths):
    """Row name of each evaluation file: its base name, or the path as given where two base names collide."""
    base = [os.path.basename(p) for p in paths]
    names = {(b if base.count(b) == 1 else p): p for b, p in zip(base, paths)}
    if len(names) < len(paths):
        raise UserError("--eval names one file twice; give each evaluation file once.")
    return names


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
    with M.atomic_write(path) as f:
        json.dump(report, f, indent=2)


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
    if not a.lr > 0 or math.isinf(a.lr):
        p.error(f"--lr {a.lr} must be a positive number (the authors use 1e-3)")
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
        print("interrupted", file=sys.stderr)  # run_epts has said where its finished blocks are, if it ran
        sys.exit(130)
