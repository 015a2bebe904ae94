"""epts.py: MS-HiLoRA, the block-wise reconstruction, the mixer and deployment; the layout of the reference."""

import math
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import epts
import model as M
import prune
import run
from conftest import (calib_ids, tiny_llama, trained_block)


# -----------------------------------------------------------------------------
# epts.py: MS-HiLoRA, reconstruction, mixer, elastic file, deployment


def dense_act_norms(model, calib):
    """Wanda's ||X_j|| of every layer, from the DENSE model's activations, block by block."""
    X, norms = model.embed(calib), []
    for block in model.blocks:
        stats = prune.new_stats(block, False, "cpu")
        X = prune.run_block(block, X, "cpu", 8, stats)
        norms.append({n: s.act_norm for n, s in stats.items()})
    return norms


def test_elastic_linear_moves_its_frozen_tensors_and_saves_only_its_adapters():
    """ElasticLinear's W, bias and activation norm are buffers: .to() moves them with A and B (a layer copied into
    another repo and sent to a device keeps working), W still shares the model's storage until then, and
    state_dict() holds A and B alone (the elastic file keeps the activation norms itself)."""
    block = tiny_llama(attention_bias=True).blocks[0]
    lin = block.self_attn.q_proj
    layer = epts.ElasticLinear(lin, torch.rand(lin.in_features), n_groups=2, rank=2)
    assert layer.W.data_ptr() == lin.weight.data_ptr() and sorted(layer.state_dict()) == ["A", "B"]
    layer.to(torch.float64)
    assert {t.dtype for t in (layer.W, layer.bias, layer.act_norm, layer.A, layer.B)} == {torch.float64}
    x = torch.randn(3, lin.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x, 1, layer.mask(0.5)), F.linear(x, lin.weight.double() * layer.mask(0.5),
                                                                      lin.bias.double()))


def test_untrained_adapters_deploy_equals_wanda_with_dense_scores(tmp_path):
    """With B = 0 (lr 0), the deployed weight is W masked by Wanda's per-row mask from dense activations."""
    model, calib = tiny_llama(), calib_ids()
    elastic = run.run_epts(model, calib, str(tmp_path), epts.EPTSConfig(epochs=1, lr=0.0))
    norms = dense_act_norms(model, calib)
    deployed = epts.deploy(tiny_llama(), elastic, 0.5)
    for block, dep, norm in zip(model.blocks, deployed.blocks, norms):
        for name, lin in block.linears().items():
            assert torch.equal(dep.linears()[name].weight, lin.weight * topk_mask(lin.weight, norm[name], 0.5)), name


@pytest.mark.parametrize("nested", [True, False])
def test_deploy_uses_the_cumulative_adapters_of_the_sparsitys_group(nested):
    """A deployed weight is (W + sum_{k<=g} B_k A_k) ⊙ M_s, g the group whose range (edges[g], edges[g+1]] holds s:
    a sparsity inside every group and one on every upper edge, every adapter nonzero, so a group off by one shows.
    An elastic file trained without nesting deploys (W + B_g A_g) ⊙ M_s, its group's own pair alone."""
    model, calib = tiny_llama(), calib_ids()
    norms, gen, records = dense_act_norms(model, calib), torch.Generator().manual_seed(0), []
    for block, norm in zip(model.blocks, norms):
        layers = epts.elastic_layers(block, norm, 3, 2, gen)
        for layer in layers.values():
            layer.B.data.normal_(generator=gen)
        records.append(epts.block_record(layers, True, norm, [0.0]))
    elastic = {"edges": [0.0, 0.3, 0.5, 0.7], "rank": 2, "fingerprint": M.fingerprint(model), "blocks": records}
    if not nested:
        elastic["nested"] = False  # files written before the switch have no key: nested, the paper's
    for s, g in ((0.2, 0), (0.3, 0), (0.4, 1), (0.5, 1), (0.6, 2), (0.7, 2)):
        deployed = epts.deploy(tiny_llama(), elastic, s)
        for block, rec, norm, dep in zip(model.blocks, records, norms, deployed.blocks):
            for name, lin in block.linears().items():
                delta = sum(rec["B"][name][k] @ rec["A"][name][k] for k in (range(g + 1) if nested else [g]))
                expect = (lin.weight + delta) * topk_mask(lin.weight, norm[name], s)
                torch.testing.assert_close(dep.linears()[name].weight, expect, rtol=0, atol=1e-5)


def topk_mask(W, act_norm, s):
    """Wanda's per-row mask written independently of prune.py: keep each row's top in - int(in*s) of |W|*||X||."""
    score = W.abs() * act_norm.view(1, -1)
    keep = W.shape[1] - int(W.shape[1] * s)
    return torch.zeros_like(W, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)


def elastic_linear(n_groups=3, rank=2, out_f=12, in_f=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f).to(dtype)
    layer = epts.ElasticLinear(lin, torch.rand(in_f, generator=g) + 0.1, n_groups, rank, generator=g)
    with torch.no_grad():
        layer.B.normal_(generator=g)
    return layer


def test_merged_weight_exact_zeros_per_row_and_nested_masks():
    """W_eff keeps exactly in - int(in*s) weights per row in every group; masks are nested across sparsities."""
    layer = elastic_linear()
    for g, s in ((0, 0.3), (1, 0.5), (2, 0.7)):
        W = layer.weight(g, layer.mask(s))
        assert ((W != 0).sum(1) == 20 - int(20 * s)).all()
    m3, m5, m7 = layer.mask(0.3), layer.mask(0.5), layer.mask(0.7)
    assert (m5 <= m3).all() and (m7 <= m5).all()
    x = torch.randn(3, 20)
    W_eff = (layer.W + sum(layer.B[k] @ layer.A[k] for k in range(2))) * m5  # the paper's formula, pair by pair
    assert torch.allclose(layer(x, 1, m5), x @ W_eff.t() + layer.bias, atol=1e-6)


def test_group_gradient_reaches_only_adapters_up_to_g():
    """The loss at group g trains adapters 0..g and leaves the higher groups' adapters untouched."""
    layer = elastic_linear(n_groups=4)
    for g in range(4):
        layer.zero_grad()
        layer(torch.randn(5, 20), g, layer.mask(0.5)).pow(2).sum().backward()
        for k in range(4):
            touched = layer.A.grad[k].abs().sum() > 0 and layer.B.grad[k].abs().sum() > 0
            assert touched == (k <= g), (g, k)


def test_adapters_and_optimizer_state_stay_float32_under_bfloat16():
    """Adapters and Adam's moments are float32 while the merged weight matches the model's bf16."""
    layer = elastic_linear(dtype=torch.bfloat16)
    opt = torch.optim.Adam([layer.A, layer.B])
    out = layer(torch.randn(2, 20, dtype=torch.bfloat16), 2, layer.mask(0.5))
    out.float().pow(2).sum().backward()
    opt.step()
    assert out.dtype == torch.bfloat16 and layer.A.dtype == layer.B.dtype == torch.float32
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_merge_matches_the_definition_and_its_gradients(dtype):
    """MaskedMerge's output and hand-written backward against autograd of (W + scale B A) ⊙ M in float64:
    float32 exact to rounding, half precision as close as rounding the exact merge to that dtype."""
    g = torch.Generator().manual_seed(0)
    W = (0.02 * torch.randn(40, 64, generator=g)).to(dtype)
    B, A = 0.01 * torch.randn(40, 6, generator=g), 0.1 * torch.randn(6, 64, generator=g)
    mask, x = torch.rand(40, 64, generator=g) > 0.5, torch.randn(5, 64, generator=g)
    B64, A64 = (t.double().requires_grad_() for t in (B, A))
    exact = (W.double() + 0.5 * B64 @ A64) * mask
    F.linear(x.double(), exact).pow(2).sum().backward()
    B, A = B.requires_grad_(), A.requires_grad_()
    merged = epts.MaskedMerge.apply(W, B, A, mask, 0.5)
    F.linear(x.to(dtype), merged).float().pow(2).sum().backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    rounding = rel(exact.detach().to(dtype), exact.detach())  # the error of any merge stored in `dtype`
    assert merged.dtype == dtype and rel(merged, exact.detach()) <= 1.5 * rounding + 1e-7
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # backward through half-precision x and W_eff
    assert B.grad.dtype == A.grad.dtype == torch.float32
    assert rel(B.grad, B64.grad) < tol and rel(A.grad, A64.grad) < tol


def test_backward_keeps_only_the_bool_mask_and_the_merged_weight():
    """The memory formula's 'saved for backward' term: per weight, 1 B of mask + the merged weight in bf16."""
    layer = elastic_linear(dtype=torch.bfloat16)
    x = torch.randn(2, 20, dtype=torch.bfloat16, requires_grad=True)  # as inside a block, after trained layers
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x, 2, layer.mask(0.5))
    weight_sized = sorted(str(t.dtype) for t in saved if t.numel() == layer.W.numel())  # W or Wᵀ
    assert weight_sized == ["torch.bfloat16", "torch.bool"]


def test_reconstruction_loss_falls_on_a_tiny_block():
    """Training one block's adapters lowers the multi-group reconstruction loss epoch over epoch."""
    model, calib = tiny_llama(), calib_ids(8)
    block = model.blocks[0]
    X = model.embed(calib)
    stats = prune.new_stats(block, False, "cpu")
    Y = prune.run_block(block, X, "cpu", 8, stats)
    layers = epts.elastic_layers(block, {n: s.act_norm for n, s in stats.items()}, 7, 4,
                                 torch.Generator().manual_seed(0))
    losses = epts.train_block(block, layers, (X, Y), epts.EPTSConfig(epochs=6, lr=1e-2, batch_size=2),
                              torch.Generator().manual_seed(0))
    assert losses[-1] < 0.8 * losses[0], losses


def test_low_group_flag_switches_adapter_zero_off_when_it_hurts(monkeypatch):
    """A helpful adapter 0 stays on; one made harmful (large random B_0) is switched off."""
    model, calib = tiny_llama(), calib_ids(8)
    block = model.blocks[0]
    X = model.embed(calib) + 0.3 * torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(1))
    stats = prune.new_stats(block, False, "cpu")
    Y = prune.run_block(block, model.embed(calib), "cpu", 8, stats)
    layers = epts.elastic_layers(block, {n: s.act_norm for n, s in stats.items()}, 7, 4,
                                 torch.Generator().manual_seed(0))
    epts.train_block(block, layers, (X, Y), epts.EPTSConfig(epochs=8, lr=1e-2, batch_size=2),
                     torch.Generator().manual_seed(0))
    assert epts.low_group_check(block, layers, (X, Y), epts.EPTSConfig(batch_size=4))
    # it measures the block as block_forward computes it, with and without adapter 0, the weights merged once
    # for all windows (not once per batch)
    merges, outs, real_weights = [], [], epts.block_weights
    batches = lambda f: torch.cat([f(X[i:i + 4]) for i in (0, 4)])  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(epts, "block_weights", lambda *a, **kw: merges.append(a[1:]) or real_weights(*a, **kw))
        m.setattr(epts, "mean_error", lambda f, *a, **kw: outs.append(batches(f)) or 0.0)
        epts.low_group_check(block, layers, (X, Y), epts.EPTSConfig(batch_size=4))
    s = epts.EPTSConfig.check_sparsity
    assert merges == [(0, s, True), (0, s, False)]
    for out, adapters in zip(outs, (True, False)):
        assert torch.equal(out, batches(lambda x: epts.block_forward(block, layers, x, 0, s, adapters).detach()))
    with torch.no_grad():
        for layer in layers.values():
            layer.B[0].normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    assert not epts.low_group_check(block, layers, (X, Y), epts.EPTSConfig(batch_size=4))


def test_groups_draws_and_mixer_weights():
    """Groups extend in 0.05 steps; draws are stratified inside the group; mixer weights sum to 1."""
    assert epts.extend_edges(epts.EPTSConfig.edges, 0.8)[-3:] == [0.7, 0.75, 0.8]
    assert epts.group_of(epts.EPTSConfig.edges, 0.3) == 0 and epts.group_of(epts.EPTSConfig.edges, 0.4) == 0
    assert epts.group_of(epts.EPTSConfig.edges, 0.41) == 1 and epts.group_of(epts.EPTSConfig.edges, 0.7) == 6
    with pytest.raises(ValueError, match="above the elastic model's range"):
        epts.group_of(epts.EPTSConfig.edges, 0.75)
    draws = sorted(epts.stratified_draws(0.5, 0.55, 10, torch.Generator().manual_seed(0)))
    assert all(0.5 + 0.005 * k < d <= 0.5 + 0.005 * (k + 1) + 1e-12 for k, d in enumerate(draws))
    assert epts.MSFM(epts.EPTSConfig.edges).weights == pytest.approx([.1, .1, .1, .1, .2, .2, .2])
    for G in range(1, 10):
        assert sum(epts.MSFM([0.1 * k for k in range(G + 1)]).weights) == pytest.approx(1.0)


def test_mixer_output_is_the_weighted_sum_of_the_groups_outputs():
    """MSFM mixes sum_g w_g block(X) at one draw per group: a one-hot weight returns that group's output alone,
    and the default weights give the weighted sum at the same draws (g = 0 without adapter 0 if flagged off);
    each batch of the stream has draws of its own."""
    edges = [0.0, 0.4, 0.55, 0.7]
    block, layers, X, _, _ = trained_block(edges)
    draws = epts.MSFM(edges).draw(torch.Generator().manual_seed(5))
    assert all(lo < s <= hi for s, lo, hi in zip(draws, edges, edges[1:]))
    outs = [epts.block_forward(block, layers, X, g, s, adapters=g > 0).float() for g, s in enumerate(draws)]
    for g in range(3):
        one_hot = epts.MSFM(edges, weights=[float(k == g) for k in range(3)])
        mixed = one_hot.mix(epts.deployed_forward(block, layers, False), X, draws)
        assert torch.allclose(mixed, outs[g], atol=1e-6), g
    mixed = epts.mix_stream(epts.MSFM(edges), epts.deployed_forward(block, layers, False), X, 8,
                            torch.Generator().manual_seed(5))  # one batch of 8: the same draws
    expected = (outs[0] + outs[1] + 2 * outs[2]) / 4  # weights 1, 1, 2 (the lower half of 3 groups is 2)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert not torch.allclose(outs[1], outs[2], atol=1e-3)  # the groups really differ, so the weights matter
    drawn = []  # batches of 4: each batch mixes at fresh draws, the generator's next ones
    epts.mix_stream(epts.MSFM(edges), lambda x, g, s: drawn.append(s) or x, X, 4, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    assert drawn == epts.MSFM(edges).draw(gen) + epts.MSFM(edges).draw(gen)


def test_the_copyable_core_runs_from_its_source_with_torch_alone():
    """MaskedMerge, ElasticLinear, MSFM, group_loss and the score and mask helpers they call, executed from their
    source in a namespace that holds only torch (and math, functools): a forward and backward run, equal to the
    library's own, so that a reader can paste them into another repo."""
    import functools
    import inspect
    ns = {"torch": torch, "nn": torch.nn, "F": F, "math": math, "functools": functools}
    for obj in (prune.wanda_score, prune.row_order, prune.mask_from_order, prune.lowest_k, prune.row_mask,
                epts.MaskedMerge, epts.ElasticLinear, epts.MSFM, epts.group_loss):
        exec(inspect.getsource(obj), ns)
    lin, act_norm = torch.nn.Linear(32, 12), torch.rand(32) + 0.1
    ours = epts.ElasticLinear(lin, act_norm, 3, 2, generator=torch.Generator().manual_seed(0))
    copied = ns["ElasticLinear"](lin, act_norm, 3, 2, generator=torch.Generator().manual_seed(0))
    for layer in (ours, copied):
        layer.B.data.normal_(generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 12)
    losses = []
    for layer, loss in ((ours, epts.group_loss), (copied, ns["group_loss"])):
        out = layer(x, 2, layer.mask(0.6))
        losses.append(loss(out, y, out.detach() + 1))
        losses[-1].backward()
        assert torch.equal(layer.deploy_mask(0.6), layer.mask(0.6))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(ours.A.grad, copied.A.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.B.grad, copied.B.grad, rtol=0, atol=0)
    mixer = ns["MSFM"]([0.0, 0.4, 0.7])
    draws = mixer.draw(torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixer.mix(lambda x, g, s: x * s, x, draws), x * sum(
        w * s for w, s in zip(mixer.weights, draws)))


def test_the_reference_files_keep_their_layout():
    """epts.py holds EPTS alone (at most 450 lines; of ours it imports prune and parallel; no user-error, flag,
    file or print code), one training step stays one stretch of at most 180 lines with at most 5 process-hook
    lines, every method section of prune.py is at most 130 lines and its shared helpers at most 100, model.py
    opens on the model, and the plumbing modules stay under 950 lines together."""
    import ast
    here = os.path.dirname(os.path.abspath(__file__))
    read = lambda name: open(os.path.join(here, name)).read()  # noqa: E731
    src = read("epts.py")
    lines = src.splitlines()
    assert len(lines) <= 450
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    main_stub = src[src.index('if __name__ == "__main__":'):]
    assert imported - {"cli"} <= {"functools", "math", "sys", "dataclasses", "torch", "prune", "parallel"}, imported
    assert "import cli" not in src.replace(main_stub, "") and len(main_stub.splitlines()) <= 3
    for forbidden in ("UserError", "open(", "os.", "print("):
        assert forbidden not in src, forbidden
    assert not re.search(r"--[a-z]", src)
    step = [i for i, line in enumerate(lines) if line.startswith(("def group_loss", "def mean_error"))]
    stretch = lines[step[0]:step[1]]  # group_loss, train_step, train_block: one stretch
    assert len(stretch) <= 180 and sum("procs." in line for line in stretch) <= 5
    prune_lines = read("prune.py").splitlines()
    heads = [i for i, line in enumerate(prune_lines) if line.startswith("# -----")] + [len(prune_lines)]
    sections = {prune_lines[a + 1]: b - a for a, b in zip(heads, heads[1:])}
    methods = ("magnitude", "Wanda", "RIA", "SparseGPT", "SSLC", "Sparsity Induction", "OWL")
    for name in methods:
        [(title, n)] = [(t, n) for t, n in sections.items() if t.startswith(f"# {name}")]
        assert n <= 130, (title, n)
    assert [t for t in sections if t.startswith("# scores and masks")] and \
        all(n <= 100 for t, n in sections.items() if t.startswith("# scores and masks"))
    first_class = next(i for i, line in enumerate(read("model.py").splitlines()) if line.startswith("class "))
    assert first_class < 40
    assert sum(len(read(name).splitlines()) for name in ("cli.py", "run.py")) <= 950


def test_every_function_of_epts_and_of_prunes_methods_is_named_by_a_test():
    """Every function and class (and method, but forward/backward) of epts.py and of prune.py's method sections
    is called or named by some test: `name(`, `module.name` or `.method`."""
    import ast
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    tests = "".join(open(p).read() for p in glob.glob(os.path.join(here, "test_*.py")) +
                    [os.path.join(here, "bench", "test_bench.py")] if p != os.path.abspath(__file__))
    own = open(__file__).read()
    start = own.index("def test_every_function_of_epts")
    end = own.find("\ndef ", start + 1)
    tests += own[:start] + (own[end:] if end > 0 else "")  # this file, but this test

    def defined(module, lo=0, hi=10 ** 9):
        src = open(os.path.join(here, f"{module}.py")).read()
        for n in ast.parse(src).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and lo <= n.lineno <= hi:
                yield n.name, rf"(?<![\w.]){n.name}\(|\b{module}\.{n.name}\b"
                for m in (m for m in n.body if isinstance(n, ast.ClassDef) and isinstance(m, ast.FunctionDef)):
                    if not m.name.startswith("__") and m.name not in ("forward", "backward"):
                        yield f"{n.name}.{m.name}", rf"\.{m.name}\b"

    lines = open(os.path.join(here, "prune.py")).read().splitlines()
    lo = next(i for i, line in enumerate(lines) if line.startswith("# magnitude"))
    hi = next(i for i, line in enumerate(lines) if line.startswith("# the block-wise driver"))
    names = [*defined("epts"), *defined("prune", lo, hi)]
    assert len(names) > 50
    missing = [name for name, pattern in names if not re.search(pattern, tests)]
    assert not missing, missing


def test_stacked_pairs_multiply_to_the_sum_of_their_products():
    """B (out, n r) @ A (n r, in) of the pairs a slice names equals sum_k B_k A_k over those pairs."""
    layer = epts.ElasticLinear(torch.nn.Linear(6, 5), torch.rand(6), n_groups=4, rank=2)
    layer.B.data.normal_()
    for pairs in (slice(0, 3), slice(2, 3), slice(1, 4)):
        B, A = layer.stacked(pairs)
        torch.testing.assert_close(B @ A, sum(layer.B[k] @ layer.A[k] for k in range(4)[pairs]))


def test_mean_error_is_the_mse_over_every_window_in_any_batch_size():
    X, Y = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    for batch_size in (1, 2, 5):
        err = epts.mean_error(lambda x: 2 * x, X, Y, "cpu", batch_size)
        assert err == pytest.approx(F.mse_loss(2 * X, Y).item(), rel=1e-6)


def test_one_sparsity_mixer_feeds_its_groups_output_alone():
    """OneSparsity(edges, s) draws s for every group and weighs only s's group: mix = forward(x, g(s), s)."""
    mixer = epts.OneSparsity([0.0, 0.4, 0.5, 0.7], 0.45)
    assert mixer.draw(torch.Generator()) == [0.45] * 3 and mixer.weights == [0.0, 1.0, 0.0]
    x = torch.randn(2, 3)
    torch.testing.assert_close(mixer.mix(lambda x, g, s: x * (g + s), x, mixer.draw(None)), x * 1.45)
    with pytest.raises(ValueError, match="above the elastic model's range"):
        epts.OneSparsity([0.0, 0.4, 0.5], 0.6)


def test_no_function_of_the_library_takes_more_than_six_parameters():
    """Issue 23's bound, kept as methods are added: a function that needs more takes a config or a tuple of what
    belongs together (SI's basis, the streams (X, Y))."""
    import ast
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("epts", "prune", "model", "data", "eval", "default_model", "parallel", "cli", "run"):
        with open(os.path.join(here, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg != "self"]
            assert len(params) <= 6, (name, fn.name, params)


def test_group_loss_and_its_use_in_training(monkeypatch):
    """loss_0 = MSE(out_0, Y); loss_g = 0.5 MSE(out_g, Y) + 0.5 MSE(out_g, out_0.detach()), every group, every step;
    the epoch's loss reported is their mean."""
    out, y, out0 = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    assert torch.allclose(epts.group_loss(out, y), mse(out, y))
    assert torch.allclose(epts.group_loss(out, y, out0), 0.5 * mse(out, y) + 0.5 * mse(out, out0))
    calls, values, real = [], [], epts.group_loss

    def recorded(o, t, o0=None):
        calls.append((o, o0))
        values.append(real(o, t, o0))
        return values[-1]

    monkeypatch.setattr(epts, "group_loss", recorded)
    *_, losses = trained_block(epochs=1)  # 8 windows, batch 4: 2 steps of 7 groups
    assert len(calls) == 2 * 7
    assert losses == [pytest.approx(sum(v.item() for v in values) / 14)]  # the epoch's mean over steps and groups
    for step in range(2):
        group0 = calls[7 * step][0]
        assert calls[7 * step][1] is None
        assert all(o0 is not None and not o0.requires_grad and torch.equal(o0, group0.detach())
                   for _, o0 in calls[7 * step + 1: 7 * step + 7])


def test_training_reads_a_value_back_once_per_epoch(monkeypatch):
    """A training step never waits for the device: epts reads no tensor back into Python inside the loop (on a
    GPU each read is a synchronisation), only each epoch's summed loss at its end. (The CPU's per-tensor Adam
    reads its step counts; the fused CUDA Adam does not.)"""
    reads, real_item = [], torch.Tensor.item

    def item(t):
        if sys._getframe(1).f_code.co_filename == epts.__file__:
            reads.append(t.shape)
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "__float__", item)
    trained_block(epochs=3)  # 8 windows, batch 4: 2 steps an epoch, 3 epochs
    assert len(reads) == 3


def test_training_follows_a_cosine_schedule_and_stratified_draws(monkeypatch):
    """The learning rate decays as lr/2 (1 + cos(pi t / T)), and each group's T draws fall one in each of T equal
    intervals of its range (not all at its top, not repeated)."""
    lrs, seen = [], []

    class RecordingAdam(torch.optim.Adam):
        def step(self, *a, **kw):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **kw)

    real_forward = epts.block_forward
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    monkeypatch.setattr(epts, "block_forward", lambda b, l, x, g, s, adapters=True: seen.append((g, s)) or
                        real_forward(b, l, x, g, s, adapters))
    edges = [0.0, 0.4, 0.7]
    block, layers, X, Y, _ = trained_block(edges, epochs=3)  # 8 windows, batch 4: T = 6 steps
    T = 6
    assert lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)])
    for g, (lo, hi) in enumerate(zip(edges, edges[1:])):
        draws = sorted(s for gg, s in seen[: 2 * T] if gg == g)
        assert len(draws) == T
        assert all(lo + (hi - lo) * k / T < d <= lo + (hi - lo) * (k + 1) / T + 1e-12 for k, d in enumerate(draws))


def test_training_visits_windows_and_draws_in_the_generators_shuffled_order(monkeypatch):
    """With the block's generator: each group's draws come first (a random permutation of its T intervals, then one
    uniform value per draw), then every epoch a fresh torch.randperm of the windows; the steps follow exactly that
    order, so neither the windows nor the draws are visited in a fixed order."""
    seen = []
    real_forward = epts.block_forward
    monkeypatch.setattr(epts, "block_forward", lambda b, l, x, g, s, adapters=True: seen.append((g, s, x)) or
                        real_forward(b, l, x, g, s, adapters))
    edges, epochs, T = [0.0, 0.4, 0.7], 3, 6  # 8 windows, batch 4: 2 steps an epoch
    block, layers, X, Y, _ = trained_block(edges, epochs=epochs)
    gen = torch.Generator().manual_seed(0)
    intervals = []
    for g in range(2):
        intervals.append(torch.randperm(T, generator=gen, dtype=torch.float64).long().tolist())
        torch.rand(T, generator=gen, dtype=torch.float64)
    orders = torch.cat([torch.randperm(8, generator=gen) for _ in range(epochs)]).view(T, 4)
    assert len({tuple(o) for o in orders.view(epochs, 8).tolist()}) == epochs  # the seed gives 3 distinct orders
    assert intervals[0] != sorted(intervals[0]) and intervals[1] != sorted(intervals[1])
    assert len(seen) == 2 * T
    for step in range(T):
        for g in range(2):
            gg, s, x = seen[2 * step + g]
            lo, hi = edges[g], edges[g + 1]
            k = intervals[g][step]
            assert gg == g and lo + (hi - lo) * k / T < s <= lo + (hi - lo) * (k + 1) / T + 1e-12
            assert torch.equal(x, X[orders[step]])


@pytest.mark.parametrize("use0", [False, True])
def test_mixer_feeds_the_next_block_through_group_0_as_deployed(monkeypatch, use0):
    """The mixer's group-0 output is the block as deploy builds it: without adapter 0 when the low-group check
    turned it off, with it when on (the adapters are trained, so the two differ)."""
    mixed, made = [], []
    real_mix, real_layers = epts.MSFM.mix, epts.elastic_layers
    monkeypatch.setattr(epts, "low_group_check", lambda *a, **k: use0)
    monkeypatch.setattr(epts, "elastic_layers", lambda *a, **k: made.append(real_layers(*a, **k)) or made[-1])
    monkeypatch.setattr(epts.MSFM, "mix", lambda self, forward, X, *a, **k: mixed.append((forward, X)) or
                        real_mix(self, forward, X, *a, **k))
    model = tiny_llama()
    records = epts.train_blocks(model, calib_ids(4), epts.EPTSConfig(epochs=1, lr=1e-2), "cpu")
    assert [rec["use_adapter0"] for rec in records] == [use0, use0]
    forward, X = mixed[0]
    with torch.no_grad():
        out = forward(X, 0, 0.3)
        assert torch.equal(out, epts.block_forward(model.blocks[0], made[0], X, 0, 0.3, adapters=use0))
        assert not torch.equal(out, epts.block_forward(model.blocks[0], made[0], X, 0, 0.3, adapters=not use0))
        assert torch.equal(forward(X, 1, 0.5), epts.block_forward(model.blocks[0], made[0], X, 1, 0.5))


def test_every_block_and_every_seed_draws_its_own_adapters():
    """Block i's adapters start from a generator of (seed, i) alone, so that a resumed run draws what an
    uninterrupted one would, and no two blocks or --seed values share their draws (lr 0: A stays as drawn)."""
    def first_draws(seed):
        records = epts.train_blocks(tiny_llama(num_hidden_layers=3), calib_ids(4),
                                    epts.EPTSConfig(epochs=1, lr=0.0, seed=seed), "cpu")
        return [rec["A"]["self_attn.q_proj"] for rec in records]

    A = first_draws(0) + first_draws(1)
    assert all(not torch.equal(a, b) for i, a in enumerate(A) for b in A[i + 1:])
    assert all(torch.equal(a, b) for a, b in zip(A, first_draws(0)))


def test_nesting_off_trains_each_group_on_its_own_adapter(monkeypatch):
    """EPTSConfig(nested=False): group g's weight is (W + B_g A_g) ⊙ M, every training forward of group g uses pair
    g alone, so pair 0 learns from group 0's loss only; the default sums pairs 0..g (MS-HiLoRA)."""
    block, layers, X, Y, _ = trained_block([0.0, 0.4, 0.55, 0.7])
    layer, mask = layers["mlp.down_proj"], layers["mlp.down_proj"].mask(0.6)
    for g in range(3):
        own = (layer.W + layer.B[g] @ layer.A[g]) * mask
        torch.testing.assert_close(layer.weight(g, mask, epts.group_adapters(g, False)), own)
        summed = (layer.W + sum(layer.B[k] @ layer.A[k] for k in range(g + 1))) * mask
        torch.testing.assert_close(layer.weight(g, mask, epts.group_adapters(g, True)), summed)
    assert epts.group_adapters(0, False, use_adapter0=False) is False
    seen, real = [], epts.block_forward
    monkeypatch.setattr(epts, "block_forward", lambda b, l, x, g, s, adapters=True: seen.append((g, adapters)) or
                        real(b, l, x, g, s, adapters))
    config = epts.EPTSConfig((0.0, 0.4, 0.55, 0.7), epochs=1, lr=1e-2, batch_size=4, nested=False)
    epts.train_block(block, layers, (X, Y), config, torch.Generator().manual_seed(0))
    assert seen and all(a == slice(g, g + 1) for g, a in seen)
    grads = []
    for draws in ([(0.3, slice(0, 1))], [(0.3, slice(0, 1)), (0.5, slice(1, 2)), (0.6, slice(2, 3))]):
        layer.B.grad = None
        epts.train_step(block, layers, X[:4], Y[:4], draws)
        grads.append(layer.B.grad[0].clone())
    torch.testing.assert_close(grads[0], grads[1])  # groups 1 and 2 leave pair 0 alone


@pytest.mark.parametrize("mixer", ["dense", 0.5])
def test_mixer_off_feeds_the_next_block_exactly_the_chosen_stream(mixer, monkeypatch):
    """EPTSConfig(mixer="dense"): block 1 trains on block 0's dense outputs; mixer=s: on block 0's outputs at s
    alone, as deployed (its group's adapters), not on MSFM's mix."""
    model, calib = tiny_llama(), calib_ids(8)
    config = epts.EPTSConfig((0.0, 0.4, 0.55, 0.7), epochs=1, lr=1e-2, rank=4, batch_size=4, mixer=mixer)
    streams, real = [], epts.train_block
    monkeypatch.setattr(epts, "train_block", lambda b, l, st, *a: streams.append([t.clone() for t in st]) or
                        real(b, l, st, *a))
    records = epts.train_blocks(model, calib, config, "cpu")
    X0, Y0 = streams[0]
    if mixer == "dense":
        assert torch.equal(streams[1][0], Y0)
    else:
        layers = epts.restore_layers(model.blocks[0], records[0], 3, 4)
        g = epts.group_of(config.edges, 0.5)
        expected = epts.block_forward(model.blocks[0], layers, X0, g, 0.5, epts.group_adapters(g, True)).detach()
        torch.testing.assert_close(streams[1][0], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(streams[1][0], Y0, atol=1e-3)


def test_low_group_check_off_always_deploys_adapter_0(monkeypatch):
    """EPTSConfig(check_low_group=False): no block runs the check, every block's record keeps adapter 0."""
    monkeypatch.setattr(epts, "low_group_check", None)  # called: a TypeError
    config = epts.EPTSConfig((0.0, 0.4, 0.7), epochs=1, lr=1e-2, rank=2, batch_size=4, check_low_group=False)
    records = epts.train_blocks(tiny_llama(), calib_ids(8), config, "cpu")
    assert [r["use_adapter0"] for r in records] == [True, True]


def test_deploy_honours_the_low_group_flag(tmp_path):
    """A block whose adapter 0 is flagged off deploys group-0 sparsities as plain Wanda; flagged on, it does not."""
    model, calib = tiny_llama(), calib_ids()
    elastic = run.run_epts(model, calib, str(tmp_path), epts.EPTSConfig(epochs=2, lr=1e-2))
    norms = dense_act_norms(model, calib)
    for flag in (False, True):
        for rec in elastic["blocks"]:
            rec["use_adapter0"] = flag
        deployed = epts.deploy(tiny_llama(), elastic, 0.3)
        plain = [torch.equal(dep.linears()[name].weight, lin.weight * topk_mask(lin.weight, norm[name], 0.3))
                 for block, dep, norm in zip(model.blocks, deployed.blocks, norms)
                 for name, lin in block.linears().items()]
        assert all(plain) if not flag else not any(plain)
    fresh = tiny_llama()
    state = torch.get_rng_state()  # and deploying draws nothing from torch's global generator
    epts.deploy(fresh, elastic, 0.5)
    assert torch.equal(torch.get_rng_state(), state)
