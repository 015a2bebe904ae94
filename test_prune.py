"""prune.py: every method against its definition, in prune.py's order; the real-shape tier at the end."""

import copy
import itertools
import json
import math
import os
import shutil
import types

import pytest
import torch

import cli
import data
import epts
import model as M
import prune
import run
from eval import perplexity
from conftest import (calib_ids, hf_tiny, main, needs_transformers, published_config, tiny_llama, transformers)
from model import UserError


# -----------------------------------------------------------------------------
# prune.py: the definitions


def test_row_mask_exact_zeros_per_row_and_nested():
    """Every row keeps exactly in - int(in*s) weights; masks at higher sparsity are subsets of lower ones."""
    score = torch.rand(16, 50)
    score[:, :10] = 0.5  # ties are broken by column order, deterministically
    masks = [prune.row_mask(score, s) for s in (0.0, 0.3, 0.5, 0.7, 0.9)]
    for s, m in zip((0.0, 0.3, 0.5, 0.7, 0.9), masks):
        assert (m.sum(1) == 50 - int(50 * s)).all()
    for lo, hi in zip(masks, masks[1:]):
        assert (hi <= lo).all()


def test_row_mask_keeps_the_highest_scores_and_equals_the_stable_sort_definition():
    """Kept scores are never below pruned ones in a row; with heavy ties the mask equals the first int(in*s) of a
    stable ascending sort (ties pruned in column order), and so does the per-matrix mask."""
    g = torch.Generator().manual_seed(0)
    for score in (torch.rand(9, 40, generator=g), torch.randint(0, 4, (9, 40), generator=g).float()):
        for s in (0.0, 0.25, 0.5, 0.9):
            mask = prune.row_mask(score, s)
            kept_min = score.masked_fill(~mask, math.inf).min(1).values
            pruned_max = score.masked_fill(mask, -math.inf).max(1).values
            assert (kept_min >= pruned_max).all()
            k = int(40 * s)
            by_sort = torch.ones_like(mask).scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
            assert torch.equal(mask, by_sort)
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[torch.argsort(score.flatten(), stable=True)[: int(score.numel() * s)]] = False
            assert torch.equal(prune.matrix_mask(score, s), flat.view_as(score))


def test_order_switches_to_int32_from_32768_inputs_and_is_built_in_chunks_of_rows():
    """int16 holds places below 2^15 only: a layer with 32768 inputs stores an int32 order and its masks stay exact.
    Its 300 rows are ordered 256 at a time (2^23 weights), the same order as one sort of the whole layer."""
    lin = torch.nn.Linear(2 ** 15, 300, bias=False)
    act_norm = torch.rand(2 ** 15) + 0.1
    layer = epts.ElasticLinear(lin, act_norm, n_groups=1, rank=1)
    assert layer.order.dtype == torch.int32 and layer.order.max() == 2 ** 15 - 1
    assert torch.equal(layer.order, prune.row_order(prune.wanda_score(lin.weight, act_norm)).int())
    assert torch.equal(layer.mask(0.7), layer.deploy_mask(0.7))
    assert (layer.mask(0.7).sum(1) == 2 ** 15 - int(2 ** 15 * 0.7)).all()


def test_sparsegpt_zeroes_dead_inputs():
    """An input column that is always zero (diag(H) = 0) carries nothing: its weights are pruned, H stays solvable."""
    W, X = correlated_layer(2)
    X[:, [3, 17]] = 0
    stats = prune.InputStats(64, True, "cpu")
    stats.add(X)
    out = prune.sparsegpt_prune(W, stats.H, 0.25, blocksize=16)
    assert (out[:, [3, 17]] == 0).all() and torch.isfinite(out).all()
    assert (W[:, [3, 17]] != 0).all()


def test_nm_mask_pattern():
    """In every run of m columns of a row exactly n weights survive, and they are the highest-scoring ones."""
    score = torch.rand(8, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = prune.nm_mask(score, n, m).view(8, 32 // m, m)
        assert (mask.sum(-1) == n).all()
        groups = score.view(8, 32 // m, m)
        assert (groups[mask].view(8, -1, n).min(-1).values >= groups[~mask].view(8, -1, m - n).max(-1).values).all()
    with pytest.raises(ValueError, match="divisible by 7"):
        prune.nm_mask(score, 3, 7)


def test_ria_score_equals_its_definition():
    """RIA's score, weight by weight: (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^a."""
    W, act_norm = torch.randn(5, 7), torch.rand(7) + 0.1
    for a in (0.5, 1.0):
        direct = torch.tensor([[(abs(W[i, j]) / sum(abs(W[k, j]) for k in range(5))
                                 + abs(W[i, j]) / sum(abs(W[i, k]) for k in range(7))) * act_norm[j] ** a
                                for j in range(7)] for i in range(5)])
        assert torch.allclose(prune.ria_score(W, act_norm, a), direct, rtol=1e-5)
    W[:, 3] = 0  # a column pruned before: score 0, not NaN
    assert prune.ria_score(W, act_norm)[:, 3].eq(0).all()


@pytest.mark.parametrize("out_f", [16, 22])  # 22: a last, partial tile of rows
@pytest.mark.parametrize("n,m,b", [(2, 4, 1), (2, 4, 2), (4, 8, 1), (4, 8, 3), (1, 4, 1)])
def test_eggs_masks_are_exact_nm_and_keep_every_input_in_every_tile(out_f, n, m, b):
    """EGGS: exactly n of every m inputs per row; in every full m x m tile every input column keeps >= b weights,
    through the b cyclic diagonals of highest summed score; the rest of each row's slots by score."""
    score = torch.rand(out_f, 32, generator=torch.Generator().manual_seed(n * 10 + m + b))
    mask = prune.eggs_mask(score, n, m, b)
    assert (mask.view(out_f, -1, m).sum(-1) == n).all()
    full = out_f // m * m
    tiles = mask[:full].view(full // m, m, -1, m).transpose(1, 2)  # (out/m, in/m, rows, cols)
    assert (tiles.sum(-2) >= b).all()  # every column of every full tile
    # brute force for one tile: the b best diagonals by summed score are inside the mask
    T = score[:m, :m]
    sums = [sum(T[r, (r + t) % m].item() for r in range(m)) for t in range(m)]
    for t in sorted(range(m), key=lambda t: -sums[t])[:b]:
        assert all(mask[r, (r + t) % m] for r in range(m))
    # the slots the diagonals leave are each row's highest remaining scores
    forced = prune.diagonal_mask(score, m, b)
    assert torch.equal(mask, prune.nm_mask(torch.where(forced, math.inf, score), n, m))


def test_eggs_without_diagonals_is_ria_and_refuses_what_it_cannot_do():
    """b = 0 gives RIA's N:M mask exactly; b = n keeps the diagonals alone; a fraction or b > n is a clear error."""
    W, act_norm = torch.randn(12, 16), torch.rand(16)
    score = prune.ria_score(W, act_norm)
    assert torch.equal(prune.eggs_mask(score, 2, 4, 0), prune.nm_mask(score, 2, 4))
    config = prune.PruneConfig(eggs_diagonals=0)
    stats = prune.InputStats(16, False, "cpu")
    stats.add(torch.randn(30, 16))
    layer = lambda: torch.nn.Linear(16, 12, bias=False).requires_grad_(False)  # noqa: E731
    eggs, ria = layer(), layer()
    eggs.weight.copy_(W)
    ria.weight.copy_(W)
    assert torch.equal(prune.prune_layer("eggs", eggs, stats, (2, 4), config).weight,
                       prune.prune_layer("ria", ria, stats, (2, 4), config).weight)
    with pytest.raises(ValueError, match="N:M patterns"):
        prune.prune_layer("eggs", layer(), stats, 0.5, config)
    with pytest.raises(ValueError, match="b must lie in"):
        prune.eggs_mask(score, 2, 4, 3)
    # b = n, every kept weight on a diagonal, is the most a pattern allows: accepted up to the command line
    assert torch.equal(prune.eggs_mask(score, 2, 4, 2), prune.diagonal_mask(score, 4, 2))
    cli.check_methods(cli.Request(methods=["eggs"], sparsities=[(2, 4)], pruning=prune.PruneConfig(eggs_diagonals=2)))


def low_rank_layer(out_f=48, in_f=96, seed=0):
    """A weight with low-rank structure plus noise (as trained layers have) and its inputs' norms ||X_j||."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, 6, generator=g) @ torch.randn(6, in_f, generator=g) * 0.4 + torch.randn(out_f, in_f,
                                                                                                 generator=g)
    X = torch.randn(1000, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)
    return W, X.pow(2).sum(0).sqrt()


def test_sslc_error_never_rises_and_beats_wanda_at_the_same_parameter_count():
    """SSLC's weighted error ||(W - S - U V) D|| falls with every alternation it keeps, equals what its result
    gives, and ends below Wanda's at the same number of kept parameters; with rank ratio 0 its S is Wanda's."""
    W, act_norm = low_rank_layer()
    weighted = lambda A: torch.linalg.norm(A * act_norm).item()  # noqa: E731
    wanda = weighted(W - W * prune.wanda_mask(W, act_norm, 0.5))
    S, U, V, errors = prune.sslc_prune(W, act_norm, 0.5, rank_ratio=0.25, alternations=30)
    assert len(errors) > 5 and all(b < a for a, b in zip(errors, errors[1:]))
    assert weighted(W - S - U @ V) == pytest.approx(errors[-1], rel=1e-4)
    assert errors[-1] < 0.95 * wanda
    S0, U0, V0, errors0 = prune.sslc_prune(W, act_norm, 0.5, rank_ratio=0.0)
    assert U0.shape == (48, 0) and torch.equal(S0 != 0, prune.wanda_mask(W, act_norm, 0.5))
    torch.testing.assert_close(S0, W * prune.wanda_mask(W, act_norm, 0.5))
    assert errors0 == [pytest.approx(wanda, rel=1e-5)]


def test_low_rank_warm_step_is_one_subspace_iteration_from_the_last_factor():
    """Warm, low_rank fits A from the row space of the V it is given: exact when that space holds A's rows, a
    rank-r fit as good as the randomized SVD's from a nearby one, and the given V's rows alone are used."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 5, generator=g) @ torch.randn(5, 40, generator=g)  # rank 5
    U, V = prune.low_rank(A, 5)
    torch.testing.assert_close(U @ V, A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(V @ V.t(), torch.eye(5), rtol=1e-5, atol=1e-5)
    rotated = torch.linalg.qr(torch.randn(5, 5, generator=g)).Q @ V  # the same row space, other rows
    Uw, Vw = prune.low_rank(A, 5, rotated)
    torch.testing.assert_close(Uw @ Vw, A, rtol=1e-4, atol=1e-4)
    B = A + 0.01 * torch.randn(60, 40, generator=g)  # the next alternation's A: close to the last one
    cold = torch.linalg.norm(B - torch.matmul(*prune.low_rank(B, 5)))
    assert torch.linalg.norm(B - torch.matmul(*prune.low_rank(B, 5, V))) <= 1.01 * cold
    other = torch.linalg.qr(torch.randn(40, 5, generator=g)).Q.t()  # a row space unrelated to A's
    assert torch.linalg.norm(B - torch.matmul(*prune.low_rank(B, 5, other))) > 2 * cold


@pytest.mark.parametrize("sparsity", [0.5, 0.7, (2, 4)])
def test_sslc_momentum_in_10_alternations_beats_plain_alternation_in_20(sparsity, monkeypatch):
    """The defaults (momentum 0.8, at most 10 alternations) end at a lower weighted error than plain alternation
    (momentum 0, OATS's loop) with twice the alternations: what justifies them, at half the low-rank steps, every
    low-rank step but the first warm (started from the last step's V)."""
    W, act_norm = low_rank_layer()
    real, warm = prune.low_rank, []
    monkeypatch.setattr(prune, "low_rank", lambda A, r, V=None: warm.append(V is not None) or real(A, r, V))
    errors = prune.sslc_prune(W, act_norm, sparsity)[3]
    assert warm[0] is False and all(warm[1:]) and len(warm) > 1
    plain = prune.sslc_prune(W, act_norm, sparsity, alternations=20, momentum=0.0)[3]
    assert len(errors) <= 10 and len(plain) == 20 and errors[-1] < plain[-1]


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (37, 64)])
@pytest.mark.parametrize("sparsity,ratio", [(0.5, 0.25), (0.6, 0.1), (0.5, 0.4), ((2, 4), 0.25), ((4, 8), 0.1)])
def test_sslc_keeps_exactly_its_budget(shape, sparsity, ratio):
    """The rank and the weights per row fill the budget: r (out + in) + out k <= (1 - s) out in, short of it by
    less than one weight per row; S keeps exactly k per row, or exactly n of every m; the top 1 % always in S."""
    out_f, in_f = shape
    W, act_norm = low_rank_layer(out_f, in_f)
    S, U, V, _ = prune.sslc_prune(W, act_norm, sparsity, rank_ratio=ratio, alternations=3)
    r, k = prune.sslc_budget(out_f, in_f, sparsity, ratio)
    assert U.shape == (out_f, r) and V.shape == (r, in_f)
    if isinstance(sparsity, tuple):
        n, m = sparsity
        assert ((S != 0).view(out_f, -1, m).sum(-1) == n).all()
        assert r == int(ratio / (1 - ratio) * out_f * k // (out_f + in_f)) and k == in_f * n // m
    else:
        budget = int((1 - sparsity) * out_f * in_f)
        assert budget - out_f < r * (out_f + in_f) + out_f * k <= budget
        assert ((S != 0).sum(1) == k).all()
    top = prune.matrix_mask((W * act_norm).abs(), 0.99)
    assert (S != 0)[top].all()


@needs_transformers
def test_sslc_runs_through_main_and_exports_a_model_peft_loads(tiny, tmp_path):
    """SSLC at 0.5 through main on LLaMA and OPT: the report counts S's nonzeros + U, V as half the dense layers'
    parameters; --export writes S as a checkpoint and U, V as a PEFT LoRA folder (per-layer ranks), which
    transformers + peft load with our logits."""
    peft = pytest.importorskip("peft")
    for kind in ("llama_gqa", "opt_pre"):
        ckpt, exported = tmp_path / kind, tmp_path / f"{kind}-exp"
        hf_tiny(kind, vocab_size=512).save_pretrained(ckpt)
        shutil.copy(os.path.join(tiny["ckpt"], "vocab.json"), ckpt)
        shutil.copy(os.path.join(tiny["ckpt"], "merges.txt"), ckpt)
        report = main(**dict(tiny, ckpt=str(ckpt), methods=["sslc"], sparsities=[0.5], export=str(exported)))
        row = report["results"][0]
        assert 0.5 - 0.02 < row["kept_params"] <= 0.5 and math.isfinite(row["ppl"])
        ours = M.load_model(str(ckpt))
        prune.prune_model(ours, "sslc", 0.5, data.calibration(tiny["calib"], cli.load(str(ckpt))[1], 2, 16, 0))
        assert isinstance(ours.blocks[0].self_attn.q_proj, prune.SparsePlusLowRank)
        config = json.loads((exported / "lora" / "adapter_config.json").read_text())
        assert len(config["rank_pattern"]) == 2 * len(ours.blocks[0].linears())
        base = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
        ref = peft.PeftModel.from_pretrained(base, str(exported / "lora")).eval()
        idx = torch.randint(0, 512, (2, 24))
        with torch.no_grad():
            assert (ref(idx).logits - ours(idx)).abs().max() <= 1e-4


@needs_transformers
def test_sslc_export_is_read_back_whole_by_our_loader_and_by_autopeft(tiny, tmp_path, capsys):
    """An SSLC export evaluated by epts.py (--methods dense) gives the perplexity the SSLC run printed, its
    low-rank parts applied (said on stderr); AutoPeftModelForCausalLM loads lora/ alone, base model included,
    with our logits; pruning such a model again is refused."""
    peft = pytest.importorskip("peft")
    exported = tmp_path / "exp"
    row = main(**dict(tiny, methods=["sslc"], sparsities=[0.5], export=str(exported)))["results"][0]
    capsys.readouterr()
    again = main(**dict(tiny, ckpt=str(exported), methods=["dense"]))["results"][0]
    assert f"{again['ppl']:.3f}" == f"{row['ppl']:.3f}" and "low-rank parts applied to 14 layers" in \
        capsys.readouterr().err
    ours, _ = cli.load(str(exported))
    assert isinstance(ours.blocks[1].mlp.down_proj, prune.SparsePlusLowRank)
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(str(exported / "lora")).eval()
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert (ref(idx).logits - ours(idx)).abs().max() <= 1e-4
    with pytest.raises(UserError, match="holds SSLC's low-rank parts"):
        main(**dict(tiny, ckpt=str(exported), methods=["wanda"]))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_sslc_dead_input_column_is_pruned_not_blown_up(scale):
    """An input silent on the calibration windows (||x_j|| = 0) leaves its column of S + U V no larger than W's own
    (here: pruned), at any activation scale, instead of rounding noise divided by a clamped norm."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g) * 0.02
    act_norm = (torch.rand(512, generator=g) + 0.5) * 20 * scale
    act_norm[7] = 0
    S, U, V, _ = prune.sslc_prune(W, act_norm, 0.5)
    assert torch.linalg.norm((S + U @ V)[:, 7]) <= torch.linalg.norm(W[:, 7])
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


def test_sslc_stops_at_the_first_step_that_does_not_lower_the_error(monkeypatch):
    """When the low-rank step at alternation k makes the error worse, sslc_prune returns alternation k - 1's S, U, V
    and errors, strictly falling (the same as a run of k - 1 alternations); low_rank gives bit-identical factors
    whatever the caller's seed, and leaves the caller's random state as it was."""
    W, act_norm = low_rank_layer()
    A = W * act_norm
    torch.manual_seed(1)
    state = torch.get_rng_state()
    U1, V1 = prune.low_rank(A, 5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    U2, V2 = prune.low_rank(A, 5)
    assert torch.equal(U1, U2) and torch.equal(V1, V2)
    k, real, calls = 5, prune.low_rank, []

    def worse_at_k(A, r, V=None):
        calls.append(1)
        U, V = real(A, r, V)
        return (U * 1.2, V) if len(calls) == k else (U, V)  # an overshoot: worse than step k - 1, better than 1

    expected = prune.sslc_prune(W, act_norm, 0.5, alternations=k - 1)
    monkeypatch.setattr(prune, "low_rank", worse_at_k)
    S, U, V, errors = prune.sslc_prune(W, act_norm, 0.5, alternations=2 * k)
    assert len(calls) == k and errors == expected[3] and len(errors) == k - 1
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert torch.equal(S, expected[0]) and torch.equal(U, expected[1]) and torch.equal(V, expected[2])


@needs_transformers
def test_sslc_refuses_a_block_that_allocation_leaves_without_rank(tiny, tmp_path):
    """A per-block file or OWL that puts a block above the target, where SSLC's budget leaves a layer rank 0,
    is refused naming the block (the file's before any work), never silently made sparse-only."""
    config = prune.PruneConfig(rank_ratio=0.3)  # q_proj (64 x 64) keeps rank 1 at 0.88 and none at 0.96
    assert prune.sslc_budget(64, 64, 0.88, 0.3)[0] == 1 and prune.sslc_budget(64, 64, 0.96, 0.3)[0] == 0
    (tmp_path / "alloc.json").write_text("[0.8, 0.96]")
    with pytest.raises(UserError, match=r"in block 1 \(its sparsity 0.96\) no rank"):
        main(**dict(tiny, methods=["wanda", "sslc"], allocation=str(tmp_path / "alloc.json"), pruning=config,
                    json=str(tmp_path / "r.json")))
    assert not os.path.exists(tmp_path / "r.json")  # refused before the first row
    with pytest.raises(UserError, match=r"in block \d \(its sparsity 0.9[56]\d*\) no rank"):
        main(**dict(tiny, methods=["sslc"], sparsities=[0.88], allocation="owl", pruning=config))
    main(**dict(tiny, methods=["sslc"], sparsities=[0.88], pruning=config))  # uniform: every block keeps rank 1


# -----------------------------------------------------------------------------
# Sparsity Induction


def scaled_copy(block, scales):
    """The block with SI's scales put into its weights, biases and norms: the transform as the paper absorbs it."""
    block = copy.deepcopy(block)
    with torch.no_grad():
        for module, (row, col) in prune.si_factors(block, block.scale_pairs(), scales).items():
            m = block.get_submodule(module)
            m.weight.mul_(row.view(-1, 1) * col if m.weight.dim() == 2 else row)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(row)
    return block


SI_PAIRS = {"llama_gqa": {"attn_in", "q_k", "v_o", "mlp_in", "up_down"}, "smollm": {"attn_in", "q_k", "v_o", "mlp_in",
                                                                                   "up_down"},
            "qwen2": {"attn_in", "q_k", "v_o", "mlp_in", "up_down"}, "qwen3": {"attn_in", "v_o", "mlp_in", "up_down"},
            "opt_pre": {"attn_in", "q_k", "v_o", "mlp_in", "fc1_fc2"}, "opt_post": {"q_k", "v_o", "fc1_fc2"},
            "opt_gelu": {"attn_in", "q_k", "v_o", "mlp_in"}}


@needs_transformers
@pytest.mark.parametrize("kind", list(SI_PAIRS))
def test_si_scales_leave_every_block_unchanged(tmp_path, kind):
    """Every pair's scales put into the weights (GQA-shared, tied within RoPE pairs, through ReLU, with Qwen2's
    q/k/v biases) leave the unpruned block's outputs as they were (fp32); pairs that would not (Qwen3's q/k
    norms, a post-LN block's norms, GELU) are absent."""
    hf_tiny("opt_pre" if kind == "opt_gelu" else kind, **({"activation_function": "gelu"} if kind == "opt_gelu"
                                                          else {})).save_pretrained(tmp_path)
    block = M.load_model(str(tmp_path)).blocks[0]
    pairs = block.scale_pairs()
    assert set(pairs) == SI_PAIRS[kind]
    gen = torch.Generator().manual_seed(0)
    scales = {name: torch.exp(torch.randn(size, generator=gen)) for name, (size, _) in pairs.items()}
    x = torch.randn(2, 12, block.linears()["self_attn.q_proj"].in_features, generator=gen)
    scaled = scaled_copy(block, scales)
    assert not torch.allclose(scaled.self_attn.v_proj.weight, block.self_attn.v_proj.weight)
    torch.testing.assert_close(scaled(x), block(x), rtol=1e-4, atol=1e-5)


def si_layer(seed=0):
    """A layer with a bias, inputs of nonzero mean and their statistics, positive row and column factors."""
    W, X = correlated_layer(seed, n_in=32, n_out=24, tokens=512)
    gen = torch.Generator().manual_seed(seed)
    X = X + torch.randn(32, generator=gen)
    stats = prune.InputStats(32, True, "cpu")
    stats.add(X)
    row, col = torch.exp(torch.randn(24, generator=gen)), torch.exp(torch.randn(32, generator=gen))
    return W, torch.randn(24, generator=gen), X, stats, row, col, torch.randn(32, generator=gen)


@pytest.mark.parametrize("method,sparsity", [("magnitude", 0.5), ("wanda", 0.5), ("sparsegpt", 0.5),
                                             ("ria", (2, 4)), ("eggs", (2, 4))])
def test_si_folding_back_is_exact(method, sparsity):
    """The layer pruned in SI's basis, W^ (x - delta) / col + row (b + W delta), equals row times the folded
    layer P x + b + (W - P) delta, and P keeps W^'s pattern."""
    W, b, X, stats, row, col, delta = si_layer()
    config = prune.PruneConfig()
    P, shift = prune.si_prune_layer(method, W, stats, sparsity, (row, col, delta), config)
    Wt = prune.prune_layer(method, types.SimpleNamespace(weight=W * row.view(-1, 1) * col),
                           stats.centred(delta, col), sparsity, config).weight  # W^ in SI's basis
    in_basis = ((X - delta) / col) @ Wt.t() + row * (b + W @ delta)
    torch.testing.assert_close(in_basis, row * (X @ P.t() + b + shift), rtol=1e-4, atol=1e-4)
    assert torch.equal(P != 0, Wt != 0)


def test_si_statistics_are_those_of_the_centred_scaled_inputs():
    """InputStats.centred gives Wanda's norm and SparseGPT's H of x~ = (x - delta) / col from the sums of x."""
    W, b, X, stats, row, col, delta = si_layer()
    direct = prune.InputStats(32, True, "cpu")
    direct.add((X - delta) / col)
    centred = stats.centred(delta, col)
    torch.testing.assert_close(centred.act_norm, direct.act_norm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(centred.H, direct.H, rtol=1e-4, atol=1e-3)
    sampled = prune.InputStats(32, False, "cpu", sample_every=8)
    sampled.add(X)  # (512, 32): 64 tokens kept, as a copy that does not keep the batch alive
    assert torch.equal(torch.cat(sampled.samples), X[::8])
    assert sampled.samples[0].untyped_storage().nbytes() == 64 * 32 * 4


def test_si_init_is_eq_5():
    """Eq. 5: a channel's scale is (median - mean)^2 of what it carries over the tokens, over that value's median
    across the channels, clamped into [1 / c, c]; a scale shared by GQA's query heads takes their mean; q_k,
    which no layer's input carries, starts at 1."""
    block = tiny_llama(num_attention_heads=4, num_key_value_heads=2).blocks[0]
    stats = prune.new_stats(block, hessian=False, device="cpu", sample_every=1)
    prune.run_block(block, torch.randn(4, 16, 32) + torch.randn(32), "cpu", 2, stats)

    def eq5(module):
        x = torch.cat(stats[module].samples)  # (tokens, in)
        return (x.median(0).values - x.mean(0)) ** 2

    pairs = prune.scale_pairs_on(block)
    scales = prune.si_init(block, pairs, stats, clamp=1e9)
    for name, module in (("attn_in", "self_attn.q_proj"), ("up_down", "mlp.down_proj")):
        v = eq5(module)
        torch.testing.assert_close(scales[name], v / v.median(), rtol=1e-4, atol=1e-6)
    v = eq5("self_attn.o_proj").view(2, 2, 8).mean(1).flatten()  # kv head k is read by query heads 2k, 2k + 1
    torch.testing.assert_close(scales["v_o"], v / v.median(), rtol=1e-4, atol=1e-6)
    assert torch.equal(scales["q_k"], torch.ones(8))
    clamped = prune.si_init(block, pairs, stats, clamp=2.0)
    assert all(((s >= 0.5) & (s <= 2)).all() for s in clamped.values())
    assert any((s == 2).any() or (s == 0.5).any() for s in clamped.values())


def test_si_norm_term_is_exp_of_minus_alpha_times_the_transformed_weights_relative_p_norms():
    """R_p = exp(-alpha sum_l ||diag(row_l) W_l diag(col_l)||_p / ||W_l||_p), from |W|^p and ||W||_p kept once."""
    gen = torch.Generator().manual_seed(0)
    W = {"a": torch.randn(6, 10, generator=gen), "b": torch.randn(10, 4, generator=gen)}
    factors = {n: [torch.exp(torch.randn(size, generator=gen)) for size in w.shape] for n, w in W.items()}
    for p, alpha in ((2.0, 1.0), (1.0, 0.3), (3.0, 2.0)):
        abs_W = {n: (w.abs() ** p, torch.linalg.vector_norm(w, p)) for n, w in W.items()}
        direct = sum(torch.linalg.vector_norm(row.view(-1, 1) * w * col, p) / torch.linalg.vector_norm(w, p)
                     for w, (row, col) in zip(W.values(), factors.values()))
        torch.testing.assert_close(prune.norm_term(abs_W, factors, p, alpha), torch.exp(-alpha * direct))


def test_si_without_a_shift_gives_wandas_masks_exactly():
    """With delta = 0 the scales cancel from Wanda's score (powers of two: exactly, in floating point too), so
    wanda+si keeps Wanda's weights, at 50 % and at 2:4; a shift centres the inputs and changes them."""
    W, b, X, stats, row, col, delta = si_layer()
    row, col = 2.0 ** torch.randint(-6, 7, (24,)), 2.0 ** torch.randint(-6, 7, (32,))
    for s in (0.5, (2, 4)):
        P, shift = prune.si_prune_layer("wanda", W, stats, s, (row, col, torch.zeros(32)), prune.PruneConfig())
        assert torch.equal(P, W * prune.wanda_mask(W, stats.act_norm, s)) and not shift.any()
        P, _ = prune.si_prune_layer("wanda", W, stats, s, (row, col, delta), prune.PruneConfig())
        assert not torch.equal(P != 0, prune.wanda_mask(W, stats.act_norm, s))


def block_error(block, X, Y):
    return ((prune.run_block(block, X, "cpu", 8) - Y) ** 2).mean().item()


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_si_trained_shift_lowers_the_pruned_block_error(small, kind):
    """Eq. 5's variant on a trained model's second block at 50 %: the shift at the inputs' means gives a lower
    output error than Wanda alone, and training it lowers it further."""
    model, tok = cli.load(str(small / kind))
    calib = data.calibration(str(small / "train.txt"), tok, 16, 64, 0)
    X = model.blocks[0](model.embed(calib))  # (16, 64, C): the second block's inputs
    stats = prune.new_stats(model.blocks[1], True, "cpu", sample_every=4)
    Y = prune.run_block(model.blocks[1], X, "cpu", 8, stats)
    errors = {}
    for name, epochs in (("wanda", None), ("init", 0), ("trained", 4)):
        block = copy.deepcopy(model.blocks[1])
        if epochs is None:
            for n, lin in block.linears().items():
                prune.prune_layer("wanda", lin, stats[n], 0.5, prune.PruneConfig())
        else:
            with torch.no_grad():
                config = prune.PruneConfig(si_epochs=epochs, si_init="eq5")  # the paper's shift
                prune.induce_and_prune(block, (X, Y), stats, "wanda", 0.5, config)
        assert all((lin.weight == 0).sum(1).eq(lin.in_features // 2).all() for lin in block.linears().values())
        errors[name] = block_error(block, X, Y)
    print(kind, errors)
    assert errors["trained"] < errors["init"] < errors["wanda"]


@needs_transformers
@pytest.mark.parametrize("kind", ["llama_gqa", "mistral", "qwen2", "opt_pre"])
def test_si_runs_through_main_and_exports_biases_transformers_loads(tiny, tmp_path, kind):
    """magnitude+si, ria+si, eggs+si (2:4) and wanda+si through main: exact sparsity, finite perplexity, every
    layer with a bias; the export declares them (LLaMA's attention_bias/mlp_bias, Mistral and Qwen2 written as
    llama) and transformers loads it with our logits. Qwen3 (no MLP biases in transformers) and a sliding window
    (none in transformers' llama) are refused before any work."""
    ckpt = tmp_path / kind
    hf_tiny(kind, vocab_size=512).save_pretrained(ckpt)
    shutil.copy(os.path.join(tiny["ckpt"], "vocab.json"), ckpt)
    shutil.copy(os.path.join(tiny["ckpt"], "merges.txt"), ckpt)
    exported = tmp_path / "exp"
    eq5 = prune.PruneConfig(si_init="eq5")  # the paper's shift gives every layer a bias; ours (act) has none
    report = main(**dict(tiny, ckpt=str(ckpt), methods=["magnitude+si", "ria+si", "eggs+si"], sparsities=[(2, 4)],
                         pruning=eq5))
    assert [r["method"] for r in report["results"]] == ["magnitude+si", "ria+si", "eggs+si"]
    assert all(r["achieved_sparsity"] == 0.5 and math.isfinite(r["ppl"]) for r in report["results"])
    report = main(**dict(tiny, ckpt=str(ckpt), methods=["wanda+si"], sparsities=[0.5], export=str(exported),
                         pruning=eq5))
    assert report["results"][0]["achieved_sparsity"] == 0.5 and math.isfinite(report["results"][0]["ppl"])
    ours = M.load_model(str(exported))
    assert all(lin.bias is not None and lin.bias.any() for lin in ours.blocks[0].linears().values())
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert (ref(idx).logits - ours(idx)).abs().max() <= 1e-4
    if kind == "qwen2":
        hf_tiny("qwen3", vocab_size=512).save_pretrained(tmp_path / "q3")
        shutil.copy(os.path.join(tiny["ckpt"], "vocab.json"), tmp_path / "q3")
        shutil.copy(os.path.join(tiny["ckpt"], "merges.txt"), tmp_path / "q3")
        with pytest.raises(UserError, match="Qwen3 has no biases"), pytest.MonkeyPatch.context() as m:
            m.setattr(prune, "prune_model", None)  # before any work: pruning would crash with a TypeError
            main(**dict(tiny, ckpt=str(tmp_path / "q3"), methods=["dense", "wanda+si"], export=str(tmp_path / "x"),
                        pruning=eq5))
    if kind == "mistral":  # a sliding window: transformers' llama, as which the export is written, has none
        hf_tiny("mistral_window", vocab_size=512).save_pretrained(tmp_path / "mw")
        shutil.copy(os.path.join(tiny["ckpt"], "vocab.json"), tmp_path / "mw")
        shutil.copy(os.path.join(tiny["ckpt"], "merges.txt"), tmp_path / "mw")
        with pytest.raises(UserError, match="has no sliding attention window, and this model has one"), \
                pytest.MonkeyPatch.context() as m:
            m.setattr(prune, "prune_model", None)
            main(**dict(tiny, ckpt=str(tmp_path / "mw"), methods=["dense", "wanda+si"], export=str(tmp_path / "x"),
                        pruning=eq5))


def biased_block(**over):
    """A tiny LLaMA's first block with random nonzero biases on every layer, its inputs X, its statistics (as
    prune_model keeps them for SparseGPT + SI) and its dense outputs Y."""
    model = tiny_llama(attention_bias=True, mlp_bias=True, **over)
    block, g = model.blocks[0], torch.Generator().manual_seed(1)
    for lin in block.linears().values():
        lin.bias.copy_(torch.randn(lin.out_features, generator=g) * 0.1)
    X = model.embed(calib_ids(n=8))
    stats = prune.new_stats(block, True, "cpu", sample_every=2)
    return block, X, prune.run_block(block, X, "cpu", 8, stats), stats


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_si_at_sparsity_zero_keeps_the_block_and_its_own_biases(method):
    """At sparsity 0 nothing is removed, so the block with SI's biases computes what it did, its own random
    biases included (OPT's and Qwen2's layers have them)."""
    block, X, Y, stats = biased_block()
    with torch.no_grad():
        prune.induce_and_prune(block, (X, Y), stats, method, 0.0, prune.PruneConfig())
    torch.testing.assert_close(prune.run_block(block, X, "cpu", 8), Y, rtol=1e-4, atol=1e-5)


def test_si_trains_through_the_bias_of_the_removed_weights_only(monkeypatch):
    """Eq. 5's variant: in training the block runs with biases b + (W - P) delta (the weights the mask removes, as
    folded back at the end), not b + W delta: with steps too small to move anything, the training forward equals
    the final pruned block's."""
    block, X, Y, stats = biased_block()
    real, seen = torch.func.functional_call, []

    def spy(module, params, args):
        out = real(module, params, args)
        seen.append((args[0].clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(torch.func, "functional_call", spy)
    with torch.no_grad():
        prune.induce_and_prune(block, (X, Y), stats, "wanda", 0.5, prune.PruneConfig(si_epochs=1, si_lr=1e-9,
                                                                                      si_init="eq5"))
    x, out = seen[0]
    torch.testing.assert_close(block(x), out, rtol=1e-4, atol=1e-5)


def test_si_refreshes_the_masks_every_epoch_sparsegpt_from_wandas_stand_in(monkeypatch):
    """Each epoch prunes every layer anew in the current basis (the scales moved since the last), SparseGPT
    through Wanda's score as documented, and the final pruning is SparseGPT's own."""
    block, X, Y, stats = biased_block()
    real, calls = prune.si_prune_layer, []

    def spy(method, W, stats, sparsity, basis, config):
        calls.append((method, [f.clone() for f in basis]))
        return real(method, W, stats, sparsity, basis, config)

    monkeypatch.setattr(prune, "si_prune_layer", spy)
    config = prune.PruneConfig(si_epochs=3, si_lr=0.1, si_lambda=1.0, si_alpha=0.01)  # scales that move
    with torch.no_grad():
        prune.induce_and_prune(block, (X, Y), stats, "sparsegpt", 0.5, config)
    L = len(block.linears())
    assert [m for m, _ in calls] == ["wanda"] * 3 * L + ["sparsegpt"] * L
    for e in (1, 2):  # this epoch's bases are not the last epoch's
        assert any(not all(map(torch.equal, a, b)) for (_, a), (_, b) in zip(calls[(e - 1) * L:e * L], calls[e * L:]))


@pytest.mark.parametrize("zero", ["self_attn.v_proj", "mlp.down_proj"])
def test_si_with_an_all_zero_layer_gives_a_finite_model(zero):
    """A checkpoint with one all-zero layer (and so dead inputs further on): every +si method, with and without
    the norm term, gives finite weights and logits, and the zero layer stays zero."""
    for method, s in (("magnitude", 0.5), ("wanda", 0.5), ("sparsegpt", 0.5), ("ria", 0.5), ("eggs", (2, 4))):
        for lam, init in itertools.product((0.0, 1e-2), ("act", "eq5")):
            model = tiny_llama()
            model.blocks[0].get_submodule(zero).weight.zero_()
            config = prune.PruneConfig(si_lambda=lam, si_init=init)
            prune.prune_model(model, f"{method}+si", s, calib_ids(), config=config)
            assert all(torch.isfinite(t).all() for t in model.parameters()), (method, lam)
            assert torch.isfinite(model(calib_ids())).all() and not model.blocks[0].get_submodule(zero).weight.any()


def test_si_default_scales_move_and_the_norm_term_falls(monkeypatch):
    """Under the default settings (si_init act) the norm term's gradient moves the log-scales from the first step:
    over two epochs of four steps every scale of the pairs a norm feeds moves by more than 0.03 (Adam at lr 1e-2),
    and the term falls (Eq. 5's exp(-alpha sum) moved them by < 1e-12 per step)."""
    block, X, Y, stats = biased_block()
    X, Y = X.repeat(4, 1, 1), Y.repeat(4, 1, 1)  # 32 windows: 4 steps of 8 an epoch
    real, seen = prune.norm_term, []
    monkeypatch.setattr(prune, "norm_term", lambda abs_W, factors, *a: seen.append(
        ({n: f[1].detach().clone() for n, f in factors.items()}, real(abs_W, factors, *a).item())) or real(
        abs_W, factors, *a))
    with torch.no_grad():
        prune.induce_and_prune(block, (X, Y), stats, "magnitude", 0.5, prune.PruneConfig())
    assert len(seen) == 8
    (first, term0), (last, term1) = seen[0], seen[-1]
    for name in ("self_attn.q_proj", "mlp.gate_proj"):  # the columns the two norms' scales multiply
        assert (last[name].log() - first[name].log()).abs().min() > 0.03, name
    assert term1 < term0


def test_act_scales_are_the_activation_norms_over_their_median():
    """Ours: each norm-fed pair's scale is ||x_j|| of the first layer reading it over the live channels' median;
    a dead channel 1e-6, and so every channel of an input with none live (one scale: magnitude's masks unchanged)."""
    block, X, Y, stats = biased_block()
    pairs = prune.scale_pairs_on(block, ("attn_in", "mlp_in"))
    scales = prune.act_scales(pairs, stats)
    for name, reader in (("attn_in", "self_attn.q_proj"), ("mlp_in", "mlp.gate_proj")):
        a = stats[reader].act_norm
        torch.testing.assert_close(scales[name], a / a.median())
    stats["self_attn.q_proj"].sq[:3] = 0  # three dead channels
    stats["mlp.gate_proj"].sq.zero_()  # no live input
    scales = prune.act_scales(pairs, stats)
    a = stats["self_attn.q_proj"].act_norm
    assert torch.equal(scales["attn_in"][:3], torch.full((3,), 1e-6))
    torch.testing.assert_close(scales["attn_in"][3:], a[3:] / a[3:].median())
    assert torch.equal(scales["mlp_in"], torch.full_like(scales["mlp_in"], 1e-6))


def test_si_default_keeps_the_base_method_where_its_basis_does_not_help(monkeypatch):
    """Ours: a block stays in SI's basis only where that lowers its output error. With scales that can only hurt
    (random over six decades), every block is pruned exactly as by magnitude alone; Wanda, SparseGPT and RIA
    (whose scores weigh the activations already, or follow the scales) ours leaves as they are."""
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(prune, "act_scales", lambda pairs, stats: {
        name: 10 ** (6 * torch.rand(size, generator=g) - 3) for name, (size, _) in pairs.items()})
    model, calib = tiny_llama(), calib_ids(8, 16)
    for method in ("magnitude", "wanda", "sparsegpt", "ria"):  # all but magnitude: left as they are by ours
        alone = prune.prune_model(prune.prunable_copy(model), method, 0.5, calib)
        induced = prune.prune_model(prune.prunable_copy(model), method + "+si", 0.5, calib)
        assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), induced.state_dict().values()))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_magnitude_si_recovers_half_of_its_gap_to_wanda_on_the_outlier_bed(small, kind):
    """The outlier test bed (bench/outliers.py: two loud channels x 64, their weights / 64, the model's function
    unchanged) on a small trained model: magnitude loses to Wanda, and magnitude+si (defaults) recovers at least
    half of that gap at 0.5 and 0.7; Wanda+si's masks are Wanda's."""
    import outliers
    model, tok = cli.load(str(small / kind))
    calib = data.calibration(str(small / "train.txt"), tok, 16, 64, 0)
    ids = data.eval_tokens(str(small / "test.txt"), tok, 64)[:64 * 64]
    bed = outliers.add_outliers(model, outliers.outlier_channels(model, calib))
    for s in (0.5, 0.7):
        ppl, masks = {}, {}
        for method in ("magnitude", "magnitude+si", "wanda", "wanda+si"):
            pruned = prune.prune_model(prune.prunable_copy(bed), method, s, calib)
            ppl[method] = perplexity(pruned, ids, 64, 8)
            masks[method] = [lin.weight != 0 for b in pruned.blocks for lin in b.linears().values()]
        print(kind, s, ppl)
        assert ppl["magnitude"] > 1.05 * ppl["wanda"]
        assert ppl["magnitude+si"] <= ppl["magnitude"] - 0.5 * (ppl["magnitude"] - ppl["wanda"])
        assert all(torch.equal(a, b) for a, b in zip(masks["wanda"], masks["wanda+si"]))


def test_baseline_defaults_are_the_papers():
    """SparseGPT: 1 % dampening, lazy batches of 128; RIA: a = 0.5; EGGS: one diagonal. A changed default changes
    the pruned weights, so each is pinned by value and by its effect."""
    config = prune.PruneConfig()
    assert (config.percdamp, config.blocksize, config.ria_alpha, config.eggs_diagonals) == (0.01, 128, 0.5, 1)
    W, X = correlated_layer()[:2]
    H = 2 * X.t() @ X / X.shape[0]
    assert torch.equal(prune.sparsegpt_prune(W, H, 0.5), prune.sparsegpt_prune(W, H, 0.5, 128, 0.01))
    assert not torch.equal(prune.sparsegpt_prune(W, H, 0.5), prune.sparsegpt_prune(W, H, 0.5, 128, 0.1))


def test_wanda_score_brute_force_and_nested_wanda_magnitude():
    """wanda_score = |W_ij| * ||X_j||; Wanda and magnitude masks are nested across sparsities; magnitude's
    threshold is the matrix's."""
    W, X = torch.randn(6, 10) * torch.arange(1, 7).view(-1, 1), torch.randn(40, 10)  # rows of different scales
    act_norm = prune.InputStats(10, False, "cpu")
    act_norm.add(X)
    brute = torch.tensor([[abs(W[i, j].item()) * math.sqrt(sum(X[t, j].item() ** 2 for t in range(40)))
                           for j in range(10)] for i in range(6)])
    assert torch.allclose(prune.wanda_score(W, act_norm.act_norm), brute, rtol=1e-5)
    for make in (lambda s: prune.wanda_mask(W, act_norm.act_norm, s), lambda s: prune.magnitude_mask(W, s)):
        a, b = make(0.4), make(0.7)
        assert (b <= a).all()
    # magnitude: one threshold per matrix (the 30 smallest |W_ij| of 60 go), not per row
    assert torch.equal(prune.magnitude_mask(W, 0.5), W.abs() > W.abs().flatten().sort().values[29])


def correlated_layer(seed=0, n_in=64, n_out=32, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, n_in, generator=g)
    X = torch.randn(tokens, 8, generator=g) @ basis + 0.1 * torch.randn(tokens, n_in, generator=g)
    X = X * torch.linspace(0.2, 3.0, n_in)  # columns of very different scale
    return torch.randn(n_out, n_in, generator=g), X


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    """On strongly correlated inputs ||WX - ŴX|| orders SparseGPT < Wanda < magnitude, for 50 % and 2:4."""
    W, X = correlated_layer()
    stats = prune.InputStats(64, True, "cpu")
    stats.add(X)
    for s in (0.5, (2, 4)):
        err = {
            "magnitude": W * prune.magnitude_mask(W, s),
            "wanda": W * prune.wanda_mask(W, stats.act_norm, s),
            "sparsegpt": prune.sparsegpt_prune(W, stats.H, s, blocksize=16),
        }
        err = {k: ((X @ W.t() - X @ Wp.t()) ** 2).sum().item() for k, Wp in err.items()}
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (s, err)


def test_sparsegpt_sparsity_and_identity_at_zero():
    """SparseGPT leaves W unchanged at sparsity 0 and reaches the requested sparsity / N:M pattern exactly."""
    W, X = correlated_layer(1)
    stats = prune.InputStats(64, True, "cpu")
    stats.add(X)
    assert torch.equal(prune.sparsegpt_prune(W, stats.H, 0.0), W)
    assert ((prune.sparsegpt_prune(W, stats.H, 0.5, blocksize=16) == 0).sum() == W.numel() // 2)
    nm = prune.sparsegpt_prune(W, stats.H, (2, 4), blocksize=16)
    assert ((nm != 0).view(32, 16, 4).sum(-1) == 2).all()


def test_sparsegpt_with_a_diagonal_hessian_prunes_by_one_threshold_per_lazy_batch():
    """With uncorrelated inputs (H diagonal) no pruned weight has an error to spread, so SparseGPT is OBS saliency
    pruning: w_ij^2 / U_jj^2 = w_ij^2 (H_jj + damp), U the Cholesky factor of (H + damp I)^-1, the lowest
    int(rows x 16 s) pruned in each lazy batch of 16 columns as one set, as in the reference (rows of larger
    weights keep more), or the lowest m - n of every run of m; the kept weights unchanged. The dampening is a
    share of H's mean diagonal, so H's scale changes nothing."""
    torch.manual_seed(0)
    W = torch.randn(8, 64) * torch.linspace(0.2, 2.0, 8).view(-1, 1)  # rows of different scales
    h = torch.rand(64) + 0.5
    saliency = W ** 2 * (h + 0.01 * h.mean())  # (8, 64)
    out = prune.sparsegpt_prune(W, torch.diag(h), 0.5, blocksize=16)
    for i in range(0, 64, 16):  # 64 of each batch's 128 weights pruned: the batch's lowest saliencies
        torch.testing.assert_close(out[:, i:i + 16], W[:, i:i + 16] * prune.matrix_mask(saliency[:, i:i + 16], 0.5))
    assert not ((out != 0).sum(1) == 32).all()  # not one threshold per row
    torch.testing.assert_close(prune.sparsegpt_prune(W, torch.diag(h), (2, 4), blocksize=16),
                               W * prune.nm_mask(saliency, 2, 4))
    W, X = correlated_layer(1)
    stats = prune.InputStats(64, True, "cpu")
    stats.add(X)
    ref = prune.sparsegpt_prune(W, stats.H, 0.5)
    for c in (1e-3, 1e3):
        scaled = prune.sparsegpt_prune(W, c * stats.H, 0.5)
        assert torch.equal(scaled != 0, ref != 0)
        torch.testing.assert_close(scaled, ref, rtol=1e-3, atol=1e-4)


def test_sparsegpt_nm_whose_m_does_not_divide_the_lazy_batch():
    """2:12 and 2:24 with a lazy batch of 16 columns (16 is no multiple of 12 and less than 24): every run of m
    inputs keeps exactly n, and the result is the one-batch result (the lazy update is exact, whatever the width)."""
    W, X = correlated_layer(1, n_in=72)  # runs of 12 and of 24
    stats = prune.InputStats(72, True, "cpu")
    stats.add(X)
    for n, m in ((2, 12), (2, 24)):
        nm = prune.sparsegpt_prune(W, stats.H, (n, m), blocksize=16)
        assert ((nm != 0).view(32, 72 // m, m).sum(-1) == n).all()
        torch.testing.assert_close(nm, prune.sparsegpt_prune(W, stats.H, (n, m), blocksize=72), rtol=1e-4, atol=1e-5)


def test_statistics_accumulate_over_batches_like_one_shot():
    """H, the mean and ||X_j|| from several batches equal 2/n X^T X, E[X] and the norms computed at once."""
    X = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0)) + torch.linspace(-1, 1, 16)
    stats = prune.InputStats(16, True, "cpu")
    for b in X:
        stats.add(b)
    flat = X.reshape(-1, 16)
    assert torch.allclose(stats.H, 2 * flat.t() @ flat / 150, atol=1e-5)
    torch.testing.assert_close(stats.mean, flat.mean(0))
    torch.testing.assert_close(stats.act_norm, flat.norm(dim=0))


def test_cholesky_fallback_dampens_more_and_warns_once(capsys):
    """An indefinite H triggers the 10x-dampening retry with one warning instead of a crash."""
    Q, _ = torch.linalg.qr(torch.randn(16, 16))
    H = Q @ torch.diag(torch.cat([torch.ones(15), torch.tensor([-0.02])])) @ Q.t()
    W = torch.randn(4, 16)
    out = prune.sparsegpt_prune(W, H, 0.5, blocksize=8, percdamp=0.01)
    assert capsys.readouterr().err.count("10x") == 1
    assert torch.isfinite(out).all() and (out == 0).sum() == 32


def test_damped_hinv_chol_is_the_upper_factor_of_the_damped_inverse():
    """U upper triangular with U^T U = (H + damp I)^-1, damp = percdamp x mean diag(H), so that SparseGPT's
    [H^-1]_jj of the columns still to prune is U_jj^2 (Algorithm 1)."""
    X = torch.randn(64, 12, dtype=torch.float64)
    H = X.t() @ X
    U = prune.damped_hinv_chol(H.clone(), 0.01)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(12, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(damped))


def test_allocate_gives_each_block_its_sparsity():
    """uniform: the target itself; an N:M pattern: itself; a list (a file's): itself; owl: OWL's sparsities
    around the target (mean kept)."""
    assert prune.allocate("uniform", 0.5) == 0.5 and prune.allocate("owl", (2, 4), [0.1, 0.2]) == (2, 4)
    assert prune.allocate([0.4, 0.6], 0.5) == [0.4, 0.6]
    owl = prune.allocate("owl", 0.6, [0.01, 0.03, 0.02, 0.05])
    assert owl == prune.owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.6)[0] and sum(owl) / 4 == pytest.approx(0.6)


def test_owl_sparsities_follow_the_definition():
    """Mean exactly S, a spread of 2 lam, outlier-rich blocks sparsified least; clipping keeps the mean and says so."""
    ratios = [0.010, 0.030, 0.020, 0.050]
    s, clipped = prune.owl_sparsities(ratios, 0.6, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.6, abs=1e-12) and not clipped
    assert max(s) - min(s) == pytest.approx(0.16) and s[3] == min(s) and s[0] == max(s)
    assert sorted(range(4), key=lambda i: s[i]) == sorted(range(4), key=lambda i: -ratios[i])  # monotone
    s, clipped = prune.owl_sparsities(ratios, 0.65, lam=0.08, hi=0.7)  # uncapped: up to ~0.74
    assert clipped and max(s) <= 0.7 + 1e-12 and sum(s) / 4 == pytest.approx(0.65, abs=1e-12)
    # both bounds hit: raw [0.8, 0.4, 0.4, 0.4] clips to [0.6, 0.4, 0.4, 0.4], and the blocks at the lower bound
    # (the ones that can rise) take back the mean
    s, clipped = prune.owl_sparsities([0.0, 1.0, 1.0, 1.0], 0.5, lam=0.2, lo=0.4, hi=0.6)
    assert clipped and s == pytest.approx([0.6] + [0.4 + 0.2 / 3] * 3, abs=1e-12)
    assert prune.owl_sparsities([0.02] * 3, 0.5)[0] == pytest.approx([0.5] * 3)  # no outlier contrast: uniform


def test_outlier_ratio_is_the_share_above_M_times_the_mean():
    """D_l over the block's layers together equals the share computed from all scores concatenated."""
    block = tiny_llama().blocks[0]
    norms = {n: torch.rand(lin.in_features) ** 4 * 10 for n, lin in block.linears().items()}  # heavy-tailed
    scores = torch.cat([prune.wanda_score(lin.weight, norms[n]).reshape(-1) for n, lin in block.linears().items()])
    for factor in (2.0, 5.0):  # OWL's M
        share = (scores > factor * scores.mean()).float().mean().item()
        assert prune.outlier_ratio(block, norms, factor) == pytest.approx(share)


def test_owl_ratios_come_from_each_blocks_inputs_in_the_dense_model():
    """owl_ratios' D_l equals outlier_ratio with the norms ||X_j|| every layer sees in one forward pass of the
    whole dense model (hooks on its layers), block after block."""
    model, calib = tiny_llama(num_hidden_layers=3), calib_ids(4)
    sq, hooks = {}, []
    for b, block in enumerate(model.blocks):
        for name, lin in block.linears().items():
            def add(module, inputs, output, key=(b, name)):
                sq[key] = sq.get(key, 0) + inputs[0].reshape(-1, inputs[0].shape[-1]).double().pow(2).sum(0)
            hooks.append(lin.register_forward_hook(add))
    with torch.no_grad():
        model.hidden(calib)
    for h in hooks:
        h.remove()
    expected = [prune.outlier_ratio(block, {name: sq[b, name].sqrt().float() for name in block.linears()}, M=2.0)
                for b, block in enumerate(model.blocks)]  # M = 2: a random model has few scores above 5x the mean
    assert prune.owl_ratios(model, calib, M=2.0) == pytest.approx(expected)
    assert len(set(expected)) == 3  # the blocks differ, so a wrong block's inputs would show


# -----------------------------------------------------------------------------
# the command line: user errors are one clear message and exit status 2


@pytest.mark.parametrize("setting,message", [
    (dict(si_clamp=0.5), "si_clamp 0.5 must be a number in [1, 1e6]"),
    (dict(si_lr=float("nan")), "si_lr nan must be a number in (0, 1]"),
    (dict(alternations=2.0), "alternations 2.0 must be an integer >= 1"),
    (dict(ria_alpha=float("inf")), "ria_alpha inf must be a number in [-4, 4]"),
    # values that pass a float64 check but overflow, underflow or turn NaN in SI's float32 training (or saturate
    # RIA's scores): refused before any work
    (dict(ria_alpha=1e10), "ria_alpha 10000000000.0 must be a number in [-4, 4]"),
    (dict(si_lr=1e39), "si_lr 1e+39 must be a number in (0, 1]"),
    (dict(si_clamp=1e39), "si_clamp 1e+39 must be a number in [1, 1e6]"),
    (dict(si_p=300.0), "si_p 300.0 must be a number in [1, 8]"),
    (dict(si_p=1e-6), "si_p 1e-06 must be a number in [1, 8]"),
    (dict(si_alpha=1e39), "si_alpha 1e+39 must be a number in [0, 100]"),
    (dict(si_lambda=1e39), "si_lambda 1e+39 must be a number in [0, 1e6]"),
    (dict(eggs_diagonals=-1), "eggs_diagonals -1 must be an integer >= 0"),
    (dict(batch_size=0), "batch_size 0 must be an integer >= 1"),  # no flag: --batch-size is EPTS's
])
def test_prune_config_refuses_a_setting_out_of_range(setting, message):
    """A bad setting fails where PruneConfig is made, named as the setting (the CLI names its flag:
    test_cli_user_errors)."""
    prune.PruneConfig()  # the defaults are in range
    with pytest.raises(ValueError) as e:
        prune.PruneConfig(**setting)
    assert str(e.value) == message


# -----------------------------------------------------------------------------
# offloading


def test_calibration_streams_go_to_cpu_when_they_would_not_fit(tmp_path, monkeypatch, capsys):
    """The placement rule, and that both drivers ask it with the right sizes and get the same embeddings."""
    cuda = torch.device("cuda:0")
    assert prune.stream_device("cpu", 10**12, 10**12) == torch.device("cpu")  # CPU is always home
    for name, value in (("mem_get_info", lambda d: (100, 1000)), ("memory_reserved", lambda d: 50),
                        ("memory_allocated", lambda d: 30)):
        monkeypatch.setattr(torch.cuda, name, value)
    assert prune.free_device_bytes(cuda) == 100 + 50 - 30  # free on the card, plus PyTorch's cache not in use
    monkeypatch.undo()
    assert prune.stream_device(cuda, 60, 40, free_bytes=100) == cuda  # exactly fits
    assert prune.stream_device(cuda, 61, 40, free_bytes=100) == torch.device("cpu")
    assert prune.stream_device(cuda, 10, 95, free_bytes=100) == torch.device("cpu")  # the block needs room too

    asked = []
    real = prune.stream_device
    monkeypatch.setattr(prune, "stream_device", lambda *a, **kw: asked.append(a) or real(*a, **kw))
    model, calib = tiny_llama(), calib_ids(4)  # 4 windows of 16 tokens, hidden 32, float32
    stream = 4 * 16 * 32 * 4  # N T C bytes
    X = prune.embed_calibration(model, calib, "cpu", batch_size=3, n_streams=4, reserve_bytes=7)
    assert torch.equal(X, model.embed(calib))
    assert asked == [("cpu", 4 * stream, 7)]
    asked.clear()
    prune.prune_model(tiny_llama(), "wanda", 0.5, calib)
    run.run_epts(tiny_llama(), calib, str(tmp_path), epts.EPTSConfig(epochs=1))
    block = prune.param_bytes(model.blocks[0])
    assert asked == [("cpu", 2 * stream, 4 * block), ("cpu", 4 * stream, 6 * block)]

    # a "GPU" with 1000 bytes free: the streams are built in CPU memory (nothing here touches CUDA) and it says so
    monkeypatch.setattr(prune, "free_device_bytes", lambda device: 1000)
    X = prune.embed_calibration(model, calib, "cuda:0", batch_size=3, n_streams=4, reserve_bytes=7)
    assert X.device == torch.device("cpu") and torch.equal(X, model.embed(calib))
    assert "do not fit on cuda:0" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# real shapes: a real model's config.json, one decoder block, random bf16 weights, end to end on the CPU


def test_eggs_and_ria_masks_at_llama_2_7b_down_proj_shape():
    """Real-shape tier: LLaMA-2-7B's down_proj (4096 x 11008) and gate_proj (11008 x 4096) under EGGS 2:4: exact
    2:4 in every row, every input column >= 1 weight in every 4 x 4 tile; with b = 0 it is RIA's 2:4 mask."""
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in ((4096, 11008), (11008, 4096)):
        W = torch.randn(out_f, in_f, generator=gen).to(torch.bfloat16)
        score = prune.ria_score(W, torch.rand(in_f, generator=gen))
        mask = prune.eggs_mask(score, 2, 4, 1)
        assert (mask.view(out_f, -1, 4).sum(-1) == 2).all()
        assert (mask.view(out_f // 4, 4, in_f // 4, 4).sum(1) >= 1).all()  # (row tiles, column runs, columns)
        assert torch.equal(prune.eggs_mask(score, 2, 4, 0), prune.nm_mask(score, 2, 4))


def test_si_scales_at_llama_3_1_8b_block_shape():
    """Real-shape tier: Sparsity Induction's scales on one LLaMA-3.1-8B block (32 query heads sharing 8 KV heads,
    head_dim 128, 14336-wide MLP) leave its outputs unchanged (fp32)."""
    cfg = M.config_from_dict(dict(published_config("llama-3.1-8b"), num_hidden_layers=1))
    torch.manual_seed(0)
    block = M.LlamaBlock(cfg).eval().requires_grad_(False)
    pairs = block.scale_pairs()
    assert {name: size for name, (size, _) in pairs.items()} == \
        {"attn_in": 4096, "v_o": 1024, "mlp_in": 4096, "up_down": 14336, "q_k": 512}
    scales = {name: torch.exp(0.5 * torch.randn(size)) for name, (size, _) in pairs.items()}
    x = torch.randn(1, 8, 4096)
    torch.testing.assert_close(scaled_copy(block, scales)(x), block(x), rtol=1e-4, atol=1e-4)


def test_sslc_at_llama_2_7b_gate_proj_shape():
    """Real-shape tier: SSLC on LLaMA-2-7B's gate_proj (11008 x 4096, bf16) at 0.5, 3 alternations: rank 373 and
    1536 weights per row fill the budget, the weighted error falls, the layer computes S x + U (V x)."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4096, 11008, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.normal_(0, 0.02, generator=gen)
    stats = prune.InputStats(4096, hessian=False, device="cpu")
    stats.add(torch.randn(64, 4096, generator=gen))
    S, U, V, errors = prune.sslc_prune(lin.weight, stats.act_norm, 0.5, alternations=3)
    assert prune.sslc_budget(11008, 4096, 0.5, 0.25) == (373, 1536) and U.shape == (11008, 373)
    assert ((S != 0).sum(1) == 1536).all() and errors[-1] < errors[0]
    layer = prune.prune_layer("sslc", lin, stats, 0.5, prune.PruneConfig(alternations=1))
    x = torch.randn(3, 4096, generator=gen, dtype=torch.bfloat16)
    expect = x.float() @ layer.weight.float().t() + (x.float() @ layer.V.float().t()) @ layer.U.float().t()
    torch.testing.assert_close(layer(x).float(), expect, rtol=0.02, atol=0.02)
