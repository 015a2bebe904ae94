"""
The EPTS run on disk: the elastic file (format, checksums), the run folder with its lock, and resume.
run_epts(model, calib_ids, "runs/x", config) trains (epts.train_blocks), each finished block saved in runs/x/partial,
where a rerun after an interruption resumes; load_elastic("runs/x") reads the result, every checksum verified.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict

import torch

import model as M
import prune
from epts import EPTSConfig, train_blocks
from model import UserError
from parallel import SOLO

FORMAT = "epts-elastic-v3"  # v3: a checksum of the whole file (settings, block order), not only of each block
OLD_FORMATS = ("epts-elastic-v2",)  # still read; their settings carry no checksum


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


def checked(rec):
    """The block record with its checksum."""
    return {**rec, "sha256": record_checksum(rec)}


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


def check_fingerprint(model, elastic):
    """The elastic model was trained on this checkpoint (epts.deploy trusts that it was)."""
    if elastic["fingerprint"] != M.fingerprint(model):
        raise UserError("the elastic model was trained on a different checkpoint (fingerprints differ); deploy it "
                        "on the --ckpt it was trained with, or train a new one for this checkpoint.")


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


def saver(partial, n_blocks, start):
    """train_blocks' per-block callback: the finished block saved in `partial`, progress on stderr."""
    progress = prune.Progress(n_blocks, "epts", start=start)

    def on_block(i, rec):
        save(checked(rec), os.path.join(partial, f"block_{i:03d}.pt"))
        progress.step(f", loss {rec['losses'][0]:.3g} -> {rec['losses'][-1]:.3g}, "
                      f"adapter 0 {'on' if rec['use_adapter0'] else 'off'}")
    return on_block


def run_epts(model, calib_ids, out_dir, config=EPTSConfig(), device="cpu", procs=SOLO):
    """Train the elastic model block by block, each finished block saved in out_dir, resuming from them. A finished
    run there with the same settings is reused, one with others refused, never overwritten; one run at a time
    works there. With several processes, process 0 alone reads and writes out_dir and tells the others."""
    if procs.index > 0:
        if procs.share(None) == "finished":
            return None
        return train_blocks(model, calib_ids, config, device, (procs.share(None), None), procs)
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
        done = procs.share(resume_records(partial, settings))
        if done:
            print(f"epts: resuming {partial}: blocks 0..{len(done) - 1} are done, replaying their outputs",
                  file=sys.stderr)
        try:
            records = train_blocks(model, calib_ids, config, device,
                                   (done, saver(partial, len(model.blocks), len(done))), procs)
        except KeyboardInterrupt:
            print(f"interrupted: the finished EPTS blocks are saved in {partial}; run the same command "
                  "again to resume from the first unfinished block", file=sys.stderr)
            raise
        elastic = {"format": FORMAT, "model_type": model.cfg.raw.get("model_type"), **settings,
                   "blocks": [checked(rec) for rec in records]}
        elastic["sha256"] = file_checksum(elastic)
        save(elastic, final)
    shutil.rmtree(partial, ignore_errors=True)
    return elastic
