"""parallel.py: torchrun processes share one EPTS optimisation."""

import json

import pytest
import torch

import epts
import model as M
import parallel
import prune
import run
from conftest import (main, needs_transformers, run_command, torchrun, trained_block)
from model import UserError


# -----------------------------------------------------------------------------
# group-parallel EPTS: torchrun processes share one optimisation


@needs_transformers
def test_owl_allocation_from_the_elastic_file_and_from_a_file(tiny, tmp_path):
    """--allocation owl: EPTS's per-block sparsities come from the elastic file alone and equal the baselines'
    (both from the dense model's activations); each block is exactly as sparse as allocated, the mean is S.
    --allocation FILE deploys the file's list; a list of the wrong length is refused."""
    main(**dict(tiny, methods=["epts"], sparsities=[0.5, 0.8], nsamples=4))  # elastic range up to 0.8
    report = main(**dict(tiny, methods=["wanda", "epts"], sparsities=[0.6], nsamples=4, allocation="owl",
                         json=str(tmp_path / "r.json"), elastic=tiny["out"]))
    rows = {row["method"]: row for row in report["results"]}
    owl = rows["epts"]["block_sparsities"]
    assert len(owl) == 2 and owl[0] != owl[1] and sum(owl) / 2 == pytest.approx(0.6, abs=1e-6)
    assert rows["wanda"]["block_sparsities"] == pytest.approx(owl, abs=1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["block_sparsities"] == owl
    model = M.load_model(tiny["ckpt"])
    elastic = run.load_elastic(tiny["out"])
    ratios = [prune.outlier_ratio(b, rec["act_norm"]) for b, rec in zip(model.blocks, elastic["blocks"])]
    assert prune.owl_sparsities(ratios, 0.6, hi=0.8)[0] == pytest.approx(owl, abs=1e-6)
    epts.deploy(model, elastic, owl)
    for block, s in zip(model.blocks, owl):
        for lin in block.linears().values():
            assert ((lin.weight == 0).sum(1) == int(lin.in_features * s)).all()
    report = main(**dict(tiny, methods=["magnitude"], sparsities=[0.6], nsamples=4, allocation="owl"))
    assert report["results"][0]["block_sparsities"] == pytest.approx(owl, abs=1e-6)  # magnitude gets OWL's too
    (tmp_path / "alloc.json").write_text("[0.4, 0.7]")
    report = main(**dict(tiny, methods=["epts"], allocation=str(tmp_path / "alloc.json"), elastic=tiny["out"]))
    assert report["results"][0]["block_sparsities"] == [0.4, 0.7] and report["results"][0]["sparsity"] == 0.55
    (tmp_path / "alloc.json").write_text("[0.4, 0.7, 0.5]")
    with pytest.raises(UserError, match="lists 3 sparsities, but the model has 2 blocks"):
        main(**dict(tiny, methods=["epts"], allocation=str(tmp_path / "alloc.json"), elastic=tiny["out"]))


def test_owl_for_epts_near_the_top_of_the_trained_range_clips_to_its_last_edge(tiny, capsys):
    """OWL at 0.58 spreads the blocks by +-0.08; the elastic model reaches 0.6, so one block is clipped to exactly
    0.6 and the other raised to keep the mean: [0.56, 0.6] in some order, and the note names that range."""
    main(**dict(tiny, methods=["epts"], sparsities=[0.5], nsamples=4, edges=(0.0, 0.4, 0.6)))
    capsys.readouterr()
    report = main(**dict(tiny, methods=["epts"], sparsities=[0.58], nsamples=4, allocation="owl",
                         elastic=tiny["out"]))
    assert sorted(report["results"][0]["block_sparsities"]) == pytest.approx([0.56, 0.6], abs=1e-9)
    assert "note: OWL at 0.58 for epts: blocks clipped into [0, 0.6]" in capsys.readouterr().err
    report = main(**dict(tiny, methods=["magnitude"], sparsities=[0.05], allocation="owl"))  # 0.05 - 0.08 < 0
    assert min(report["results"][0]["block_sparsities"]) == 0.0
    assert "blocks clipped into [0, 0.99]" in capsys.readouterr().err


def test_windows_are_whole_batches_shared_out_in_order():
    """K ranks' window slices tile [0, N) in order, each a run of whole batches; one process takes them all."""
    for n, batch, K in ((10, 3, 3), (4, 1, 3), (2, 1, 3), (7, 2, 2)):
        slices = [parallel.Procs(r, K).windows(n, batch) for r in range(K)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert all(lo % batch == 0 for lo, _ in slices)
    assert parallel.SOLO.windows(10, 3) == (0, 10)
    assert [g for g in range(7) if parallel.Procs(1, 3).owns(g)] == [1, 4]


def test_adapters_that_differ_between_processes_stop_the_run():
    """check_same compares each process's adapters with process 0's (here a stand-in for the broadcast)."""
    procs = parallel.Procs(1, 2)
    procs.broadcast = lambda t, src: t.zero_()  # process 0's adapters: other values
    with pytest.raises(RuntimeError, match="process 1: adapters differ from process 0's"):
        procs.check_same([torch.ones(3)])
    procs.broadcast = lambda t, src: t  # the same values
    procs.check_same([torch.ones(3)])


def train_block_in_process(rank, size, init_file, edges, out):
    """One of `size` gloo processes: the summed gradient of a known per-process value, then train_block on
    trained_block's set-up; rank 0 saves what it got."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    procs = parallel.Procs(rank, size)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    loss = procs.sum_gradients([p], torch.tensor(10.0 * (rank + 1)))
    _, layers, _, Y, losses = trained_block(edges, procs=procs, batch_size=3)  # 3 batches: windows split 1 / 2
    if rank == 0:
        torch.save({"grad": p.grad, "loss": loss, "Y": Y, "losses": losses,
                    "B": {n: layer.B.detach() for n, layer in layers.items()}}, out)
    parallel.exit_process(0)  # as the CLI ends: no interpreter teardown while gloo's threads drop tensors


@pytest.mark.parametrize("edges", [(0.0, 0.5, 0.7), (0.0, 0.4, 0.5, 0.6, 0.7)])
def test_two_processes_with_groups_a_multiple_of_two_train_what_one_process_trains(tmp_path, edges):
    """2 gloo processes, G = 2 and 4 groups (the process count divides G, so group 0's output must still be broadcast
    to the process owning groups 1, 3): gradients are summed, not averaged (1 + 2 = 3), the shared dense outputs and
    the per-epoch losses and adapters equal one process's to float32 round-off."""
    import torch.multiprocessing as mp
    out = tmp_path / "rank0.pt"
    mp.spawn(train_block_in_process, args=(2, str(tmp_path / "init"), edges, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["grad"], torch.full((3,), 3.0)) and got["loss"].item() == 30.0
    _, layers, _, Y, losses = trained_block(edges, batch_size=3)
    assert torch.equal(got["Y"], Y)
    assert got["losses"] == pytest.approx(losses, rel=1e-6)
    for name, layer in layers.items():
        torch.testing.assert_close(got["B"][name], layer.B.detach(), rtol=1e-4, atol=1e-6)


@needs_transformers
@pytest.mark.parametrize("nproc", [2, 3])
def test_group_parallel_run_equals_one_process(tiny, tmp_path, nproc):
    """torchrun with 2 and 3 CPU processes (gloo) trains the elastic model that one process trains: the same
    settings and low-group decisions, adapters equal to float32 round-off, and the deployed perplexities equal to 4
    significant digits. Only rank 0 writes."""
    args = ["--ckpt", tiny["ckpt"], "--calib", tiny["calib"], "--eval", *tiny["evals"], "--seqlen", "16",
            "--nsamples", "5", "--epochs", "2", "--batch-size", "2", "--methods", "epts", "--sparsities", "0.5,0.7"]
    one = run_command(*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    many = torchrun(nproc, *args, "--out", str(tmp_path / "many"), "--json", str(tmp_path / "many.json"))
    assert many.returncode == 0, many.stderr[-3000:]
    a, b = (torch.load(tmp_path / run / "elastic.pt", weights_only=True) for run in ("one", "many"))
    # the settings agree; the blocks (and so the file's checksum) only to float32 round-off, checked below
    assert {k: v for k, v in a.items() if k not in ("blocks", "sha256")} == \
        {k: v for k, v in b.items() if k not in ("blocks", "sha256")}
    for ra, rb in zip(a["blocks"], b["blocks"]):
        assert ra["use_adapter0"] == rb["use_adapter0"]
        assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
        for key in ("A", "B", "act_norm"):
            for name in ra[key]:
                # the processes sum the gradients in another order; where a gradient nearly cancels, Adam's
                # normalised step turns that round-off into up to a fraction of one step (lr 1e-3) in a rare element
                diff = (rb[key][name] - ra[key][name]).abs()
                assert diff.max() <= 1e-4 and (diff > 1e-5 + 1e-4 * ra[key][name].abs()).float().mean() <= 1e-3
    ppl = [[row["ppl"] for row in json.loads((tmp_path / f"{run}.json").read_text())["results"]]
           for run in ("one", "many")]
    assert len(ppl[0]) == 2 and [f"{p:.4g}" for p in ppl[0]] == [f"{p:.4g}" for p in ppl[1]]
    assert many.stdout.count("epts ") == 2  # one table, rank 0's
    assert json.loads((tmp_path / "many.json").read_text())["epts"]["processes"] == nproc
    too_many = torchrun(nproc, *args[:-4], "--methods", "epts", "--sparsities", "0.5", "--groups", "0,0.5",
                        "--out", str(tmp_path / "x"))
    assert too_many.returncode != 0 and too_many.stderr.count("run at most as many processes as groups") == 1
