"""
EPTS: Elastic Post-Training Sparsity (Xu et al., KDD 2026), for LLaMA and OPT.

One block-wise optimisation yields an *elastic* model: the dense weights, one Wanda score per weight (kept as
activation norms) and G nested LoRA pairs per layer (MS-HiLoRA). Any sparsity in the trained range is then
deployed in seconds, without calibration data.

    python epts.py --ckpt PATH --sparsities 0.3,0.5,0.7

The algorithm, as train_blocks runs it (one function each):

    X_dense = X_pruned = embed(calibration windows)
    for block in blocks:
        Y      = block(X_dense)                           dense target; Wanda's ||X_j|| from X_dense
        layers = elastic_layers(block, ||X||, G, r)       W frozen, per-row Wanda order, G LoRA pairs (B_k, A_k)
        train_block: per batch (x, y) of X_pruned, Y      phase 1: Adam on the adapters, cosine lr
            train_step: for g in groups: s ~ (edges[g], edges[g+1]]
                out_g  = block with (W + sum_{k<=g} B_k A_k) ⊙ M_s on x       (block_forward, MaskedMerge)
                loss_g = group_loss(out_g, y, out_0); loss_g.backward()
        use0     = low_group_check(...)                   keep adapter 0 only where it lowers the error
        X_pruned = mix_stream(MSFM, block, X_pruned)      phase 2: sum_g w_g block_g(X_pruned)
        X_dense  = Y
    deploy(model, elastic, s): W <- (W + sum_{k<=g(s)} B_k A_k) ⊙ M_s, no adapters left

Below the algorithm: the elastic file (checksums, resume), then the command line.
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
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import data
import default_model
import model as M
import prune
from eval import TASKS, TaskError, perplexity, read_task, zero_shot
from model import UserError
from parallel import SOLO, Procs, exit_process

FORMAT = "epts-elastic-v3"  # v3: a checksum of the whole file (settings, block order), not only of each block
OLD_FORMATS = ("epts-elastic-v2",)  # still read; their settings carry no checksum
USER_ERRORS = (UserError, data.DataError, TaskError)  # bad input: the CLI prints the message, no traceback


@dataclass(frozen=True)
class EPTSConfig:
    """The settings of one EPTS optimisation (the paper's defaults); saved in the elastic file, and the CLI's
    defaults."""
    edges: tuple = (0.0, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70)  # group g covers (edges[g], edges[g+1]]
    epochs: int = 10
    lr: float = 1e-3
    rank: int = 8  # r of each of the G nested LoRA pairs
    batch_size: int = 1  # calibration windows per training step
    seed: int = 0  # calibration sampling, adapter init, sparsity draws
    check_sparsity: float = 0.3  # where the low-group check decides whether adapter 0 is deployed
    # the paper's ablations, each off only to measure what it buys (its ablation table): the hierarchy (group g sums
    # adapters 0..g; False: its own adapter g alone), the mixer ("msfm"; "dense": the next block trains on the
    # dense outputs; a sparsity s: on this block's outputs at s alone) and the low-group check (False: adapter 0
    # always deployed)
    nested: bool = True
    mixer: object = "msfm"
    check_low_group: bool = True

    def __post_init__(self):
        e = self.edges
        if len(e) < 2 or e[0] < 0 or any(b <= a for a, b in zip(e, e[1:])) or e[-1] >= 1:
            raise UserError(f"group edges {','.join(map(str, e))} must increase strictly within [0, 1), "
                            "e.g. 0,0.4,0.5,0.7.")
        for name in ("epochs", "rank", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer.")
        if not 0 <= self.lr < math.inf:  # 0 trains nothing: the deployed masks are Wanda's, the adapters zero
            raise UserError(f"--lr {self.lr} must be a number >= 0 (the authors use 1e-3).")
        m = self.mixer
        if m not in ("msfm", "dense") and not (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1):
            raise UserError(f"--mixer {m!r} must be msfm, dense, or one sparsity in [0, 1) such as 0.5.")


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


def group_adapters(g, nested, use_adapter0=True):
    """The adapter pairs group g sums: True, pairs 0..g (MS-HiLoRA's hierarchy); slice(g, g + 1), its own pair
    alone (nesting off); False, none (group 0 where the low-group check turned adapter 0 off)."""
    if g == 0 and not use_adapter0:
        return False
    return True if nested else slice(g, g + 1)


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


class MaskedMerge(torch.autograd.Function):
    """W_eff = (W + scale B A) ⊙ M in W's dtype, and a backward that needs no float32 copy of W:
    dL/dB = scale (G ⊙ M) Aᵀ and dL/dA = scale Bᵀ (G ⊙ M), with G = dL/dW_eff (out, in).

    B and A are rounded to W's dtype for the products (their float32 values stay the optimiser's): in bf16 the
    merged weight is as close to the exact (W + scale B A) ⊙ M as rounding a float32 merge would be, and with a
    float32 W it is the float32 merge, bit for bit.
    """

    @staticmethod
    def forward(ctx, W, B, A, mask, scale):
        B, A = B.to(W.dtype), A.to(W.dtype)  # (out, r'), (r', in)
        ctx.save_for_backward(B, A, mask)
        ctx.scale = scale
        return torch.addmm(W, B, A, alpha=scale).mul_(mask)  # one (out, in) tensor, written twice in place

    @staticmethod
    def backward(ctx, G):
        B, A, mask = ctx.saved_tensors
        # float16's narrow range could flush small gradients to zero; bfloat16 has float32's range
        GM = (G * mask).to(torch.float32 if G.dtype == torch.float16 else G.dtype)  # (out, in)
        grad_B = (GM @ A.to(GM.dtype).t()).float() * ctx.scale  # (out, r')
        grad_A = (B.to(GM.dtype).t() @ GM).float() * ctx.scale  # (r', in)
        return None, grad_B, grad_A, None, None


class ElasticLinear(nn.Module):
    """W_eff = (W + scale * sum_{k<=g} B_k A_k) ⊙ M_s (EPTS, MS-HiLoRA); the mask keeps the merged weight sparse.

    The mask comes from each row's order of the Wanda score, computed once, so M_s for any s is one comparison
    and M_0.7 ⊆ M_0.5 by construction. Adapters are float32 whatever the model's dtype.
    """

    def __init__(self, linear, act_norm, n_groups, rank, scale=1.0, generator=None):
        super().__init__()
        # buffers, so that .to() moves them; not in state_dict(): the elastic file keeps only what is new (A, B and
        # the activation norms, which block_record saves itself)
        self.register_buffer("W", linear.weight.detach(), persistent=False)  # (out, in), frozen, the model's dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_buffer("act_norm", act_norm, persistent=False)  # (in,)
        out_f, in_f = self.W.shape
        self.scale = scale
        A = torch.empty(n_groups, rank, in_f)
        for k in range(n_groups):
            nn.init.kaiming_uniform_(A[k], a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(self.W.device))  # (G, r, in)
        self.B = nn.Parameter(torch.zeros(n_groups, out_f, rank, device=self.W.device))  # (G, out, r), zero-init

    @functools.cached_property
    def order(self):
        """Each weight's place in its row's Wanda order (out, in), built on first use: training needs it for many
        sparsities, deployment at one sparsity does not (deploy_mask). Built 2^23 weights at a time: sorting a
        whole layer would hold 20 B a weight (float32 score, two int64 tensors)."""
        out_f, in_f = self.W.shape
        order = torch.empty(out_f, in_f, dtype=torch.int16 if in_f < 2 ** 15 else torch.int32, device=self.W.device)
        rows = max(1, 2 ** 23 // in_f)
        for r in range(0, out_f, rows):
            order[r:r + rows] = prune.row_order(prune.wanda_score(self.W[r:r + rows], self.act_norm))
        return order

    def mask(self, s):
        return prune.mask_from_order(self.order, s)

    def deploy_mask(self, s):
        """The same mask as mask(s), by selection instead of a full sort."""
        return prune.row_mask(prune.wanda_score(self.W, self.act_norm), s)

    def stacked(self, pairs):
        """The pairs `pairs` (a slice) side by side: B (out, n r) and A (n r, in), so that B @ A = sum_k B_k A_k."""
        B, A = self.B[pairs], self.A[pairs]  # (n, out, r), (n, r, in)
        return B.permute(1, 0, 2).reshape(B.shape[1], -1), A.reshape(-1, A.shape[2])

    def weight(self, g, mask, adapters=True):
        """W_eff of group g: adapters True sums the pairs 0..g, a slice the pairs it names, False none
        (group_adapters)."""
        if adapters is False:
            return self.W * mask
        B, A = self.stacked(slice(0, g + 1) if adapters is True else adapters)
        return MaskedMerge.apply(self.W, B, A, mask, self.scale)

    def forward(self, x, g, mask, adapters=True):
        return F.linear(x, self.weight(g, mask, adapters), self.bias)


def elastic_layers(block, act_norms, n_groups, rank, generator=None):
    return {name: ElasticLinear(lin, act_norms[name], n_groups, rank, generator=generator)
            for name, lin in block.linears().items()}


def block_weights(layers, g, s, adapters=True):
    """Every Linear's W_eff at sparsity s in group g, by the block's parameter names."""
    return {f"{name}.weight": layer.weight(g, layer.mask(s), adapters) for name, layer in layers.items()}


def block_forward(block, layers, x, g, s, adapters=True):
    """The block at sparsity s in group g: its own forward, with every Linear's weight replaced by W_eff."""
    return functional_call(block, block_weights(layers, g, s, adapters), (x,))


def deployed_forward(block, layers, use_adapter0, nested=True):
    """forward(x, g, s) of the block as deploy() will build it: group 0's adapter only if the low-group check
    kept it. x may live elsewhere (streams in CPU memory): it moves to the block's device."""
    device = prune.device_of(block)
    return lambda x, g, s: block_forward(block, layers, x.to(device), g, s, group_adapters(g, nested, use_adapter0))


# -----------------------------------------------------------------------------
# phase 1: block-wise multi-sparsity reconstruction


def group_loss(out, y, out0=None):
    """Group 0: MSE(out, Y). Group g > 0: 0.5 MSE(out, Y) + 0.5 MSE(out, out_0), out_0 detached: a higher
    sparsity is pulled towards the dense target and towards what group 0 already reaches."""
    if out0 is None:
        return F.mse_loss(out, y)
    return 0.5 * F.mse_loss(out, y) + 0.5 * F.mse_loss(out, out0)


def train_step(block, layers, x, y, draws, procs=SOLO):
    """The gradients of one EPTS step: every group g at its drawn sparsity with its adapters, draws[g] = (s,
    group_adapters(g, ...)), each group's loss backpropagated so that their gradients accumulate. Returns the
    summed loss (0-d, on y's device). x, y: (B, T, C) pruned inputs and dense targets. With several processes
    each computes its own groups."""
    out0, total = None, torch.zeros((), device=y.device)  # out0: group 0's output, detached
    for g, (s, adapters) in enumerate(draws):
        if procs.owns(g):
            out = block_forward(block, layers, x, g, s, adapters).float()
            loss = group_loss(out, y, out0)  # group 0 runs first, with out0 still None
            loss.backward()
            total += loss.detach()
            if g == 0:
                out0 = out.detach()
        if g == 0:
            out0 = procs.share_group0(out0, y)
    return total


def train_block(block, layers, streams, config, gen, procs=SOLO):
    """Train the adapters of one block so that every group's output matches the dense output Y: per step one
    train_step, then one Adam step with a cosine-decayed learning rate. Returns the mean loss of each epoch.
    streams = (X, Y): (N, T, C) pruned inputs and dense targets, on the block's device or in CPU memory."""
    (X, Y), device = streams, prune.device_of(block)
    edges, batch_size = config.edges, config.batch_size
    N, G = X.shape[0], len(edges) - 1
    per_epoch = math.ceil(N / batch_size)
    steps = config.epochs * per_epoch
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    opt = torch.optim.Adam(params, lr=config.lr, fused=params[0].is_cuda)  # fused: one kernel on a GPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    draws = [stratified_draws(edges[g], edges[g + 1], steps, gen) for g in range(G)]  # [g][step]
    epoch_losses = []
    for epoch in range(config.epochs):
        order = torch.randperm(N, generator=gen).to(X.device)
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch: no sync per step
        for b in range(per_epoch):
            step = epoch * per_epoch + b
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, y = X[idx].to(device), Y[idx].to(device).float()  # (B, T, C)
            groups = [(d[step], group_adapters(g, config.nested)) for g, d in enumerate(draws)]
            loss = train_step(block, layers, x, y, groups, procs)
            total += procs.sum_gradients(params, loss).double()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        epoch_losses.append(total.item() / (per_epoch * G))
    procs.check_same(params)
    return epoch_losses


@torch.no_grad()
def mean_error(forward, X, Y, device, batch_size, procs=SOLO):
    """Mean squared error of forward(X) against Y, a batch of windows at a time (each process its share)."""
    err = torch.zeros((), dtype=torch.float64, device=device)
    lo, hi = procs.windows(X.shape[0], batch_size)
    for i in range(lo, hi, batch_size):
        out = forward(X[i:i + batch_size].to(device))
        err += F.mse_loss(out.float(), Y[i:i + batch_size].to(device).float(), reduction="sum").double()
    return procs.sum(err).item() / Y.numel()


def low_group_check(block, layers, streams, config, procs=SOLO):
    """True if adapter 0 lowers the block's error at the check sparsity (inside group 0's range); else group 0
    deploys without its adapter. streams = (X, Y) as train_block's."""
    (X, Y), device = streams, prune.device_of(block)
    s = min(max(config.check_sparsity, config.edges[0]), config.edges[1])

    def error(adapters):
        with torch.no_grad():  # one sparsity for every window: merge the block's weights once, not per batch
            weights = block_weights(layers, 0, s, adapters)
        return mean_error(lambda x: functional_call(block, weights, (x,)), X, Y, device, config.batch_size, procs)

    return error(adapters=True) < error(adapters=False)


# -----------------------------------------------------------------------------
# phase 2: the multi-sparsity feature mixer (MSFM)


class MSFM:
    """The multi-sparsity feature mixer (EPTS phase 2): the next block's pruned inputs are
    sum_g w_g * block(x) at one sparsity drawn uniformly from each group g's range (edges[g], edges[g+1]].

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
    def mix(self, forward, x, draws):
        """sum_g w_g forward(x, g, draws[g]) in float32: one batch x (B, T, C) through the block at one drawn
        sparsity per group, forward(x, g, s) being the block at sparsity s in group g (not run where w_g = 0)."""
        return sum(w * forward(x, g, s).float() for g, (w, s) in enumerate(zip(self.weights, draws)) if w)


class OneSparsity(MSFM):
    """The mixer's ablation: the next block's pruned inputs are this block's outputs at the one sparsity s."""

    def __init__(self, edges, s):
        g = group_of(edges, s)
        super().__init__(edges, weights=[float(k == g) for k in range(len(edges) - 1)])
        self.s = s

    def draw(self, gen):
        return [self.s] * (len(self.edges) - 1)


def mix_stream(msfm, forward, X, batch_size, gen, procs=SOLO):
    """The mixed outputs (N, T, C) of the pruned stream X, fresh draws for every batch. Every process draws for
    every batch, so the generators stay in step, and mixes its own share of the batches."""
    draws = [msfm.draw(gen) for _ in range(math.ceil(X.shape[0] / batch_size))]
    return procs.map_batches(lambda i, x: msfm.mix(forward, x, draws[i // batch_size]), X, batch_size)


# -----------------------------------------------------------------------------
# the block loop: phase 1 and 2 for every block in turn


def train_blocks(model, calib_ids, config, device, resume, procs=SOLO):
    """EPTS over every block (the module docstring's loop). resume = (partial, done): each finished block's
    record is saved in the folder `partial` (if not None), and the records `done` by an interrupted run are
    replayed instead of trained."""
    (partial, done), G = resume, len(config.edges) - 1
    home = prune.device_of(model)
    # four streams: dense inputs, their outputs (the target), pruned inputs, mixed outputs; beside them one
    # block's weights, order, saved tensors and activations, about 6x its weights
    X_dense = prune.embed_calibration(model, calib_ids, device, config.batch_size, n_streams=4,
                                      reserve_bytes=6 * prune.param_bytes(model.blocks[0]))  # (N, T, C)
    X_pruned = X_dense.clone()
    progress = prune.Progress(len(model.blocks), "epts", start=len(done))
    msfm = MSFM(config.edges) if config.mixer == "msfm" else OneSparsity(config.edges, config.mixer) \
        if config.mixer != "dense" else None
    if done and partial:
        print(f"epts: resuming {partial}: blocks 0..{len(done) - 1} are done, replaying their outputs",
              file=sys.stderr)
    records = []
    for i, block in enumerate(model.blocks):
        block.to(device)
        # seeded from (seed, block) alone, so that a resumed run draws what an uninterrupted one would; 100_003 (a
        # prime > 2 x any block count) keeps the seeds of different --seed values apart
        gen = torch.Generator().manual_seed(config.seed * 100_003 + 2 * i)  # adapter init, training draws
        mix_gen = torch.Generator().manual_seed(config.seed * 100_003 + 2 * i + 1)  # the mixer's draws
        if i < len(done):
            rec = done[i]
            layers = restore_layers(block, rec, G, config.rank)
            Y = procs.run_block(block, X_dense, device, config.batch_size)
        else:
            stats = prune.new_stats(block, hessian=False, device=device)
            Y = procs.run_block(block, X_dense, device, config.batch_size, stats)  # act norms of DENSE inputs
            act_norms = {n: s.act_norm for n, s in stats.items()}
            layers = elastic_layers(block, act_norms, G, config.rank, generator=gen)
            losses = train_block(block, layers, (X_pruned, Y), config, gen, procs)
            use0 = low_group_check(block, layers, (X_pruned, Y), config, procs) if config.check_low_group else True
            rec = block_record(layers, use0, act_norms, losses)
            if partial:
                save(rec, os.path.join(partial, f"block_{i:03d}.pt"))
        records.append(rec)
        X_pruned = Y if msfm is None else mix_stream(  # mixer "dense": the next block trains on dense inputs
            msfm, deployed_forward(block, layers, rec["use_adapter0"], config.nested), X_pruned, config.batch_size,
            mix_gen, procs)
        X_dense = Y
        del layers
        block.to(home)
        if i >= len(done) and procs.index == 0:
            progress.step(f", loss {rec['losses'][0]:.3g} -> {rec['losses'][-1]:.3g}, "
                          f"adapter 0 {'on' if rec['use_adapter0'] else 'off'}")
    return records


# -----------------------------------------------------------------------------
# deployment: merge adapters, apply the mask; no adapters at inference time


@torch.no_grad()
def deploy(model, elastic, sparsity):
    """Turn the dense `model` into the sparse model at `sparsity` (a fraction, or a list: one per block), in
    place."""
    if elastic["fingerprint"] != M.fingerprint(model):
        raise UserError("the elastic model was trained on a different checkpoint (fingerprints differ); deploy it "
                        "on the --ckpt it was trained with, or train a new one for this checkpoint.")
    n_blocks = len(model.blocks)
    per_block = prune.block_sparsities(sparsity, n_blocks)
    if len(elastic["blocks"]) != n_blocks:
        raise UserError(f"the elastic model holds {len(elastic['blocks'])} blocks, but the model has {n_blocks}.")
    if len(per_block) != n_blocks:
        raise UserError(f"deploy needs one sparsity per block ({n_blocks} blocks), got {len(per_block)}.")
    edges, G = elastic["edges"], len(elastic["edges"]) - 1
    for block, rec, s in zip(model.blocks, elastic["blocks"], per_block):
        g = group_of(edges, s)
        layers = restore_layers(block, rec, G, elastic["rank"])
        for name, lin in block.linears().items():
            layer = layers[name]
            adapters = group_adapters(g, elastic.get("nested", True), rec["use_adapter0"])
            lin.weight.copy_(layer.weight(g, layer.deploy_mask(s), adapters))
    return model


# -----------------------------------------------------------------------------
# the elastic file: what is new (activation norms, adapters, flags), nothing else; checksummed, resumable


def record_checksum(rec):
    """sha256 of a block record's tensors and flag: flipped bytes in a saved file must not deploy silently."""
    h = hashlib.sha256(str(rec["use_adapter0"]).encode())
    for key in ("act_norm", "A", "B"):
        for name in sorted(rec[key]):
            h.update(f"{key}.{name}".encode())
            h.update(rec[key][name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_checksum(elastic):
    """sha256 of an elastic file's settings and its block records' checksums in order: an edited edge, rank or
    fingerprint, or two blocks swapped, must not deploy silently."""
    settings = {k: v for k, v in elastic.items() if k not in ("blocks", "sha256")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rec in elastic["blocks"]:
        h.update(rec["sha256"].encode())
    return h.hexdigest()


def block_record(layers, use_adapter0, act_norms, losses):
    rec = {"act_norm": {n: a.float().cpu() for n, a in act_norms.items()},
           "A": {n: layer.A.detach().cpu() for n, layer in layers.items()},
           "B": {n: layer.B.detach().cpu() for n, layer in layers.items()},
           "use_adapter0": bool(use_adapter0), "losses": losses}
    rec["sha256"] = record_checksum(rec)
    return rec


def restore_layers(block, rec, n_groups, rank):
    act_norms = {n: a.to(prune.device_of(block)) for n, a in rec["act_norm"].items()}
    # a generator of its own for the initial draws the record overwrites: deploy leaves torch's global one alone
    layers = elastic_layers(block, act_norms, n_groups, rank, generator=torch.Generator())
    for name, layer in layers.items():
        layer.A.data.copy_(rec["A"][name])
        layer.B.data.copy_(rec["B"][name])
    return layers


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
    if fmt is not None and found not in (fmt, *OLD_FORMATS):
        raise UserError(f"{path!r} is not an EPTS elastic model file of format {fmt} (found {found!r}); it may be "
                        f"from an older version of this program, or from another program: {fix}")
    records = obj.get("blocks", [obj]) if isinstance(obj, dict) else None
    if records is None or any(not isinstance(r, dict) or r.get("sha256") != record_checksum(r) for r in records):
        raise UserError(f"{path!r}: {what} fails its checksum (its bytes were changed after it was written); {fix}")
    if fmt is not None and found == fmt and obj.get("sha256") != file_checksum(obj):
        raise UserError(f"{path!r}: {what}'s settings or block order fail their checksum (changed after it was "
                        f"written); {fix}")
    return obj


def load_elastic(path):
    """The elastic model of an --out folder, or of the elastic.pt file itself, checksums verified."""
    if os.path.isdir(path):
        path = os.path.join(path, "elastic.pt")
    if not os.path.isfile(path):
        raise UserError(f"no elastic model at {path!r}; pass --elastic the --out folder of a finished EPTS run "
                        "(it holds elastic.pt).")
    return load_checked(path, "the elastic model", "train it again (or restore it from a copy).", fmt=FORMAT)


def changed_settings(previous, settings):
    """The settings in which an earlier run (its saved dict) differs from this one, named for a refusal; "" if none."""
    changed = sorted(k for k in settings if previous.get(k) != settings[k])
    why = (" (calib_sha256: other calibration windows, from another --calib, or from a version of this program that "
           "drew them differently)") if "calib_sha256" in changed else ""
    return f"({', '.join(changed)}){why}" if changed else ""


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


def earlier_run(out_dir, settings):
    """The finished elastic model in out_dir, or None; an earlier run there, finished or interrupted, with other
    settings is refused (never overwritten or mixed with this one)."""
    final, meta = os.path.join(out_dir, "elastic.pt"), os.path.join(out_dir, "partial", "run.json")
    if os.path.isfile(final):
        elastic = load_elastic(final)
        changed = changed_settings(elastic, settings)
        if changed:
            raise UserError(f"{out_dir!r} already holds a finished EPTS run with other settings {changed}; it is not "
                            f"overwritten: pass another --out, or delete {final} to train again there.")
        return elastic
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                previous = json.load(f)
            assert isinstance(previous, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            raise UserError(f"{meta!r} is damaged, so the unfinished run's settings are unknown; delete "
                            f"{os.path.dirname(meta)!r} to start over.") from None
        if previous != settings:
            raise UserError(f"{out_dir!r} holds an unfinished EPTS run with other settings "
                            f"{changed_settings(previous, settings) or '(fields this version does not write)'}; rerun "
                            "with the same settings to resume it, or pass another --out.")
    return None


def resume_records(partial, settings):
    """The finished blocks of an interrupted run (earlier_run has checked its settings), in order; none for a new
    run, whose settings are written first."""
    if not os.path.isfile(meta := os.path.join(partial, "run.json")):
        os.makedirs(partial, exist_ok=True)
        M.save_json(settings, meta)
    records = []
    while os.path.isfile(path := os.path.join(partial, f"block_{len(records):03d}.pt")):
        records.append(load_checked(path, f"block {len(records)}", f"delete it and run the same command again to "
                                    f"train block {len(records)} anew and resume from there."))
    return records


def windows_sha256(calib_ids):
    """sha256 of the calibration windows' ids (the first 16 hex digits)."""
    return hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest()[:16]


def run_settings(model, calib_ids, config):
    """What an EPTS run depends on, saved with it: an earlier run in the same folder is reused only if they agree."""
    return {**asdict(config), "edges": [float(e) for e in config.edges], "nsamples": calib_ids.shape[0],
            "seqlen": calib_ids.shape[1], "fingerprint": M.fingerprint(model),
            "calib_sha256": windows_sha256(calib_ids)}


def run_epts(model, calib_ids, out_dir, config=EPTSConfig(), device="cpu", procs=SOLO):
    """Train the elastic model block by block; saves each finished block in out_dir and resumes from them.

    A finished run in out_dir with the same settings is reused; one with other settings is refused, never
    overwritten. Only one run at a time may work in out_dir. With several processes, process 0 alone reads and
    writes out_dir and tells the others what it found.
    """
    if procs.index > 0:
        if procs.share(None) == "finished":
            return None
        return train_blocks(model, calib_ids, config, device, (None, procs.share(None)), procs)
    settings = run_settings(model, calib_ids, config)
    os.makedirs(out_dir, exist_ok=True)
    final, partial = os.path.join(out_dir, "elastic.pt"), os.path.join(out_dir, "partial")
    with exclusive(out_dir):
        elastic = earlier_run(out_dir, settings)
        if elastic is not None:
            print(f"epts: {final} already holds a finished run with these settings; reusing it", file=sys.stderr)
            procs.share("finished")
            return elastic
        procs.share("train")
        try:
            records = train_blocks(model, calib_ids, config, device,
                                   (partial, procs.share(resume_records(partial, settings))), procs)
        except KeyboardInterrupt:
            print(f"interrupted: the finished EPTS blocks are saved in {partial}; run the same command "
                  "again to resume from the first unfinished block", file=sys.stderr)
            raise
        elastic = {"format": FORMAT, "model_type": model.cfg.raw.get("model_type"), **settings, "blocks": records}
        elastic["sha256"] = file_checksum(elastic)
        save(elastic, final)
    shutil.rmtree(partial, ignore_errors=True)
    return elastic


# -----------------------------------------------------------------------------
# the command line: a request, checked into a plan before any work, then one row per method and sparsity

METHODS = ("dense", *prune.BASELINES, *(f"{m}+si" for m in prune.SI_BASES), "epts")


@dataclass
class Request:
    """What one command asks for: which model, methods and sparsities, on which text, with results where."""
    ckpt: str = None  # Hugging Face-format folder; None: the built-in default model
    sparsities: list = (0.5,)  # fractions, and (n, m) N:M patterns for the baselines
    methods: list = ("dense", "epts")
    calib: str = None  # calibration text file
    evals: list = ()  # evaluation text files, one perplexity row each
    nsamples: int = None  # calibration windows; default 128
    seqlen: int = None  # tokens per window; default min(2048, the model's positions)
    device: str = "cpu"
    dtype: str = None  # default: model.default_dtype
    offload: bool = False  # blocks wait in CPU memory, one at a time on the device
    out: str = None  # the EPTS run folder; default runs/epts-<ckpt name>
    elastic: str = None  # deploy an earlier EPTS run (its --out or elastic.pt) instead of training
    export: str = None  # write the one pruned model here as a Hugging Face-format folder
    json: str = None  # write the results here
    allocation: str = "uniform"  # per-block sparsities: uniform, owl, or a JSON file's list
    tasks: list = ()  # zero-shot tasks (eval.TASKS), each read from tasks_dir/TASK.jsonl
    tasks_dir: str = None
    eval_batch_size: int = 4
    pruning: prune.PruneConfig = prune.PruneConfig()  # the baselines' settings (SparseGPT, RIA, EGGS, SSLC, SI)


@dataclass
class Plan:
    """A request checked against the checkpoint's config and the input files: what main runs."""
    request: Request  # with the built-in model's defaults filled in
    config: EPTSConfig  # with the groups extended to the highest sparsity
    seqlen: int
    nsamples: int
    dtype: str
    rows: list  # (method, sparsity) in the order they run: dense, the baselines, EPTS
    allocation: object  # "uniform", "owl", or a file's list of per-block sparsities
    task_docs: dict
    needs_calib: bool
    elastic: dict = None  # --elastic's model, loaded and checked
    out_dir: str = None  # where EPTS trains; None when it does not


def method_sparsities(method, sparsities):
    """The requested sparsities a method runs at: EPTS deploys fractions, EGGS prunes N:M patterns, the others
    both."""
    kind = method.removesuffix("+si")
    if kind in ("epts", "eggs"):
        return [s for s in sparsities if isinstance(s, tuple) == (kind == "eggs")]
    return sparsities


def check_methods(r):
    """The methods can run at the requested sparsities."""
    fractional = [s for s in r.sparsities if not isinstance(s, tuple)]
    eggs = any(m.removesuffix("+si") == "eggs" for m in r.methods)
    if "epts" in r.methods and not fractional:
        raise UserError("EPTS deploys fractional sparsities such as 0.5, and --sparsities holds only N:M patterns; "
                        "add a fraction, or run the N:M patterns without epts in --methods.")
    if "epts" in r.methods and len(fractional) < len(r.sparsities):
        print("note: epts deploys fractional sparsities only; N:M patterns run for the baselines", file=sys.stderr)
    if eggs and len(fractional) == len(r.sparsities):
        raise UserError("EGGS prunes N:M patterns only (its guarantee is per run of M inputs), and --sparsities "
                        "holds only fractions; add a pattern such as 2:4 or 4:8.")
    if eggs and fractional:
        print("note: eggs prunes N:M patterns only; fractional sparsities run for the other methods", file=sys.stderr)
    if r.pruning.ria_alpha < 0 and any(m.removesuffix("+si") in ("ria", "eggs") for m in r.methods):
        print(f"warning: --ria-alpha {r.pruning.ria_alpha} is negative: RIA and EGGS then favour the weights of the "
              "least active inputs, and a dead input (||X_j|| = 0) scores infinity and is kept first",
              file=sys.stderr)
    for n, m in (s for s in r.sparsities if isinstance(s, tuple) and eggs):
        if r.pruning.eggs_diagonals > n:
            raise UserError(f"--eggs-diagonals {r.pruning.eggs_diagonals} is more than the {n} weights {n}:{m} "
                            f"keeps in each run of {m}; use at most {n}.")


def read_allocation(allocation, n_blocks):
    """'uniform' and 'owl' as they are; else the per-block sparsities of a JSON file (a list, one per block)."""
    if allocation in ("uniform", "owl"):
        return allocation
    try:
        with open(allocation) as f:
            sparsities = json.load(f)
        assert isinstance(sparsities, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    and 0 <= x < 1 for x in sparsities)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise UserError(f"--allocation {allocation!r} is not uniform, owl, or a readable JSON file holding a list "
                        "of per-block sparsities in [0, 1), e.g. [0.45, 0.5, 0.55, ...].") from None
    if len(sparsities) != n_blocks:
        raise UserError(f"--allocation {allocation!r} lists {len(sparsities)} sparsities, but the model has "
                        f"{n_blocks} blocks; give one per block.")
    return [float(x) for x in sparsities]


def is_report(path):
    """Whether `path` holds a results JSON this program wrote (so --json may replace it)."""
    try:
        with open(path) as f:
            report = json.load(f)
        return isinstance(report, dict) and isinstance(report.get("results"), list) and "ckpt" in report
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def check_outputs(r, rows, out_dir, writer=True):
    """--export, --json and --out can be written, without overwriting an input or anything not ours, and --export
    names one pruned model. `writer`: this process is the one that works in --out (process 0 under torchrun),
    so it also checks what --out holds and that no other run is working there."""
    if r.export:
        pruned = [row for row in rows if row[0] != "dense"]
        if len(pruned) != 1:
            raise UserError(f"--export writes one pruned model, but {len(pruned)} were requested: give "
                            "exactly one pruned method and one sparsity.")
        if os.path.realpath(r.export) == os.path.realpath(r.ckpt):
            raise UserError(f"--export {r.export!r} is the checkpoint folder itself; choose a new folder.")
        M.check_writable(r.export, "--export", folder=True, new=True)
    if r.json:
        run = [os.path.join(out_dir, name) for name in ("elastic.pt", "lock", "partial")] if out_dir else []
        inputs = [r.ckpt, r.calib, *r.evals, r.elastic, r.tasks_dir, *run]  # read, or written by the run itself
        written = [r.export, *run[2:]]  # folders the run fills
        target = os.path.realpath(r.json)
        if any(p and target == os.path.realpath(p) for p in inputs) or \
                any(p and target.startswith(os.path.realpath(p) + os.sep) for p in written):
            raise UserError(f"--json {r.json!r} is an input of this run or a file it writes; choose another name.")
        M.check_writable(r.json, "--json")
        if os.path.exists(r.json) and not is_report(r.json):
            raise UserError(f"--json {r.json!r} exists and is not a results file of this program; nothing is "
                            "overwritten: choose a new name.")
    if out_dir:
        M.check_writable(out_dir, "--out", folder=True)
        if writer:  # the other processes would race process 0, which may already be writing there
            check_run_folder(out_dir)


def check_run_folder(out_dir):
    """--out holds nothing of the user's where a run writes: `lock` absent or a process id, `partial/` absent or
    a run's (its run.json and block files), so that neither the lock nor the clean-up touches the user's files;
    and no other run is working there."""
    lock_file, partial = os.path.join(out_dir, "lock"), os.path.join(out_dir, "partial")
    held = open(lock_file, errors="replace").read().strip() if os.path.isfile(lock_file) else ""
    if held and not held.isdigit():  # empty: a run's lock between its truncate and its pid
        raise UserError(f"--out {out_dir!r} holds a file 'lock' that is not an EPTS run's; choose another --out.")
    if os.path.isfile(lock_file):
        with exclusive(out_dir):  # another run working there is refused now, not after the baselines
            pass
    if os.path.isdir(partial):
        names = os.listdir(partial)
        strangers = [n for n in names if n != "run.json" and not n.startswith("block_") and ".tmp-" not in n]
        if strangers or (names and "run.json" not in names):
            raise UserError(f"--out {out_dir!r} holds a folder 'partial' that is not an unfinished EPTS run's "
                            f"(it has {', '.join(sorted(strangers or names)[:3])}); choose another --out.")


def check_space(r, model, out_dir, config):
    """The disks of --export and --out have room for what the run writes there: the exported model, and the
    elastic file (G LoRA pairs of rank r and an activation norm per layer, float32). model: on the meta device,
    in the run's dtype."""
    layers = [lin for block in model.blocks for lin in block.linears().values()]
    G = len(config.edges) - 1
    needs = {"--export": (r.export, prune.param_bytes(model)),
             "--out": (out_dir, sum(4 * (G * config.rank * (lin.in_features + lin.out_features) + lin.in_features)
                                    for lin in layers))}
    for flag, (path, need) in needs.items():
        if path:
            free = shutil.disk_usage(M.nearest_existing(path)).free
            if free < need:
                raise UserError(f"{flag} {path!r} needs about {need / 2**20:.0f} MiB, but its disk has "
                                f"{free / 2**20:.0f} MiB free; free some space or write elsewhere.")


def available_memory(meminfo="/proc/meminfo"):
    """Bytes the machine can still give (MemAvailable plus free swap, from /proc/meminfo); None where unknown."""
    try:
        with open(meminfo) as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def calibration_streams(method, allocation):
    """How many calibration streams (N, T, C) a baseline's row holds at once: pruning's (prune.calibration_streams),
    or OWL's ratio pass's two where that is more (magnitude); none for dense and EPTS (its four are counted apart)."""
    if method in ("dense", "epts"):
        return 0
    return max(prune.calibration_streams(method), 2 * (allocation == "owl"))


def check_memory(r, rows, model, dtype, windows, train_epts):
    """The least memory the run needs fits where it will be, so that a run too big is refused now, not killed
    hours later. The model waits on the GPU, or in CPU memory on a CPU run or with --offload; beside it, while a
    row other than the last is pruned, a copy of its blocks (the last row prunes the model itself). On a CPU run
    the calibration streams, each windows = (N, T) tokens x C features, are in CPU memory too: EPTS's 4 while it
    trains, a pruned row's 2 (3 with SI). Under torchrun every process on this machine holds a model and EPTS's
    streams of its own while EPTS trains (LOCAL_WORLD_SIZE of them). model: on the meta device, in `dtype`."""
    itemsize, on_gpu = M.DTYPES[dtype].itemsize, r.device.startswith("cuda") and not r.offload
    models = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if train_epts and not on_gpu else 1
    model_bytes, blocks_bytes = prune.param_bytes(model), prune.param_bytes(model.blocks)
    stream = math.prod(windows) * model.cfg.hidden_size * itemsize if r.device == "cpu" else 0
    need = models * model_bytes + max([models * 4 * stream if train_epts else 0] + [
        (blocks_bytes if i < len(rows) - 1 else 0) + calibration_streams(m, r.allocation) * stream
        for i, (m, _) in enumerate(rows) if m != "dense"])
    have = prune.free_device_bytes(r.device) if on_gpu else available_memory()
    if have is not None and need > have:
        GiB, where = 2 ** 30, r.device if on_gpu else "the machine"
        fix = "pass --offload (the blocks wait in CPU memory and visit the GPU one at a time)" if on_gpu else \
            "lower --nsamples or --seqlen, use --dtype bfloat16"
        streams = f"; a calibration stream of {windows[0]} x {windows[1]} tokens: {stream / GiB:.2f} GiB" * bool(stream)
        each = f" in each of {models} processes" * (models > 1)
        raise UserError(f"this run needs at least {need / GiB:.2f} GiB on {where} (the model in {dtype}: "
                        f"{model_bytes / GiB:.2f} GiB{each}; a copy of its blocks to prune, for every pruned row but "
                        f"the last: {blocks_bytes / GiB:.2f} GiB{streams}), but {where} has {have / GiB:.2f} GiB free; "
                        f"{fix}, prune one method at one sparsity per run, or use a machine with more memory.")


def plan(r, config, procs=SOLO):
    """Every check the arguments, the checkpoint's config and the input files allow, before any work."""
    if r.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu or install a "
                        "CUDA build of PyTorch.")
    if procs.size > 1:
        r = replace(r, device=str(procs.comm))
    if r.ckpt is None:
        ckpt, defaults = default_model.ensure_default()
        r = replace(r, ckpt=ckpt, calib=r.calib or defaults["calib"], evals=r.evals or [defaults["eval"]],
                    seqlen=r.seqlen or defaults["seqlen"], nsamples=r.nsamples or defaults["nsamples"])
    cfg = M.read_config(r.ckpt)
    # never the 131072 positions of a LLaMA-3.1 config: Wanda users ran out of memory exactly so
    seqlen, nsamples = r.seqlen or min(2048, cfg.max_position_embeddings), r.nsamples or 128
    dtype = r.dtype or M.default_dtype(cfg, r.device)
    print(f"model: {r.ckpt} ({cfg.raw.get('model_type')}, {cfg.num_hidden_layers} blocks), dtype {dtype}, "
          f"seqlen {seqlen}", file=sys.stderr)
    M.check_seqlen(cfg, seqlen)
    if not r.evals and not r.tasks:
        raise UserError("no evaluation data: pass --eval FILE (e.g. WikiText-2 wiki.test.raw) to measure "
                        "perplexity, or --tasks with --tasks-dir for zero-shot accuracy.")
    if r.tasks and not r.tasks_dir:
        raise UserError("--tasks needs --tasks-dir DIR, the folder holding TASK.jsonl for every task (nothing is "
                        "downloaded).")
    task_docs = {task: read_task(r.tasks_dir, task) for task in r.tasks}
    clash = set(eval_names(r.evals)) & {*task_docs, "zero-shot mean"}
    if clash:
        raise UserError(f"--eval {sorted(clash)[0]!r} has the name of a zero-shot row; rename the file.")
    check_methods(r)
    train_epts = "epts" in r.methods and not r.elastic
    needs_calib = any(m not in ("dense", "magnitude", "epts") for m in r.methods) or train_epts or \
        (r.allocation == "owl" and "magnitude" in r.methods)  # OWL's ratios for a baseline: a calibration pass
    if needs_calib and not r.calib:
        raise UserError("no calibration data: pass --calib FILE (e.g. a C4 train shard .json.gz or WikiText-2 "
                        "wiki.train.raw).")
    allocation = read_allocation(r.allocation, cfg.num_hidden_layers)
    if isinstance(allocation, list):  # the file's list is the one fractional deployment; its mean names the rows
        mean = sum(allocation) / len(allocation)
        r = replace(r, sparsities=[mean] + [s for s in r.sparsities if isinstance(s, tuple)])
        print(f"note: --allocation {r.allocation}: one fractional row per method, at the file's per-block "
              f"sparsities (mean {mean:.4g}); N:M rows stay uniform", file=sys.stderr)
    rows = [(m, s) for m in METHODS if m in r.methods for s in ([0.0] if m == "dense" else
                                                                method_sparsities(m, r.sparsities))]
    rows = list(dict.fromkeys(rows))  # a sparsity given twice is measured once
    out_dir = (r.out or os.path.join("runs", f"epts-{os.path.basename(os.path.normpath(r.ckpt))}")) \
        if train_epts else None
    check_outputs(r, rows, out_dir, writer=procs.index == 0)  # under torchrun process 0 alone works in --out
    if r.export and any(m.endswith("+si") for m in r.methods):
        M.check_bias_export(cfg)  # SI's shift gives every layer a bias
    deployed = allocation if isinstance(allocation, list) else [s for m, s in rows if m == "epts"]
    elastic = None
    if "epts" in r.methods and r.elastic:
        elastic = load_elastic(r.elastic)
        for s in deployed:
            group_of(elastic["edges"], s)  # every requested sparsity inside the trained range, or a clear error
    if train_epts:
        config = replace(config, edges=tuple(extend_edges(config.edges, max(deployed))))
        if config.mixer not in ("msfm", "dense"):
            group_of(config.edges, config.mixer)  # the one sparsity fed forward lies inside the trained range
        if procs.size > len(config.edges) - 1:
            raise UserError(f"{procs.size} processes for {len(config.edges) - 1} groups: each process computes "
                            "whole groups, so run at most as many processes as groups.")
    with torch.device("meta"):
        sizes = M.build_model(cfg).to(M.DTYPES[dtype])  # the model's shapes, no memory: what the run writes, holds
    check_space(r, sizes, out_dir, config)
    check_memory(r, rows, sizes, dtype, (nsamples, seqlen), train_epts)
    return Plan(r, config, seqlen, nsamples, dtype, rows, allocation, task_docs, needs_calib, elastic, out_dir)


def load(ckpt, dtype=torch.float32):
    """The model and tokenizer of a checkpoint folder, checked to belong together."""
    model = M.load_model(ckpt, dtype)
    tok = data.load_tokenizer(ckpt, model.cfg.bos_token_id)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size} embedding rows; the tokenizer files belong to another model.")
    return model, tok


def check_layers(model, r, allocation):
    """Every N:M pattern fits every layer it prunes (prune.check_nm), and SSLC's budget leaves its low-rank part
    a rank of at least 1 (check_sslc_rank; at every block's own sparsity under an --allocation file): checked
    before any method runs. A model with low-rank parts (an SSLC export) is evaluated, never pruned again."""
    if any(isinstance(lin, M.SparsePlusLowRank) for lin in model.blocks[0].linears().values()) and \
            set(r.methods) != {"dense"}:
        raise UserError(f"{r.ckpt!r} holds SSLC's low-rank parts (lora/), which the pruning methods would ignore; "
                        "evaluate it with --methods dense, or prune the dense checkpoint it came from.")
    for s in r.sparsities:
        if isinstance(s, tuple):
            for name, lin in model.blocks[0].linears().items():
                try:
                    prune.check_nm(lin.in_features, *s, name)
                except ValueError as e:
                    raise UserError(str(e)) from None
        if "sslc" in r.methods:
            check_sslc_rank(model, allocation if isinstance(allocation, list) and not isinstance(s, tuple) else s,
                            r.pruning.rank_ratio)


def check_sslc_rank(model, sparsity, rank_ratio):
    """SSLC's budget at `sparsity` (one for every block, or a list: one per block, e.g. OWL's) leaves every layer's
    low-rank part a rank of at least 1, or --rank-ratio 0 asks for none."""
    per_block = prune.block_sparsities(sparsity, len(model.blocks))
    for i, (block, s) in enumerate(zip(model.blocks, per_block)):
        for name, lin in block.linears().items():
            if rank_ratio > 0 and prune.sslc_budget(lin.out_features, lin.in_features, s, rank_ratio)[0] < 1:
                where = f" in block {i} (its sparsity {prune.format_sparsity(s)})" * isinstance(sparsity, list)
                raise UserError(f"SSLC at {prune.format_sparsity(s)} with --rank-ratio {rank_ratio} leaves {name} "
                                f"({lin.out_features} x {lin.in_features}){where} no rank for its low-rank part; raise "
                                "--rank-ratio or lower the sparsity (--rank-ratio 0 is sparse only).")


def check_finite_weights(model, method, sparsity, pruning):
    """A pruned model's blocks are finite (the checkpoint's tensors were checked on loading, model.check_finite,
    and pruning changes only the blocks), or the method that made them is named, with the settings that can make
    it diverge."""
    bad = next((name for name, t in model.blocks.named_parameters(prefix="blocks") if not torch.isfinite(t).all()),
               None)
    if bad is None:
        return
    fix = "report it with the command" if not method.endswith("+si") else \
        f"Sparsity Induction's training diverged at --si-lr {pruning.si_lr} --si-lambda {pruning.si_lambda} " \
        f"--si-alpha {pruning.si_alpha} --si-p {pruning.si_p}: lower --si-lr or --si-lambda"
    raise UserError(f"{method} at sparsity {prune.format_sparsity(sparsity)} made non-finite weights ({bad}); {fix}.")


def eval_names(paths):
    """Row name of each evaluation file: its base name, or the path as given where two base names collide."""
    base = [os.path.basename(p) for p in paths]
    names = {(b if base.count(b) == 1 else p): p for b, p in zip(base, paths)}
    if len(names) < len(paths):
        raise UserError("--eval names one file twice; give each evaluation file once.")
    return names


def measures(p, tok):
    """{row name: function(model) -> metrics}: perplexity on every --eval file, accuracy on every task."""
    r, found = p.request, {}
    for name, path in eval_names(r.evals).items():
        ids = data.eval_tokens(path, tok, p.seqlen)
        found[name] = lambda m, ids=ids: {"ppl": perplexity(m, ids, p.seqlen, r.eval_batch_size, r.device)}
    for task, docs in p.task_docs.items():
        found[task] = lambda m, task=task, docs=docs: zero_shot(m, tok, task, docs, r.device, r.eval_batch_size)
    return found


def prunable_copy(model):
    """A copy of the dense model to prune in place: its blocks are copied, the embeddings, final norm and head
    are shared (pruning never changes them), so each method costs one set of blocks, not a reload."""
    shared = {id(p): p for name, p in model.named_parameters() if not name.startswith("blocks.")}
    return copy.deepcopy(model, memo=shared)


class Allocation:
    """The per-block sparsities each method deploys (prune.allocate), OWL's outlier ratios computed once per
    source: the calibration pass for the baselines, the elastic file's activation norms for EPTS."""

    def __init__(self, allocation, model, calib_ids, device):
        self.allocation, self.model, self.calib_ids, self.device, self.ratios = allocation, model, calib_ids, device, {}

    def __call__(self, method, s, elastic=None):
        if self.allocation != "owl" or isinstance(s, tuple):
            return prune.allocate(self.allocation, s)
        source = "epts" if method == "epts" else "calibration"
        if source not in self.ratios:
            self.ratios[source] = prune.owl_ratios(self.model, self.calib_ids, self.device) if source != "epts" else \
                [prune.outlier_ratio(b, rec["act_norm"]) for b, rec in zip(self.model.blocks, elastic["blocks"])]
        hi = elastic["edges"][-1] if method == "epts" else 0.99  # EPTS: inside the elastic model's range
        return prune.allocate("owl", s, self.ratios[source], hi, method)


def files_sha256(paths):
    """sha256 of the files' bytes, in order (the first 16 hex digits)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def report_settings(p, model, calib_ids):
    """What every row depends on besides its method and sparsity: the request's flags, the EPTS settings (or
    --elastic's model), the checkpoint's fingerprint, the bytes of the tokenizer, evaluation texts and task files,
    the calibration windows and this program's code. Rows of an earlier --json are reused only if all agree."""
    r = p.request
    modules = ("__main__" if __name__ == "__main__" else __name__, "data", "default_model", "eval", "model",
               "parallel", "prune")
    tokenizer = [os.path.join(r.ckpt, name) for name in M.TOKENIZER_FILES]
    inputs = [path for path in tokenizer if os.path.isfile(path)] + [data.resolve(path, "test") for path in r.evals] + \
        [os.path.join(r.tasks_dir, f"{task}.jsonl") for task in r.tasks]
    request = {k: v for k, v in asdict(r).items() if k not in ("methods", "sparsities", "json", "export")}
    settings = {**request, "allocation": p.allocation, "seqlen": p.seqlen, "nsamples": p.nsamples, "dtype": p.dtype,
                "epts": asdict(p.config), "elastic_sha256": p.elastic and file_checksum(p.elastic),
                "fingerprint": M.fingerprint(model), "inputs_sha256": files_sha256(inputs),
                "code_sha256": files_sha256(sys.modules[m].__file__ for m in modules),
                "calib_sha256": None if calib_ids is None else windows_sha256(calib_ids)}
    return json.loads(json.dumps(settings))  # as --json stores it (tuples become lists)


class Results:
    """One row per (method, sparsity, evaluation) on stdout and in the report; --export written from the one
    pruned model, then --json rewritten after every row. Rows an interrupted run with the same settings wrote
    to --json are reused."""

    def __init__(self, p, measures):
        self.p, self.measures, self.earlier = p, measures, {}
        self.report = {"ckpt": p.request.ckpt, "seqlen": p.seqlen, "nsamples": p.nsamples, "seed": p.config.seed,
                       "dtype": p.dtype, "allocation": p.request.allocation, "settings": None, "results": []}
        self.widths = {"method": 13, "sparsity": 9, "eval": max(14, *map(len, measures)) + 1, "ppl": 11,
                       "seconds": 9}

    def print_row(self, cells):
        print(" ".join(f"{str(cells[name]):<{w}}" for name, w in self.widths.items()), flush=True)

    def keep(self, row):
        """One evaluation's row: into the report, and printed."""
        self.report["results"].append(row)
        value = f"{row['ppl']:.3f}" if "ppl" in row else f"acc {row['acc']:.4f}"
        self.print_row(dict(row, ppl=value, seconds=f"{row['seconds']:.1f}"))

    def resume(self, settings):
        """Record the run's settings, and reuse the rows an earlier run with the same ones wrote to --json (an
        interrupted run resumes from them); a file of other settings is replaced."""
        self.report["settings"], path, earlier = settings, self.p.request.json, {}
        if path and is_report(path):
            with open(path) as f:
                earlier = json.load(f)
            if earlier.get("settings") != settings:
                print(f"note: --json {path!r} holds results of other settings (or of other code); they are replaced",
                      file=sys.stderr)
                earlier = {}
        for row in earlier.get("results", []):
            if not (self.p.request.export and row["method"] != "dense"):  # the model to export is pruned again
                self.earlier.setdefault((row["method"], row["sparsity"]), []).append(row)
        if "epts" in earlier:  # the EPTS run's time and size, if its rows are reused
            self.report["epts"] = earlier["epts"]
        found = sum((m, prune.format_sparsity(s)) in self.earlier for m, s in self.p.rows)
        if found:
            print(f"note: --json {path!r} holds {found} of this run's {len(self.p.rows)} (method, "
                  "sparsity) rows, finished with these settings; they are reused, not measured again (delete the "
                  "file to measure them again)", file=sys.stderr)

    def reuse(self, method, sparsity):
        """Keep the rows of (method, sparsity) an earlier run with these settings measured; False if it has none."""
        rows = self.earlier.get((method, prune.format_sparsity(sparsity)), [])
        for row in rows:
            self.keep(row)
        return bool(rows)

    def add(self, method, sparsity, model, seconds, deployed=None):
        r, tasks = self.p.request, self.p.task_docs
        evaluated = {name: measure(model) for name, measure in self.measures.items()}  # offloaded: block by block
        if tasks:  # the tasks' mean accuracy, as the papers' tables give it
            evaluated["zero-shot mean"] = {"acc": sum(evaluated[t]["acc"] for t in tasks) / len(tasks)}
        sparse = {}  # one count of the model's zeros, whatever the number of evaluation rows
        if method != "dense":
            sparse = {"achieved_sparsity": round(prune.achieved_sparsity(model), 6),
                      "kept_params": round(prune.kept_share(model), 6)}  # SSLC: S's nonzeros + U, V
            if isinstance(deployed, list):
                sparse["block_sparsities"] = [round(x, 6) for x in deployed]
        for name, metrics in evaluated.items():
            if not math.isfinite(metrics.get("ppl", 0)):  # its weights are finite (check_finite_weights)
                why = "float32 overflow: a damaged checkpoint?" if self.p.dtype == "float32" else \
                    f"{self.p.dtype} overflow: try --dtype float32"
                raise UserError(f"{method} at sparsity {prune.format_sparsity(sparsity)} gives perplexity "
                                f"{metrics['ppl']} on {name}: the model's outputs are not finite ({why}).")
            self.keep({"method": method, "sparsity": prune.format_sparsity(sparsity), "eval": name, **metrics,
                       "seconds": round(seconds, 3), **sparse})
        if r.json:  # before --export: a failed export loses no measured row (and an export's row is never reused)
            M.save_json(self.report, r.json)
        if r.export and method != "dense":
            M.save_model(model, r.export, tokenizer_dir=r.ckpt)
            print(f"exported {method} at {prune.format_sparsity(sparsity)} to {r.export}", file=sys.stderr)


def train_elastic(model, calib_ids, p, procs, report):
    """run_epts for the plan, its time (None: an earlier run's model reused) and the elastic file's size reported
    (process 0)."""
    reused = os.path.isfile(os.path.join(p.out_dir, "elastic.pt"))  # finished with these settings, or refused
    t0 = time.time()
    elastic = run_epts(model, calib_ids, p.out_dir, p.config, p.request.device, procs)
    seconds = None if reused else round(time.time() - t0, 3)
    if procs.index > 0:
        return elastic
    size = os.path.getsize(os.path.join(p.out_dir, "elastic.pt"))
    model_bytes = prune.param_bytes(model)  # a tied head once
    took = "was an earlier run's" if reused else f"took {seconds:.1f}s"
    print(f"epts: the one optimisation {took}; elastic model {p.out_dir}/elastic.pt is {size / 2**20:.2f} MiB "
          f"({100 * size / model_bytes:.1f}% of the model's {model_bytes / 2**20:.1f} MiB)", file=sys.stderr)
    report["epts"] = {"out": p.out_dir, "train_seconds": seconds, "elastic_bytes": size,
                      "model_bytes": model_bytes, "edges": list(p.config.edges), "processes": procs.size}
    return elastic


def main(request=Request(), config=EPTSConfig()):
    """Run the requested methods at every sparsity, print the perplexity table, write --json/--out/--export.

    Every check of the request runs first (plan), so a bad flag never costs the time of the methods before it.
    """
    torch.manual_seed(config.seed)
    procs = Procs.from_env(request.device)  # under torchrun: this process's index, and its GPU
    p = plan(request, config, procs)
    r = p.request
    if procs.index > 0 and p.out_dir is None:
        return None  # several processes share only the EPTS optimisation; process 0 does the rest
    model, tok = load(r.ckpt, M.DTYPES[p.dtype])
    model.to("cpu" if r.offload else r.device)
    check_layers(model, r, p.allocation)
    results = Results(p, measures(p, tok))
    calib_ids = data.calibration(r.calib, tok, p.nsamples, p.seqlen, p.config.seed) if p.needs_calib else None
    elastic = p.elastic
    if p.out_dir and procs.size > 1:  # every process takes part in the optimisation, so it comes first
        elastic = train_elastic(model, calib_ids, p, procs, results.report)
        if procs.index > 0:
            return None
    if p.out_dir and procs.size == 1:  # an earlier run in --out with other settings: refused before the baselines
        earlier_run(p.out_dir, run_settings(model, calib_ids, p.config))
    results.resume(report_settings(p, model, calib_ids))
    allocate = Allocation(p.allocation, model, calib_ids, r.device)
    results.print_row({name: name for name in results.widths})
    for method, s in p.rows:
        if results.reuse(method, s):
            continue
        if method == "dense":
            results.add("dense", 0.0, model, 0.0)
            continue
        if method == "epts" and elastic is None:
            elastic = train_elastic(model, calib_ids, p, procs, results.report)
        in_place = (method, s) == p.rows[-1]  # no row after it needs the dense model: no copy to hold
        pruned, t0, deployed = model if in_place else prunable_copy(model), time.time(), allocate(method, s, elastic)
        if method == "epts":
            deploy(pruned, elastic, deployed)
        else:
            if method == "sslc" and isinstance(deployed, list):  # OWL's per-block sparsities, known only now
                check_sslc_rank(model, deployed, r.pruning.rank_ratio)
            prune.prune_model(pruned, method, deployed, calib_ids, r.device, r.pruning)
        check_finite_weights(pruned, method, s, r.pruning)
        results.add(method, s, pruned, time.time() - t0, deployed)
        del pruned  # before the next row's copy: one pruned model at a time
    if r.json:
        M.save_json(results.report, r.json)
    return results.report


def parse_args(argv):
    """The command line as a Request and an EPTSConfig; bad flags exit with argparse's usage message."""
    defaults = EPTSConfig
    p = argparse.ArgumentParser(description="EPTS: one optimisation, an elastic sparse model for every sparsity.")
    p.add_argument("--ckpt", help="Hugging Face-format LLaMA/OPT folder (default: the built-in small model)")
    p.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma-separated fractions or N:M patterns")
    p.add_argument("--methods", default="dense,epts", help=f"comma-separated, any of {','.join(METHODS)}")
    p.add_argument("--calib", help="calibration data: C4 .json(.gz) shard, WikiText-2 file/folder, or .txt")
    p.add_argument("--eval", nargs="+", default=[], help="evaluation file(s) for perplexity")
    p.add_argument("--tasks", default="", help=f"zero-shot tasks, comma-separated: {','.join(sorted(TASKS))}")
    p.add_argument("--tasks-dir", help="folder holding TASK.jsonl for each task (the datasets' field names)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128; built-in model: less)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, the model's positions); "
                   "built-in model: less)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(M.DTYPES),
                   help="default: the checkpoint's torch_dtype on cuda, float32 on cpu")
    p.add_argument("--offload", action="store_true", help="keep blocks in CPU memory, move one at a time")
    p.add_argument("--out", help="EPTS run folder (elastic.pt; resumable); default runs/epts-<ckpt name>")
    p.add_argument("--elastic", help="deploy an earlier EPTS run (its --out folder or elastic.pt), no training")
    p.add_argument("--export", help="write the one pruned model as a Hugging Face-format folder")
    p.add_argument("--json", help="write the results as JSON (a rerun with the same settings reuses its rows)")
    p.add_argument("--allocation", default="uniform", help="per-block sparsities: uniform, owl (from Wanda "
                   "scores' outliers; EPTS: from the elastic file, no calibration), or a JSON file's list")
    p.add_argument("--groups", default=",".join(f"{e:g}" for e in defaults.edges), help="EPTS group edges")
    p.add_argument("--epochs", type=int, help=f"EPTS epochs per block (default {defaults.epochs}; built-in model: "
                   f"{default_model.DEFAULTS['epochs']})")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--rank", type=int, default=defaults.rank, help="the LoRA rank r of every adapter")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="EPTS calibration windows per step")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--no-nesting", action="store_true", help="EPTS ablation: group g uses its own adapter alone, "
                   "not adapters 0..g")
    p.add_argument("--mixer", default="msfm", help="EPTS: the next block's pruned inputs: msfm (the paper's mix), "
                   "dense (the dense outputs), or one sparsity such as 0.5 (ablations)")
    p.add_argument("--no-low-group-check", action="store_true", help="EPTS ablation: always deploy adapter 0")
    p.add_argument("--ria-alpha", type=float, default=prune.PruneConfig.ria_alpha,
                   help="RIA and EGGS: the exponent a on the input norm ||X_j||")
    p.add_argument("--eggs-diagonals", type=int, default=prune.PruneConfig.eggs_diagonals,
                   help="EGGS: cyclic diagonals kept in every M x M tile (every input keeps that many per tile)")
    p.add_argument("--rank-ratio", type=float, default=prune.PruneConfig.rank_ratio,
                   help="SSLC: the share of the kept parameters given to the low-rank part, in [0, 1)")
    p.add_argument("--alternations", type=int, default=prune.PruneConfig.alternations,
                   help="SSLC: at most this many (low-rank, sparse) steps per layer (fewer once the error stops "
                   "falling)")
    p.add_argument("--sslc-momentum", type=float, default=prune.PruneConfig.sslc_momentum,
                   help="SSLC: the low-rank step fits S extrapolated by this share of its last change (0: plain "
                   "alternation, as OATS)")
    si = prune.PruneConfig
    p.add_argument("--si-epochs", type=int, default=si.si_epochs, help="Sparsity Induction: epochs per block, "
                   "the masks refreshed at each")
    p.add_argument("--si-lr", type=float, default=si.si_lr, help="SI: Adam's learning rate for scales and shifts")
    p.add_argument("--si-lambda", type=float, default=si.si_lambda, help="SI: weight of the norm term")
    p.add_argument("--si-alpha", type=float, default=si.si_alpha, help="SI: the norm term's exp(-alpha sum ||W~||_p)")
    p.add_argument("--si-p", type=float, default=si.si_p, help="SI: the norm term's entrywise p")
    p.add_argument("--si-clamp", type=float, default=si.si_clamp, help="SI: Eq. 5's scales clamped into [1/c, c] "
                   "times their median; 1: the shift alone")
    a = p.parse_args(argv)
    try:
        sparsities = [prune.parse_sparsity(s) for s in a.sparsities.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--sparsities: {e}")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in (m for m in methods if m.endswith("+si") and m not in METHODS):
        p.error(f"--methods: {m}: Sparsity Induction (+si) prepares the weights for a method that scores them; "
                f"it applies to {', '.join(prune.SI_BASES)}, not {m.removesuffix('+si')}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    for name in ("nsamples", "seqlen"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} must be a positive integer")
    if not a.device.startswith(("cpu", "cuda")):
        p.error(f"--device: {a.device!r} is not cpu or cuda")
    epochs = a.epochs if a.epochs is not None else defaults.epochs if a.ckpt else default_model.DEFAULTS["epochs"]
    try:
        edges = tuple(float(e) for e in a.groups.split(","))
    except ValueError:
        p.error(f"--groups: {a.groups!r} is not a comma-separated list of numbers")
    try:
        mixer = a.mixer if a.mixer in ("msfm", "dense") else float(a.mixer)
        config = EPTSConfig(edges, epochs, a.lr, a.rank, a.batch_size, a.seed, nested=not a.no_nesting, mixer=mixer,
                            check_low_group=not a.no_low_group_check)
    except ValueError:
        p.error(f"--mixer {a.mixer!r} must be msfm, dense, or one sparsity in [0, 1) such as 0.5.")
    except UserError as e:
        p.error(str(e))
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if any(t not in TASKS for t in tasks):
        p.error(f"--tasks: unknown task {', '.join(t for t in tasks if t not in TASKS)}; choose from "
                f"{', '.join(sorted(TASKS))}")
    if a.si_epochs < 1:  # the library's 0 keeps the transform as initialised: not the method the flag names
        p.error(f"--si-epochs {a.si_epochs} must be an integer >= 1")
    try:
        pruning = prune.PruneConfig(ria_alpha=a.ria_alpha, eggs_diagonals=a.eggs_diagonals, rank_ratio=a.rank_ratio,
                                    alternations=a.alternations, sslc_momentum=a.sslc_momentum,
                                    si_epochs=a.si_epochs, si_lr=a.si_lr,
                                    si_lambda=a.si_lambda, si_alpha=a.si_alpha, si_p=a.si_p, si_clamp=a.si_clamp)
    except ValueError as e:
        p.error(str(e))
    given = {k: v for k, v in vars(a).items() if k in Request.__dataclass_fields__}
    return Request(**dict(given, sparsities=sparsities, methods=methods, evals=a.eval, tasks=tasks,
                          pruning=pruning)), config


def interrupt(signum, frame):
    """SIGTERM (timeout, kill, Slurm, docker stop) ends the run as Ctrl-C does: temporary files and folders are
    removed on the way out, finished EPTS blocks stay."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    request, config = parse_args(sys.argv[1:])
    code = 0
    try:
        main(request, config)
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process finds the same error: say it once
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # run_epts has said where its finished blocks are, if it ran
        code = 130
    exit_process(code)
