"""
EPTS: Elastic Post-Training Sparsity (Xu et al., KDD 2026), for LLaMA and OPT.

One block-wise optimisation yields an *elastic* model: the dense weights, one Wanda score per weight (kept as
activation norms) and G nested LoRA pairs per layer (MS-HiLoRA). Any sparsity in the trained range is then
deployed in seconds, without calibration data.

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

The elastic file on disk, the run folder and resume live in run.py; the command line and its checks in cli.py.
"""

import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import prune
from parallel import SOLO
from prune import mask_from_order, row_mask, row_order, wanda_score  # unqualified: ElasticLinear copies as it is


@dataclass(frozen=True)
class EPTSConfig:
    """The settings of one EPTS optimisation (the paper's defaults), saved in the elastic file."""
    edges: tuple = (0.0, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70)  # group g covers (edges[g], edges[g+1]]
    epochs: int = 10
    lr: float = 1e-3
    rank: int = 8  # r of each of the G nested LoRA pairs
    batch_size: int = 1  # calibration windows per training step
    seed: int = 0  # calibration sampling, adapter init, sparsity draws
    check_sparsity: float = 0.3  # where the low-group check decides whether adapter 0 is deployed
    # the paper's ablations, off only to measure what each buys: the hierarchy (group g sums adapters 0..g; False:
    # its own adapter g alone), the mixer ("msfm"; "dense": the next block trains on the dense outputs; a sparsity
    # s: on this block's outputs at s alone) and the low-group check (False: adapter 0 always deployed)
    nested: bool = True
    mixer: object = "msfm"
    check_low_group: bool = True

    def __post_init__(self):
        e = self.edges
        if len(e) < 2 or e[0] < 0 or any(b <= a for a, b in zip(e, e[1:])) or e[-1] >= 1:
            raise ValueError(f"edges {','.join(map(str, e))} must increase strictly within [0, 1), e.g. 0,0.4,0.5,0.7")
        for name in ("epochs", "rank", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a positive integer")
        if not 0 <= self.lr < math.inf:  # 0 trains nothing: the deployed masks are Wanda's, the adapters zero
            raise ValueError(f"lr {self.lr} must be a number >= 0 (the authors use 1e-3)")
        m = self.mixer
        if m not in ("msfm", "dense") and not (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1):
            raise ValueError(f"mixer {m!r} must be msfm, dense, or one sparsity in [0, 1) such as 0.5")


# -----------------------------------------------------------------------------
# sparsity groups


def extend_edges(edges, max_sparsity, step=0.05):
    """Add groups in `step`s until the range covers `max_sparsity`."""
    edges = list(edges)
    while edges[-1] < max_sparsity - 1e-9:
        edges.append(round(edges[-1] + step, 10))
    if edges[-1] >= 1:
        raise ValueError(f"EPTS adds groups in {step} steps up to the highest sparsity, and {max_sparsity} would "
                         f"need one reaching {edges[-1]:g}; give edges whose last lies between {max_sparsity} and 1 "
                         f"(e.g. {','.join(f'{e:g}' for e in edges[:-1])},{max_sparsity:g})")
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
    raise ValueError(f"sparsity {s} is above the elastic model's range (up to {edges[-1]}); train a new elastic "
                     f"model whose sparsities include {s}")


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
    float32 W it is the float32 merge, bit for bit."""

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
    and M_0.7 ⊆ M_0.5 by construction. Adapters are float32 whatever the model's dtype."""

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
            order[r:r + rows] = row_order(wanda_score(self.W[r:r + rows], self.act_norm))
        return order

    def mask(self, s):
        return mask_from_order(self.order, s)

    def deploy_mask(self, s):
        """The same mask as mask(s), by selection instead of a full sort."""
        return row_mask(wanda_score(self.W, self.act_norm), s)

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
    for G = 7), so the later blocks learn most from the high sparsities where pruning hurts most."""

    def __init__(self, edges, weights=None):
        self.edges, G = list(edges), len(edges) - 1
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


def train_blocks(model, calib_ids, config, device, resume=((), None), procs=SOLO):
    """EPTS over every block (the module docstring's loop); returns each block's record (block_record).
    resume = (done, on_block): the records an interrupted run finished, replayed instead of trained, and
    on_block(i, record), called as each other block finishes (run.py saves it there and shows progress)."""
    (done, on_block), G, home = resume, len(config.edges) - 1, prune.device_of(model)
    # four streams: dense inputs, their outputs (the target), pruned inputs, mixed outputs; beside them one
    # block's weights, order, saved tensors and activations, about 6x its weights
    X_dense = prune.embed_calibration(model, calib_ids, device, config.batch_size, n_streams=4,
                                      reserve_bytes=6 * prune.param_bytes(model.blocks[0]))  # (N, T, C)
    X_pruned = X_dense.clone()
    msfm = MSFM(config.edges) if config.mixer == "msfm" else OneSparsity(config.edges, config.mixer) \
        if config.mixer != "dense" else None
    records = []
    for i, block in enumerate(model.blocks):
        block.to(device)
        # seeded from (seed, block) alone, so that a resumed run draws what an uninterrupted one would; 100_003 (a
        # prime > 2 x any block count) keeps the seeds of different seed values apart
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
            if on_block:
                on_block(i, rec)
        records.append(rec)
        X_pruned = Y if msfm is None else mix_stream(  # mixer "dense": the next block trains on dense inputs
            msfm, deployed_forward(block, layers, rec["use_adapter0"], config.nested), X_pruned, config.batch_size,
            mix_gen, procs)
        X_dense = Y
        del layers
        block.to(home)
    return records


# -----------------------------------------------------------------------------
# deployment: merge adapters, apply the mask; no adapters at inference time. Below it the block record, what
# the elastic file stores of each block (its format, checksums and resume: run.py)


@torch.no_grad()
def deploy(model, elastic, sparsity):
    """Turn the dense `model` into the sparse model at `sparsity` (a fraction, or a list: one per block), in
    place. `elastic` must have been trained on this model (run.check_fingerprint)."""
    n_blocks = len(model.blocks)
    per_block = prune.block_sparsities(sparsity, n_blocks)
    if len(elastic["blocks"]) != n_blocks:
        raise ValueError(f"the elastic model holds {len(elastic['blocks'])} blocks, but the model has {n_blocks}")
    if len(per_block) != n_blocks:
        raise ValueError(f"deploy needs one sparsity per block ({n_blocks} blocks), got {len(per_block)}")
    edges, G = elastic["edges"], len(elastic["edges"]) - 1
    for block, rec, s in zip(model.blocks, elastic["blocks"], per_block):
        g = group_of(edges, s)
        layers = restore_layers(block, rec, G, elastic["rank"])
        adapters = group_adapters(g, elastic.get("nested", True), rec["use_adapter0"])
        for name, lin in block.linears().items():
            lin.weight.copy_(layers[name].weight(g, layers[name].deploy_mask(s), adapters))
    return model


def block_record(layers, use_adapter0, act_norms, losses):
    """What the elastic file keeps of a trained block: what is new (activation norms, adapters, the low-group
    flag) and the losses; the block's own weights stay in the checkpoint."""
    return {"act_norm": {n: a.float().cpu() for n, a in act_norms.items()},
            "A": {n: layer.A.detach().cpu() for n, layer in layers.items()},
            "B": {n: layer.B.detach().cpu() for n, layer in layers.items()},
            "use_adapter0": bool(use_adapter0), "losses": losses}


def restore_layers(block, rec, n_groups, rank):
    """The ElasticLinears of a block as its record saved them."""
    act_norms = {n: a.to(prune.device_of(block)) for n, a in rec["act_norm"].items()}
    # a generator of its own for the initial draws the record overwrites: deploy leaves torch's global one alone
    layers = elastic_layers(block, act_norms, n_groups, rank, generator=torch.Generator())
    for name, layer in layers.items():
        layer.A.data.copy_(rec["A"][name])
        layer.B.data.copy_(rec["B"][name])
    return layers


if __name__ == "__main__":  # the command line lives in cli.py; `python epts.py ...` stays the command
    import cli
    cli.command(sys.argv[1:])
