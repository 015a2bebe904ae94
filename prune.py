"""
Post-training pruning baselines in plain PyTorch: magnitude, Wanda, SparseGPT, RIA (unstructured and
N:M), EGGS-PTP (N:M), SSLC (sparse plus low-rank), and Sparsity Induction before any of the first five, driven
block by block for LLaMA and OPT alike.

A sparsity is either a fraction s in [0, 1) or an (n, m) pair: keep n of every
m consecutive input weights of a row (2:4 and 4:8 are 50 %, 1:4 is 75 %).
"""


import copy
import math
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model import SparsePlusLowRank  # SSLC's layer: the model files read and write it


# -----------------------------------------------------------------------------
# scores and masks the methods share (mask: True = weight kept)


def row_order(score):
    """Each weight's place in its row's ascending order of score (out, in), 0 = lowest; ties keep column order."""
    by_score = torch.argsort(score, dim=1, stable=True)  # (out, in): column indices, lowest score first
    order = torch.empty_like(by_score)
    order.scatter_(1, by_score, torch.arange(score.shape[1], device=score.device).expand_as(by_score))
    return order


def mask_from_order(order, s):
    """Per-row mask keeping the `in - int(in * s)` weights highest in the order; nested in s by construction."""
    return order >= int(order.shape[1] * s)


def lowest_k(score, k):
    """True at the k lowest scores of each row, ties taken in column order: the first k of a stable ascending
    sort (= row_order(score) < k), found by selection in O(in) instead of sorting. score: (rows, n)."""
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr = score.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1): the k-th lowest score of each row
    below = score < thr
    tied = score == thr
    need = k - below.sum(1, keepdim=True)  # how many of the tied scores the row still has to give up
    if torch.equal(tied.sum(1, keepdim=True), need):  # no row gives up only some of its ties (the usual case)
        return below | tied
    return below | (tied & (tied.cumsum(1, dtype=torch.int32) <= need))


def row_mask(score, s):
    """Per-row unstructured mask: every row keeps exactly `in - int(in * s)` weights (the same weights as
    mask_from_order(row_order(score), s))."""
    return ~lowest_k(score, int(score.shape[1] * s))


def check_nm(in_features, n, m, name="one"):
    """An N:M pattern needs the layer's inputs to split into runs of m."""
    if in_features % m:
        fits = [f"{k // 2}:{k}" for k in range(2, 65) if in_features % k == 0][:2]  # patterns that do fit
        hint = f", e.g. {' or '.join(fits)}" if fits else ""
        raise ValueError(f"N:M sparsity {n}:{m} needs every layer's in_features divisible by {m}, but {name} has "
                         f"{in_features}; choose an M that divides it{hint}.")


def nm_mask(score, n, m):
    """N:M mask: in every run of m consecutive input columns of a row keep the n highest scores."""
    out_f, in_f = score.shape
    check_nm(in_f, n, m)
    groups = score.view(out_f, in_f // m, m)
    pruned = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]  # (out, in/m, m-n) lowest scores
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, pruned, False)
    return mask.view(out_f, in_f)


def matrix_mask(score, s):
    """One threshold per matrix: the `int(numel * s)` lowest scores are pruned exactly (ties by position)."""
    return ~lowest_k(score.reshape(1, -1), int(score.numel() * s)).view_as(score)


def score_mask(score, sparsity):
    """The mask of a per-weight score: every row keeps its highest scores (fraction), or n of every m (N:M)."""
    return nm_mask(score, *sparsity) if isinstance(sparsity, tuple) else row_mask(score, sparsity)


# -----------------------------------------------------------------------------
# magnitude: |W_ij|, one threshold per matrix


def magnitude_mask(W, sparsity):
    """Magnitude baseline: one threshold per matrix (fraction), or N:M on |W|."""
    score = W.abs().float()
    return nm_mask(score, *sparsity) if isinstance(sparsity, tuple) else matrix_mask(score, sparsity)


# -----------------------------------------------------------------------------
# Wanda (Sun et al. 2023): |W_ij| ||X_j||, compared within each output row


def wanda_score(W, act_norm):
    """Wanda (Sun et al. 2023, eq. 1): S_ij = |W_ij| * ||X_j||_2.  W: (out, in), act_norm: (in,)."""
    return W.abs().float() * act_norm.float().view(1, -1)


def wanda_mask(W, act_norm, sparsity):
    return score_mask(wanda_score(W, act_norm), sparsity)


# -----------------------------------------------------------------------------
# RIA (Zhang et al. 2024) and EGGS-PTP (Bazarbachi et al. 2025): N:M that keeps every input connected


def ria_score(W, act_norm, alpha=0.5):
    """RIA's relative importance and activations (eq. 4): (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) *
    ||X_j||_2^alpha, a weight measured against its input column and its output row. W: (out, in), act_norm: (in,)."""
    A = W.abs().float()
    tiny = torch.finfo(A.dtype).tiny  # an all-zero row or column (pruned before) scores 0, not 0/0
    return (A / A.sum(0, keepdim=True).clamp_min(tiny) + A / A.sum(1, keepdim=True).clamp_min(tiny)) \
        * act_norm.float().view(1, -1) ** alpha


def diagonal_mask(score, m, b):
    """EGGS-PTP's diagonal selection, as we reconstruct it (METHODS.md §2): cut the layer into m x m tiles (m rows x
    one run of m inputs), sum each tile's score along its m cyclic diagonals {(r, (r + t) mod m)} and mark the b
    best. A cyclic diagonal meets every row and every column of its tile once, so every input keeps b weights in
    every tile and every row b of each run of m. Rows are padded with zeros to whole tiles (cut off at the end)."""
    out_f, in_f = score.shape
    S = torch.nn.functional.pad(score, (0, 0, 0, -out_f % m))  # (R, in), R a multiple of m
    S = S.view(-1, m, in_f // m, m).transpose(1, 2)  # (R/m, in/m, m rows, m cols): one tile per [i, j]
    r = torch.arange(m, device=score.device)
    diag_cols = (r.view(1, -1) + r.view(-1, 1)) % m  # [t, row]: the column of diagonal t in that row
    diag = S[..., r.expand(m, m), diag_cols].sum(-1)  # (R/m, in/m, m): summed score of each diagonal t
    best = torch.zeros_like(diag, dtype=torch.bool).scatter_(-1, diag.topk(b, dim=-1).indices, True)
    on_diag = (r.view(1, -1) - r.view(-1, 1)) % m  # [row, col]: the diagonal t through that position
    keep = best[..., on_diag]  # (R/m, in/m, m rows, m cols)
    return keep.transpose(1, 2).reshape(-1, in_f)[:out_f]


def eggs_mask(score, n, m, b=1):
    """EGGS-PTP's N:M mask (reconstructed): the b best cyclic diagonals of every m x m tile are kept
    (diagonal_mask), and each row fills its other n - b slots of every run of m with its highest other scores.
    b = 0 is plain N:M on the score."""
    if not 0 <= b <= n:
        raise ValueError(f"EGGS keeps b cyclic diagonals of every {m} x {m} tile inside each row's n = {n} of {m}, "
                         f"so b must lie in [0, {n}], got {b}.")
    check_nm(score.shape[1], n, m)
    forced = diagonal_mask(score, m, b)
    return nm_mask(score.masked_fill(forced, math.inf), n, m)


# -----------------------------------------------------------------------------
# SparseGPT (Frantar & Alistarh 2023, Algorithm 1)


def damped_hinv_chol(H, percdamp):
    """Upper Cholesky factor of (H + damp*I)^-1; retry with 10x dampening if H is not positive definite."""
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        if attempt == 0:
            print(f"SparseGPT: H is not positive definite at dampening {percdamp}; retrying with 10x more",
                  file=sys.stderr)
        damp = damp * 10
    raise RuntimeError("SparseGPT: Cholesky failed even with 1e5x the dampening; the Hessian is degenerate")


def sparsegpt_prune(W, H, sparsity, blocksize=128, percdamp=0.01):
    """Prune W (out, in) given H = 2/n X X^T (in, in); returns the pruned, error-compensated weight.

    Unlike the reference code, which prunes `int(count * s) + 1` weights per block through `<=` on a
    threshold, this prunes exactly `int(count * s)`, so sparsity 0 leaves W unchanged.
    """
    W = W.clone().float()
    H = H.clone().float()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero carry no information: prune them freely
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = damped_hinv_chol(H, percdamp)  # (in, in), upper triangular
    nm = sparsity if isinstance(sparsity, tuple) else None
    if nm is not None:  # whole runs of m inputs in every lazy batch (2:12 would split 128 columns into 10 2/3 runs)
        blocksize = max(1, blocksize // nm[1]) * nm[1]

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)

        # the mask for the whole block at once, from the OBS saliency w^2 / [H^-1]_ii^2
        if nm is None:
            pruned = ~matrix_mask(W1 ** 2 / d.view(1, -1) ** 2, sparsity)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / d[i:i + m].view(1, -1) ** 2
                pruned[:, i:i + m] = ~nm_mask(score, n, m)
            q = w.clone()
            q[pruned[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            # update the block's remaining columns to compensate the error (OBS update)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    return W


# -----------------------------------------------------------------------------
# SSLC (Zong et al. 2025), reconstructed after OATS: W ≈ S + U V, S sparse, U V of low rank


def sslc_budget(out_f, in_f, sparsity, rank_ratio):
    """(r, k): L's rank and the weights S keeps per row. A fraction s: of the (1 - s) out in parameters kept,
    L = U V takes the share rank_ratio, r (out + in) of them, and S the rest, k per row (within one weight per
    row of the budget). An (n, m) pattern: S is exactly n:m, k = in n / m, and L adds rank_ratio / (1 -
    rank_ratio) of S's count."""
    if isinstance(sparsity, tuple):
        k = in_f // sparsity[1] * sparsity[0]
        return int(rank_ratio / (1 - rank_ratio) * out_f * k // (out_f + in_f)), k
    budget = int((1 - sparsity) * out_f * in_f)
    r = int(rank_ratio * budget // (out_f + in_f))
    return r, (budget - r * (out_f + in_f)) // out_f


def low_rank(A, r, V=None):
    """The best rank-r approximation of A (out, in), as U (out, r) and V (r, in, orthonormal rows). Cold: a
    randomized SVD, seeded, so a layer gives the same factors in every run and the caller's random state is left
    as it was. Warm, given the last alternation's V: one step of subspace iteration from V's row space, a third
    of the products, for A moves little from one alternation to the next."""
    if r == 0:
        return A.new_zeros(A.shape[0], 0), A.new_zeros(0, A.shape[1])
    if V is None:
        with torch.random.fork_rng(devices=[A.device] if A.is_cuda else []):
            torch.manual_seed(0)
            U, s, V = torch.svd_lowrank(A, q=min(r + 10, *A.shape))  # 10 extra columns, 2 power iterations
        return U[:, :r] * s[:r], V[:, :r].t()
    Q = torch.linalg.qr(A @ V.t()).Q  # (out, r): an orthonormal basis of A's range, seen from V
    Ub, s, V = torch.linalg.svd(Q.t() @ A, full_matrices=False)  # (r, r), (r,), (r, in)
    return (Q @ Ub) * s, V


SSLC_KEEP = 0.01  # the paper's "top 1 % most important weights", always in S


def sslc_prune(W, act_norm, sparsity, rank_ratio=0.25, alternations=10, momentum=0.8):
    """W (out, in) as S + U V minimising the weighted error ||(W - S - U V) D||_F, D = diag(||X_j||) (Wanda's
    statistic for X): alternately U V = the best rank-r fit of W D - S, and S = the largest entries of what it
    leaves (per row, or n of every m), the top SSLC_KEEP of |W_ij| ||X_j|| in the layer always in S. The low-rank
    step fits S extrapolated along its last change (heavy-ball `momentum`; 0: plain alternation, as OATS), warm
    from the last step's factors. Stops when the error stops falling. Returns S, U, V and the error after each
    alternation kept."""
    d = act_norm.float()  # (in,)
    # inputs silent on the calibration windows (relative to the loudest, so at any activation scale) carry nothing
    # to fit: their columns stay out of S and U V, pruned as Wanda prunes them, instead of 1/d times rounding noise
    dead = d <= 1e-6 * d.max()
    d = torch.where(dead, 1.0, d)
    Wd = W.float() * d * ~dead  # (out, in): W D, in whose units |.| is Wanda's score
    r, k = sslc_budget(*W.shape, sparsity, rank_ratio)
    forced = matrix_mask(Wd.abs(), 1 - SSLC_KEEP)  # True at the top 1 % of |W_ij| ||X_j|| in the layer

    def sparsify(R):  # the entries S keeps of R: forced ones first, then the k largest per row (or n of m)
        score = torch.where(forced, math.inf, R.abs())
        if isinstance(sparsity, tuple):
            return R * nm_mask(score, *sparsity)
        top = score.topk(k, dim=1, sorted=False).indices  # (out, k): a selection, ~2x faster than lowest_k's
        return R * torch.zeros_like(R, dtype=torch.bool).scatter_(1, top, True)

    S = S_last = torch.zeros_like(Wd)
    errors, best, V = [], None, None
    for _ in range(alternations):
        U, V = low_rank(Wd - S - momentum * (S - S_last), r, V)
        R = torch.addmm(Wd, U, V, alpha=-1)  # W D - U V
        S_last, S = S, sparsify(R)
        err = torch.linalg.norm(R - S).item()
        if errors and err >= errors[-1]:
            break  # an inexact low-rank step, or the extrapolation, may not lower it: keep the last step that did
        errors.append(err)
        best = (S, U, V)
    S, U, V = best
    return S * ~dead / d, U, V * ~dead / d, errors


# -----------------------------------------------------------------------------
# Sparsity Induction (Jiang et al. 2026): prune each block in a rescaled, shifted basis, then fold it back
#
# Per layer W~ = diag(row) W diag(col) and x~ = (x - delta) / col, the scales shared by the layer pairs of
# Block.scale_pairs (row * col factors cancel through each pair) and a shift delta per layer. With W~ pruned to
# W^, the layer on the original x is P = W^ / (row col) with bias b + (W - P) delta: exact, whatever the method.
# Wanda's masks ignore the scales. si_init "eq5": the paper as written (Eq. 5's scales on every pair, shifts from the
# means, the term exp(-alpha sum)); "act" (ours, the default): the pairs a norm feeds scaled by ||x_j||, no shift,
# the mean relative norm as the term, each block kept in SI's basis only where that lowers its output error.


def si_prune_layer(method, W, stats, sparsity, basis, config):
    """W (out, in) pruned by `method` in SI's basis = (row (out,), col (in,), delta (in,)) and folded back: P (out,
    in) and the bias change (W - P) delta."""
    row, col, delta = basis
    Wt = W.float() * row.view(-1, 1) * col
    Wt = prune_layer(method, SimpleNamespace(weight=Wt), stats.centred(delta, col), sparsity, config).weight
    P = Wt / row.view(-1, 1) / col
    return P, (W.float() - P) @ delta


def scale_pairs_on(block, names=None):
    """block.scale_pairs() (those named in `names`, if given) with their index tensors on the block's device."""
    device = device_of(block)
    return {name: (size, [(module, dim, None if index is None else index.to(device), power)
                          for module, dim, index, power in entries])
            for name, (size, entries) in block.scale_pairs().items() if names is None or name in names}


def si_factors(block, pairs, scales):
    """{module: [row, col]}: the product of the scales on each module's weight rows and columns (every Linear's)."""
    ones = lambda W: [torch.ones(W.shape[0], device=W.device), torch.ones(W.shape[-1], device=W.device)]  # noqa: E731
    factors = {n: ones(lin.weight) for n, lin in block.linears().items()}  # 1 on a layer no pair scales
    for name, (size, entries) in pairs.items():
        for module, dim, index, power in entries:
            f = factors.setdefault(module, ones(block.get_submodule(module).weight))
            f[dim] = f[dim] * (scales[name] if index is None else scales[name][index]) ** power
    return factors


def si_init(block, pairs, stats, clamp):
    """Eq. 5: channel i's scale is (median_i - mean_i)^2 of its values over the calibration tokens over its median
    over the channels, clamped into [1 / clamp, clamp] (GQA's shared scales: the mean); 1 where no input carries it."""
    scales = {}
    for name, (size, entries) in pairs.items():
        inputs = [(module, index) for module, dim, index, _ in entries if dim == 1]
        if not inputs:
            scales[name] = torch.ones(size, device=device_of(block))
            continue
        module, index = inputs[0]
        x = torch.cat(stats[module].samples)  # (tokens / sample_every, in)
        v = (x.median(0).values - stats[module].mean) ** 2  # (in,)
        if index is not None:
            v = v.new_zeros(size).index_add_(0, index, v) / v.new_zeros(size).index_add_(0, index, torch.ones_like(v))
        scales[name] = (v / v.median().clamp_min(1e-30)).clamp(1 / clamp, clamp)
    return scales


def act_scales(pairs, stats):
    """Ours: channel j's scale is ||x_j|| over the live channels' median, so |W~_ij| ranks as Wanda's score and
    magnitude keeps the loud channels' small weights; a dead channel, and every channel of a dead input, 1e-6."""
    scales = {}
    for name, (size, entries) in pairs.items():
        a = stats[next(m for m, dim, _, _ in entries if dim == 1)].act_norm.float()  # (size,), the first reader's
        scales[name] = (a / (a[a > 0].median() if (a > 0).any() else 1)).clamp_min(1e-6)
    return scales


def norm_term(abs_W, factors, p, alpha, paper=True):
    """The paper's R_p = exp(-alpha sum_l ||W~_l||_p), each layer's p-norm relative to its untransformed one (ours,
    paper=False: their mean, whose gradient moves the scales from the first step); abs_W: {layer: (|W|^p, ||W||_p)}."""
    total = 0
    for name, (Wp, norm) in abs_W.items():
        row, col = factors[name]
        total = total + (row ** p @ Wp @ col ** p) ** (1 / p) / norm
    return torch.exp(-alpha * total) if paper else total / max(len(abs_W), 1)


def induce_and_prune(block, streams, stats, method, sparsity, config):
    """SI on one block, then `method` in its basis: each of si_epochs refreshes the masks from the statistics
    (SparseGPT's from Wanda's score), then Adam steps the scales (and eq5's shifts) on the output MSE against the
    dense outputs Y plus si_lambda times the norm term. streams = (X, Y), (N, T, C)."""
    (X, Y), layers, p, paper = streams, block.linears(), config.si_p, config.si_init == "eq5"
    pairs = scale_pairs_on(block, None if paper else ("attn_in", "mlp_in"))  # ours: the pairs a norm feeds
    W = {n: lin.weight.detach().clone() for n, lin in layers.items()}
    b = {n: torch.zeros(lin.out_features, device=W[n].device) if lin.bias is None else lin.bias.detach().float()
         for n, lin in layers.items()}
    for n, lin in (layers.items() if paper else ()):  # eq5's shifts give every layer a bias; ours has no shift
        lin.bias = torch.nn.Parameter(b[n].to(W[n].dtype), requires_grad=False)
    start = si_init(block, pairs, stats, config.si_clamp) if paper else act_scales(pairs, stats)
    log_s = {g: s.log().requires_grad_() for g, s in start.items()}
    delta = {n: stats[n].mean.requires_grad_() if paper else torch.zeros_like(stats[n].mean) for n in layers}
    # an all-zero layer has no norm to scale (0/0, and an infinite gradient of x^(1/p) at 0): left out of the term
    abs_W = {n: (W[n].float().abs() ** p, torch.linalg.vector_norm(W[n].float(), p)) for n in layers if W[n].any()}
    opt = torch.optim.Adam([*log_s.values(), *(delta.values() if paper else ())], lr=config.si_lr)
    proxy, gen = "wanda" if method == "sparsegpt" else method, torch.Generator().manual_seed(0)
    for _ in range(config.si_epochs):
        with torch.no_grad():  # this epoch's masks, from the statistics alone
            factors, removed = si_factors(block, pairs, {g: s.exp() for g, s in log_s.items()}), {}
            for n, lin in layers.items():
                P, _ = si_prune_layer(proxy, W[n], stats[n], sparsity, (*factors[n], delta[n]), config)
                lin.weight.copy_(P)
                removed[n] = W[n].float() - P if paper else None  # (out, in): what the mask removes (eq5's bias)
        for batch in torch.randperm(len(X), generator=gen).split(config.batch_size):
            with torch.enable_grad():  # (prune_model runs without autograd)
                biases = {f"{n}.bias": (b[n] + removed[n] @ delta[n]).to(W[n].dtype) for n in layers if paper}
                out = torch.func.functional_call(block, biases, (X[batch].to(device_of(block)),))
                factors = si_factors(block, pairs, {g: s.exp() for g, s in log_s.items()})
                loss = F.mse_loss(out.float(), Y[batch].to(out.device).float()) + \
                    config.si_lambda * norm_term(abs_W, factors, p, config.si_alpha, paper)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
    with torch.no_grad():
        factors = si_factors(block, pairs, {g: s.exp() for g, s in log_s.items()})
        for n, lin in layers.items():
            P, shift = si_prune_layer(method, W[n], stats[n], sparsity, (*factors[n], delta[n].detach()), config)
            lin.weight.copy_(P)
            if paper:
                lin.bias.copy_(b[n] + shift)
        if not paper:  # ours: SI's basis only where it lowers the block's error, else the base method as it is
            induced, err = [lin.weight.clone() for lin in layers.values()], output_error(block, X, Y, config.batch_size)
            for n, lin in layers.items():
                lin.weight.copy_(W[n])
                prune_layer(method, lin, stats[n], sparsity, config)
            if output_error(block, X, Y, config.batch_size) > err:
                for lin, P in zip(layers.values(), induced):
                    lin.weight.copy_(P)


# -----------------------------------------------------------------------------
# OWL (Yin et al. 2024): non-uniform sparsity per block from its share of outlier Wanda scores


@torch.no_grad()
def outlier_ratio(block, act_norms, M=5.0):
    """OWL's D_l: the share of the block's Wanda scores |W_ij| ||X_j|| (all its layers together) that exceed M
    times their mean. One layer's scores at a time: the block's mean first, then the count."""
    layers = block.linears()
    act_norms = {n: a.to(device_of(block)) for n, a in act_norms.items()}
    numel = sum(lin.weight.numel() for lin in layers.values())
    mean = sum(wanda_score(lin.weight, act_norms[n]).sum(dtype=torch.float64) for n, lin in layers.items()) / numel
    above = sum((wanda_score(lin.weight, act_norms[n]) > M * mean).sum() for n, lin in layers.items())
    return above.item() / numel


@torch.no_grad()
def owl_ratios(model, calib, device="cpu", batch_size=8, M=5.0):
    """D_l of every block, from the dense model's activations on the calibration windows (block by block)."""
    home = device_of(model)
    X = embed_calibration(model, calib, device, batch_size, n_streams=2,
                          reserve_bytes=2 * param_bytes(model.blocks[0]))
    ratios, progress = [], Progress(len(model.blocks), "owl ratios")
    for block in model.blocks:
        block.to(device)
        stats = new_stats(block, hessian=False, device=device)
        X = run_block(block, X, device, batch_size, stats)
        ratios.append(outlier_ratio(block, {n: s.act_norm for n, s in stats.items()}, M))
        block.to(home)
        progress.step()
    return ratios


def owl_sparsities(ratios, S, lam=0.08, lo=0.0, hi=0.99):
    """Per-block sparsities with mean exactly S: the outlier ratios D_l mapped linearly onto a spread of 2 lam
    around S, blocks richer in outliers keeping more weights (down to about S - lam), then clipped to
    [lo, hi] with the mean restored on the blocks not at a bound. Returns (sparsities, whether any clipped)."""
    D = torch.tensor(ratios, dtype=torch.float64)
    span = D.max() - D.min()
    r = (D - D.min()) / span * 2 * lam if span > 0 else torch.zeros_like(D)
    s = S - (r - r.mean())  # OWL: density_l = r_l - mean(r) + (1 - S)
    clipped = bool(((s < lo) | (s > hi)).any())
    for _ in range(len(s)):  # each pass pins at least one more block to a bound, or ends
        s = s.clamp(lo, hi)
        deficit = S - s.mean()
        free = (s < hi) if deficit > 0 else (s > lo)  # the blocks that can move the mean back
        if abs(deficit) < 1e-12 or not free.any():
            break
        s[free] += deficit * len(s) / free.sum()
    return s.clamp(lo, hi).tolist(), clipped


def allocate(allocation, s, ratios=None, hi=0.99, method=""):
    """The per-block sparsities a method deploys for target s: s itself for "uniform" (and for an N:M pattern),
    the list itself when `allocation` is one (read from a file), or OWL's from the blocks' outlier ratios for
    "owl", clipped into [0, hi] with the mean kept."""
    if isinstance(s, tuple) or allocation == "uniform":
        return s
    if isinstance(allocation, list):
        return allocation
    sparsities, clipped = owl_sparsities(ratios, s, hi=hi)
    if clipped:
        print(f"note: OWL at {s} for {method}: blocks clipped into [0, {hi}], the others moved to keep the mean",
              file=sys.stderr)
    return sparsities


# -----------------------------------------------------------------------------
# the block-wise driver, one for every model family


def block_sparsities(sparsity, n_blocks):
    """The sparsity of each block: a list already holds one per block; a fraction or an (n, m) N:M pattern
    applies to every block (which is why per-block sparsities are a list, never a tuple)."""
    return sparsity if isinstance(sparsity, list) else [sparsity] * n_blocks


@dataclass(frozen=True)
class PruneConfig:
    """The baselines' settings; the defaults are their papers' (SSLC's: ours, see docs/methods.md)."""
    blocksize: int = 128  # SparseGPT's lazy-batch width
    percdamp: float = 0.01  # SparseGPT's dampening: 1 % of the mean diagonal of H
    ria_alpha: float = 0.5  # RIA's exponent a on ||X_j||
    eggs_diagonals: int = 1  # EGGS: b cyclic diagonals kept in every m x m tile
    rank_ratio: float = 0.25  # SSLC: the share of the kept parameters given to the low-rank part
    alternations: int = 10  # SSLC: at most this many (low-rank, sparse) steps per layer
    sslc_momentum: float = 0.8  # SSLC: the low-rank step's extrapolation of S (ours; 0: plain alternation, as OATS)
    si_epochs: int = 2  # Sparsity Induction (ours where the paper is silent: docs/methods.md): mask refreshes
    si_lr: float = 1e-2  # Adam's step on the log-scales and the shifts
    si_lambda: float = 1e-2  # weight of the norm term
    si_alpha: float = 1.0  # its exponent's factor
    si_p: float = 2.0  # its entrywise p-norm
    si_clamp: float = 10.0  # Eq. 5's scales clamped into [1 / c, c] times their median (1: the shift alone)
    si_init: str = "act"  # the transform's start: "act" (ours, the activation norms) or "eq5" (the paper's)
    batch_size: int = 8  # calibration windows per forward pass

    def __post_init__(self):
        """Every setting in its range, or a ValueError that opens on its name."""
        checks = (("blocksize", self.blocksize >= 1, "an integer >= 1"),
                  ("percdamp", self.percdamp >= 0, "a number >= 0"),
                  # ||X_j||^a overflows float32 past |a| ~ 4 on real activations (every larger score ties at inf)
                  ("ria_alpha", -4 <= self.ria_alpha <= 4, "a number in [-4, 4]"),
                  ("eggs_diagonals", self.eggs_diagonals >= 0, "an integer >= 0"),
                  ("rank_ratio", 0 <= self.rank_ratio < 1, "a number in [0, 1)"),
                  ("alternations", self.alternations >= 1, "an integer >= 1"),
                  ("sslc_momentum", 0 <= self.sslc_momentum < 1, "a number in [0, 1)"),
                  ("si_epochs", self.si_epochs >= 0, "an integer >= 0"),  # 0: the transform as initialised
                  # SI trains in float32: bounds past which a step, |W|^p or exp(-alpha ...) leaves its range
                  ("si_lr", 0 < self.si_lr <= 1, "a number in (0, 1]"),
                  ("si_lambda", 0 <= self.si_lambda <= 1e6, "a number in [0, 1e6]"),
                  ("si_alpha", 0 <= self.si_alpha <= 100, "a number in [0, 100]"),
                  ("si_p", 1 <= self.si_p <= 8, "a number in [1, 8]"),
                  ("si_clamp", 1 <= self.si_clamp <= 1e6, "a number in [1, 1e6]"),
                  ("batch_size", self.batch_size >= 1, "an integer >= 1"))
        if self.si_init not in ("act", "eq5"):
            raise ValueError(f"si_init {self.si_init!r} must be act (ours, the default) or eq5 (the paper's)")
        for name, ok, rule in checks:
            v = getattr(self, name)
            if not (ok and math.isfinite(v) and (isinstance(v, int) or "integer" not in rule)):
                raise ValueError(f"{name} {v!r} must be {rule}")


BASELINES = ("magnitude", "wanda", "sparsegpt", "ria", "eggs", "sslc")
SI_BASES = ("magnitude", "wanda", "sparsegpt", "ria", "eggs")  # "+si": Sparsity Induction before them


def prune_layer(method, lin, stats, sparsity, config):
    """The Linear `lin` pruned by `method` at `sparsity`, from its calibration statistics (InputStats): `lin`
    itself, its weight changed in place, or for SSLC a new SparsePlusLowRank layer."""
    W = lin.weight
    if method == "sslc":
        S, U, V, _ = sslc_prune(W, stats.act_norm, sparsity, config.rank_ratio, config.alternations,
                                momentum=config.sslc_momentum)
        return SparsePlusLowRank(S.to(W.dtype), U, V, lin.bias)
    if method == "sparsegpt":
        W.copy_(sparsegpt_prune(W, stats.H, sparsity, config.blocksize, config.percdamp))
    elif method == "magnitude":
        W.mul_(magnitude_mask(W, sparsity))
    elif method == "wanda":
        W.mul_(score_mask(wanda_score(W, stats.act_norm), sparsity))
    elif method == "ria":
        W.mul_(score_mask(ria_score(W, stats.act_norm, config.ria_alpha), sparsity))
    elif method == "eggs":
        if not isinstance(sparsity, tuple):
            raise ValueError(f"EGGS prunes N:M patterns such as 2:4, not the fraction {sparsity}")
        W.mul_(eggs_mask(ria_score(W, stats.act_norm, config.ria_alpha), *sparsity, config.eggs_diagonals))
    else:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(BASELINES)}")
    return lin


def calibration_streams(method):
    """How many calibration streams (N, T, C) prune_model holds at once: a block's inputs and outputs, and with
    Sparsity Induction the dense block's outputs too; plain magnitude pruning reads no data."""
    return 0 if method == "magnitude" else 2 + method.endswith("+si")


@torch.no_grad()
def prune_model(model, method, sparsity, calib=None, device="cpu", config=PruneConfig()):
    """Prune every Linear in every decoder block of `model` in place with `method` (one of BASELINES, or one of
    SI_BASES + "+si": Sparsity Induction first, induce_and_prune), at `sparsity` (a fraction, an (n, m) N:M
    pattern, or a list: one fraction per block).

    The statistics of block i come from inputs that went through the already-pruned blocks 0..i-1
    (as in Wanda and SparseGPT). One block at a time visits `device`, with the calibration streams where they
    fit there (embed_calibration), else one batch of them at a time.
    """
    home, bs = device_of(model), config.batch_size
    base, si, streams = method.removesuffix("+si"), method.endswith("+si"), calibration_streams(method)
    # beside the block: SparseGPT's Hessians and temporaries (SI: also a copy of the weights, and |W|^p and the
    # removed weights in fp32)
    X = None if not streams else embed_calibration(model, calib, device, bs, n_streams=streams,
                                                   reserve_bytes=(4 + 5 * si) * param_bytes(model.blocks[0]))
    progress = Progress(len(model.blocks), method)
    for block, s in zip(model.blocks, block_sparsities(sparsity, len(model.blocks))):
        block.to(device)
        stats, Y = {}, None
        if X is not None:  # SI: every k-th token too, about 4096 in all, for its medians
            every = max(1, X.shape[0] * X.shape[1] // 4096) if si else 0
            stats = new_stats(block, base == "sparsegpt", device, every)
            Y = run_block(block, X, device, bs, stats)  # the dense block's outputs
        # ours (si_init act) rescales for magnitude alone: Wanda's, RIA's and EGGS's scores weigh the activations
        # already, and SparseGPT's masks and updates follow the scales but for its dampening
        if si and (base == "magnitude" or config.si_init == "eq5"):
            induce_and_prune(block, (X, Y), stats, base, s, config)
        else:
            for name, lin in block.linears().items():
                pruned = prune_layer(base, lin, stats.get(name), s, config)
                if pruned is not lin:  # a new kind of layer (SSLC's) takes the Linear's place in the block
                    parent, _, attr = name.rpartition(".")
                    setattr(block.get_submodule(parent), attr, pruned)
        del stats, Y
        if X is not None:
            X = run_block(block, X, device, bs)  # next block's inputs, from this pruned block
        block.to(home)
        progress.step()
    return model


def prunable_copy(model):
    """A copy of the dense model to prune in place: its blocks are copied, the embeddings, final norm and head
    are shared (pruning never changes them), so each method costs one set of blocks, not a reload."""
    shared = {id(p): p for name, p in model.named_parameters() if not name.startswith("blocks.")}
    return copy.deepcopy(model, memo=shared)


def kept_share(model):
    """The share of the prunable layers' parameters a pruned model holds: nonzero weights, and SSLC's U and V."""
    layers = [lin for block in model.blocks for lin in block.linears().values()]
    low_rank = sum(lin.U.numel() + lin.V.numel() for lin in layers if isinstance(lin, SparsePlusLowRank))
    kept = sum((lin.weight != 0).sum().item() for lin in layers) + low_rank
    return kept / sum(lin.weight.numel() for lin in layers)


def achieved_sparsity(model):
    """The fraction of zero weights over every prunable layer of the model."""
    weights = [lin.weight for block in model.blocks for lin in block.linears().values()]
    return sum((W == 0).sum().item() for W in weights) / sum(W.numel() for W in weights)


def format_sparsity(sparsity):
    """'2:4' for an N:M pattern; a fraction rounded to 10 digits (a mean of per-block sparsities may be
    0.6499999999999999)."""
    return f"{sparsity[0]}:{sparsity[1]}" if isinstance(sparsity, tuple) else round(sparsity, 10)


# -----------------------------------------------------------------------------
# statistics: forward hooks that only accumulate


class InputStats:
    """Accumulates a linear layer's inputs: column sums and sums of squares (Wanda), optionally X^T X (SparseGPT)
    and every `sample_every`-th token (Sparsity Induction's medians)."""

    def __init__(self, n_in, hessian, device, sample_every=0):
        self.sum = torch.zeros(n_in, dtype=torch.float32, device=device)
        self.sq = torch.zeros(n_in, dtype=torch.float32, device=device)
        self.XtX = torch.zeros(n_in, n_in, dtype=torch.float32, device=device) if hessian else None
        self.sample_every, self.samples = sample_every, []
        self.n = 0  # tokens seen

    def add(self, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sum += x.sum(0)
        self.sq += x.pow(2).sum(0)
        if self.XtX is not None:
            self.XtX += x.t() @ x
        if self.sample_every:  # a copy: a strided view would keep the whole batch alive
            self.samples.append(x[::self.sample_every].clone())
        self.n += x.shape[0]

    @property
    def mean(self):
        return self.sum / self.n  # E[X_j] over all calibration tokens

    @property
    def act_norm(self):
        return self.sq.sqrt()  # ||X_j||_2 over all calibration tokens

    @property
    def H(self):
        return 2 * self.XtX / self.n

    def centred(self, delta, col):
        """Wanda's ||x~_j|| and SparseGPT's H~ (when X^T X is kept) of x~ = (x - delta) / col (Sparsity Induction's
        basis), from the sums of x."""
        n, H = self.n, None
        sq = self.sq - 2 * delta * self.sum + n * delta ** 2  # (in,): sum over tokens of (x_j - delta_j)^2
        if self.XtX is not None:
            C = self.XtX - torch.outer(delta, self.sum) - torch.outer(self.sum, delta) + n * torch.outer(delta, delta)
            H = 2 * C / n / torch.outer(col, col)
        return SimpleNamespace(act_norm=sq.clamp_min(0).sqrt() / col, H=H)


def run_block(block, X, device, batch_size, stats=None):
    """Run `block` over the stream X (N, T, C) in batches; optionally feed `stats` {name: InputStats}."""
    hooks = [] if stats is None else [
        lin.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0]))
        for name, lin in block.linears().items()]
    out = torch.empty_like(X)
    with torch.no_grad():
        for i in range(0, X.shape[0], batch_size):
            out[i:i + batch_size] = block(X[i:i + batch_size].to(device)).to(out.device)
    for h in hooks:
        h.remove()
    return out


@torch.no_grad()
def output_error(block, X, Y, batch_size):
    """The block's summed squared error against Y (N, T, C) on the windows of X, a batch at a time."""
    return sum(F.mse_loss(block(x.to(device_of(block))).float(), y.to(device_of(block)).float(), reduction="sum")
               for x, y in zip(X.split(batch_size), Y.split(batch_size))).item()


def new_stats(block, hessian, device, sample_every=0):
    return {name: InputStats(lin.in_features, hessian, device, sample_every) for name, lin in block.linears().items()}


# -----------------------------------------------------------------------------
# where the calibration streams live, and progress on stderr


def free_device_bytes(device):
    """Bytes a CUDA device can still give: free on the card plus what PyTorch's cache holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def stream_device(device, stream_bytes, reserve_bytes, free_bytes=None):
    """Where the calibration streams live: on the compute device when they fit beside `reserve_bytes` (one
    block's working set), else in CPU memory, from where each batch moves to the device when it is used."""
    device = torch.device(device)
    if device.type == "cpu":
        return device
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
    return device if stream_bytes + reserve_bytes <= free_bytes else torch.device("cpu")


def device_of(module):
    """Where a model or block's weights are (all of one module's weights are on one device)."""
    return next(module.parameters()).device


@torch.no_grad()
def embed_calibration(model, calib, device, batch_size, n_streams, reserve_bytes):
    """The first block's inputs (N, T, C) for calibration ids (N, T).

    The caller keeps `n_streams` tensors of this size alive at once (inputs, targets, ...); they go where
    stream_device() says, which is CPU memory when they would not fit on the device beside one block.
    """
    home = device_of(model)
    first = model.embed(calib[:1].to(home))  # (1, T, C)
    shape = (len(calib), *first.shape[1:])
    stream_bytes = n_streams * math.prod(shape) * first.element_size()
    where = stream_device(device, stream_bytes, reserve_bytes)
    if where != torch.device(device):
        print(f"calibration streams ({stream_bytes / 2**30:.1f} GiB) do not fit on {device} beside one block "
              f"({reserve_bytes / 2**30:.1f} GiB); keeping them in CPU memory, moved per batch",
              file=sys.stderr)
    X = torch.empty(shape, dtype=first.dtype, device=where)
    for i in range(0, len(calib), batch_size):
        X[i:i + batch_size] = model.embed(calib[i:i + batch_size].to(home)).to(where)
    return X


def param_bytes(module):
    """Bytes of a module's parameters (a tied weight counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Progress:
    """Per-block progress on stderr with elapsed time and an estimate of what remains."""

    def __init__(self, total, what, start=0):
        self.total, self.what, self.start, self.done, self.t0 = total, what, start, 0, time.time()

    def step(self, extra=""):
        self.done += 1
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.start - self.done)
        print(f"{self.what}: block {self.start + self.done}/{self.total} done, {elapsed:.1f}s elapsed, "
              f"~{eta:.1f}s left{extra}", file=sys.stderr, flush=True)
