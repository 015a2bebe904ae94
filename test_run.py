"""run.py: the elastic file, the run folder and resume."""

import copy
import json
import os
import re
import shutil
import types

import pytest
import torch

import cli
import epts
import model as M
import prune
import run
from conftest import (calib_ids, interrupt_after_first_block, main, needs_transformers, tiny_llama)
from model import UserError


# -----------------------------------------------------------------------------
# epts.py: MS-HiLoRA, reconstruction, mixer, elastic file, deployment


def test_progress_says_blocks_done_time_elapsed_and_an_estimate_of_the_rest(monkeypatch, capsys):
    """One stderr line per block: blocks done of all, seconds since the start, and the mean time per block so far
    times the blocks left; a resumed run (start=1) counts from its first unfinished block."""
    clock = iter([0.0, 2.0, 4.0, 9.0])
    monkeypatch.setattr(prune, "time", types.SimpleNamespace(time=lambda: next(clock)))
    progress = prune.Progress(4, "epts", start=1)
    for _ in range(3):
        progress.step(", loss 1 -> 0.5")
    assert capsys.readouterr().err.splitlines() == ["epts: block 2/4 done, 2.0s elapsed, ~4.0s left, loss 1 -> 0.5",
                                                    "epts: block 3/4 done, 4.0s elapsed, ~2.0s left, loss 1 -> 0.5",
                                                    "epts: block 4/4 done, 9.0s elapsed, ~0.0s left, loss 1 -> 0.5"]


@pytest.mark.parametrize("done", [1, 2])
def test_resume_gives_bit_identical_adapters(tmp_path, monkeypatch, capsys, done):
    """A run interrupted after block 0 (or 1) and re-run ends with the same elastic model as an uninterrupted run:
    each finished block replays its own record. A saved block whose tensors were changed is refused."""
    calib = calib_ids(4)
    full = run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "a"), epts.EPTSConfig(epochs=2))
    real = interrupt_after_first_block(monkeypatch, done)
    with pytest.raises(KeyboardInterrupt):
        run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "b"), epts.EPTSConfig(epochs=2))
    assert sorted(os.listdir(tmp_path / "b" / "partial")) == [f"block_{i:03d}.pt" for i in range(done)] + ["run.json"]
    assert "resume from the first unfinished block" in capsys.readouterr().err
    monkeypatch.setattr(epts, "train_block", real)
    saved = tmp_path / "b" / "partial" / "block_000.pt"
    rec = torch.load(saved, weights_only=True)
    edited = {**rec, "B": {**rec["B"], "mlp.up_proj": rec["B"]["mlp.up_proj"] + 1e-3}}  # loadable, stale checksum
    torch.save(edited, saved)
    with pytest.raises(UserError, match="block 0 fails its checksum"):
        run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "b"), epts.EPTSConfig(epochs=2))
    torch.save(rec, saved)
    capsys.readouterr()
    resumed = run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "b"), epts.EPTSConfig(epochs=2))
    lines = capsys.readouterr().err.splitlines()  # the replayed blocks are announced, the trained ones counted
    assert lines[0] == f"epts: resuming {tmp_path / 'b' / 'partial'}: blocks 0..{done - 1} are done, replaying " \
                       "their outputs"
    assert [re.match(r"epts: block (\d)/3 done, [\d.]+s elapsed, ~[\d.]+s left, loss ", line)[1]
            for line in lines[1:]] == [str(b) for b in range(done + 1, 4)]
    for a, b in zip(full["blocks"], resumed["blocks"]):
        for key in ("A", "B", "act_norm"):
            assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
        assert a["use_adapter0"] == b["use_adapter0"]
    monkeypatch.setattr(epts, "train_block", None)  # a finished run with the same settings is reused, not redone
    again = run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "b"), epts.EPTSConfig(epochs=2))
    assert torch.equal(again["blocks"][2]["B"]["mlp.down_proj"], full["blocks"][2]["B"]["mlp.down_proj"])
    monkeypatch.setattr(epts, "train_block", real)
    with pytest.raises(UserError, match="other settings"):  # a different run refuses to mix with the partial one
        os.makedirs(tmp_path / "c" / "partial")
        (tmp_path / "c" / "partial" / "run.json").write_text(json.dumps({"epochs": 99}))
        run.run_epts(tiny_llama(num_hidden_layers=3), calib, str(tmp_path / "c"), epts.EPTSConfig(epochs=2))


def test_elastic_file_deploys_like_memory_and_refuses_other_checkpoints(tmp_path):
    """Deploying from elastic.pt equals deploying the in-memory result; another checkpoint is refused."""
    elastic = run.run_epts(tiny_llama(), calib_ids(), str(tmp_path), epts.EPTSConfig(epochs=2))
    from_file = run.load_elastic(str(tmp_path))
    a = epts.deploy(tiny_llama(), elastic, [0.35, 0.6])  # one sparsity per block
    b = epts.deploy(tiny_llama(), from_file, [0.35, 0.6])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = tiny_llama(seed=1)
    with pytest.raises(UserError, match="different checkpoint"):
        run.check_fingerprint(other, from_file)
    with pytest.raises(UserError, match="no elastic model"):
        run.load_elastic(str(tmp_path / "nowhere"))
    # only what is new: per layer G*r*(in+out) adapter values and `in` activation norms, no weights
    G, r = len(from_file["edges"]) - 1, from_file["rank"]
    stored = sum(t.numel() for blk in from_file["blocks"] for key in ("A", "B", "act_norm")
                 for t in blk[key].values())
    expected = sum(G * r * (lin.in_features + lin.out_features) + lin.in_features
                   for blk in tiny_llama().blocks for lin in blk.linears().values())
    assert stored == expected
    assert set(from_file["blocks"][0]) == {"A", "B", "act_norm", "use_adapter0", "losses", "sha256"}


# -----------------------------------------------------------------------------
# reliability: nothing lost, nothing silent (each case of the reliability section of the README)


@needs_transformers
def test_finished_run_with_other_settings_is_refused_and_one_run_per_folder(tiny, tmp_path, capsys):
    """A finished --out is reused with the same settings, refused (naming the setting) with others, and so is an
    unfinished one, before any other method runs; a second process working in the same --out is refused while the
    first holds it."""
    main(**dict(tiny, methods=["epts"], sparsities=[0.5]))
    before = open(os.path.join(tiny["out"], "elastic.pt"), "rb").read()
    capsys.readouterr()
    with pytest.raises(UserError, match=r"other settings \(epochs\)"):
        main(**dict(tiny, methods=["wanda", "epts"], sparsities=[0.5], epochs=2))
    assert "wanda" not in capsys.readouterr().out  # refused before Wanda ran, not after it
    assert open(os.path.join(tiny["out"], "elastic.pt"), "rb").read() == before
    other = tmp_path / "other-calib.txt"
    other.write_text(open(tiny["calib"]).read()[::-1])
    with pytest.raises(UserError, match=r"other settings \(calib_sha256\) \(calib_sha256: other calibration windows"):
        main(**dict(tiny, methods=["epts"], sparsities=[0.5], calib=str(other)))
    os.makedirs(tmp_path / "unfinished" / "partial")
    (tmp_path / "unfinished" / "partial" / "run.json").write_text(json.dumps({"epochs": 99}))
    with pytest.raises(UserError, match="unfinished EPTS run with other settings"):
        main(**dict(tiny, methods=["wanda", "epts"], sparsities=[0.5], out=str(tmp_path / "unfinished")))
    assert "wanda" not in capsys.readouterr().out
    settings = torch.load(os.path.join(tiny["out"], "elastic.pt"), weights_only=True)  # this run's own settings
    settings = {k: v for k, v in settings.items() if k not in ("format", "model_type", "blocks", "sha256")}
    (tmp_path / "unfinished" / "partial" / "run.json").write_text(json.dumps({**settings, "calib_sha256": "0"}))
    with pytest.raises(UserError, match=r"unfinished EPTS run with other settings \(calib_sha256\) \(calib_sha256: "):
        main(**dict(tiny, methods=["epts"], sparsities=[0.5], out=str(tmp_path / "unfinished")))
    (tmp_path / "unfinished" / "partial" / "run.json").write_text(json.dumps({**settings, "retired_field": 1}))
    with pytest.raises(UserError, match=r"other settings \(fields this version does not write\)"):
        main(**dict(tiny, methods=["epts"], sparsities=[0.5], out=str(tmp_path / "unfinished")))
    with run.exclusive(tiny["out"]):  # as if another process were training there
        with pytest.raises(UserError, match="another EPTS run .* is working in"):
            main(**dict(tiny, methods=["epts"], sparsities=[0.5]))


@needs_transformers
def test_damaged_files_are_errors_not_results(tiny, tmp_path):
    """NaN bytes in a safetensors file, a changed (adapter, activation norm, flag) or truncated elastic.pt, and
    truncated resume files each stop with a message naming the file."""
    main(**dict(tiny, methods=["epts"], sparsities=[0.5]))
    final = os.path.join(tiny["out"], "elastic.pt")
    written = torch.load(final, weights_only=True)
    # one adapter value, one activation norm, or the low-group flag changed, the checksums not updated
    for edit in (lambda rec: rec["B"]["mlp.up_proj"][0, 0, 0].add_(1.0),
                 lambda rec: rec["act_norm"]["mlp.up_proj"][0].add_(1.0),
                 lambda rec: rec.__setitem__("use_adapter0", not rec["use_adapter0"])):
        elastic = copy.deepcopy(written)
        edit(elastic["blocks"][1])
        torch.save(elastic, final)
        with pytest.raises(UserError, match="fails its checksum"):
            main(**dict(tiny, methods=["epts"], sparsities=[0.6], elastic=tiny["out"]))
    raw = open(final, "rb").read()
    open(final, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="elastic.pt"):
        run.load_elastic(final)

    partial = tmp_path / "p" / "partial"  # an interrupted run whose files were cut short
    partial.mkdir(parents=True)
    (partial / "run.json").write_text('{"edges": [0, 0.4')
    with pytest.raises(UserError, match="run.json' is damaged"):
        run.earlier_run(str(tmp_path / "p"), {})
    (partial / "run.json").write_text("{}")
    (partial / "block_000.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match=r"block_000.pt' is damaged.*delete it and run the same command again"):
        run.resume_records(str(partial), {})

    weights = tmp_path / "ckpt" / "model.safetensors"
    header, start = M.read_safetensors_header(str(weights))
    begin = start + header["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0]
    with open(weights, "r+b") as f:
        f.seek(begin + 64)
        f.write(b"\xff" * 64)  # float32 NaNs
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' holds NaN"):
        M.load_model(str(tmp_path / "ckpt"))


@needs_transformers
def test_the_out_disk_check_needs_exactly_the_bytes_of_the_elastic_files_tensors(tiny, monkeypatch):
    """--out's disk must hold the elastic file's activation norms and adapters (float32), counted from the model's
    shapes before any work: a byte less is refused, exactly that is accepted."""
    main(**dict(tiny, methods=["epts"]))
    elastic = run.load_elastic(tiny["out"])
    held = sum(t.numel() * t.element_size() for rec in elastic["blocks"] for key in ("act_norm", "A", "B")
               for t in rec[key].values())
    with torch.device("meta"):
        sizes = M.build_model(M.read_config(tiny["ckpt"]))
    config, r = epts.EPTSConfig(tuple(elastic["edges"]), rank=elastic["rank"]), cli.Request(out=tiny["out"])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=held - 1))
    with pytest.raises(UserError, match="--out .* needs about"):
        cli.check_space(r, sizes, tiny["out"], config)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=held))
    cli.check_space(r, sizes, tiny["out"], config)


def test_elastic_file_settings_and_block_order_are_checksummed(tmp_path):
    """An elastic.pt whose group edges, LoRA rank or fingerprint were edited, or whose block records were swapped,
    is refused; the file as written loads, and a file of the previous format (v2) still does."""
    run.run_epts(tiny_llama(), calib_ids(), str(tmp_path / "run"), epts.EPTSConfig(epochs=1))
    path = tmp_path / "run" / "elastic.pt"
    elastic = torch.load(path, weights_only=True)
    assert run.load_elastic(str(path))["sha256"] == elastic["sha256"]
    for edit in (lambda e: e["edges"].__setitem__(1, 0.41), lambda e: e.__setitem__("rank", 4),
                 lambda e: e.__setitem__("fingerprint", "0" * 32), lambda e: e["blocks"].reverse()):
        edited = copy.deepcopy(elastic)
        edit(edited)
        torch.save(edited, tmp_path / "edited.pt")
        with pytest.raises(UserError, match="settings or block order fail their checksum"):
            run.load_elastic(str(tmp_path / "edited.pt"))
    torch.save({**{k: v for k, v in elastic.items() if k != "sha256"}, "format": "epts-elastic-v2"}, path)
    assert run.load_elastic(str(path))["format"] == "epts-elastic-v2"
