"""
The command line: a request checked into a plan before any work, then one row per method and sparsity.

    python epts.py --ckpt PATH --sparsities 0.3,0.5,0.7 [--methods dense,wanda,sparsegpt,epts] [--json F]

epts.py's `__main__` calls command() here. Everything a user can get wrong is checked in plan() (and
check_layers once the model is loaded), so that a bad flag never costs the time of the methods before it; the
algorithm files raise plain ValueErrors, which this module names with their flags.
"""

import argparse
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

import data
import default_model
import model as M
import prune
from epts import EPTSConfig, deploy, extend_edges, group_of
from eval import TASKS, TaskError, perplexity, read_task, zero_shot
from model import UserError
from parallel import SOLO, Procs, exit_process
from run import (check_fingerprint, earlier_run, exclusive, file_checksum, load_elastic, run_epts, run_settings,
                 windows_sha256)

USER_ERRORS = (UserError, data.DataError, TaskError)  # bad input: the CLI prints the message, no traceback

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
    """The requested sparsities a method runs at: EPTS deploys fractions, EGGS prunes N:M patterns, the rest both."""
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
    """--export, --json and --out can be written, overwriting no input and nothing not ours; --export names one
    pruned model. `writer` (process 0 under torchrun): what --out holds, and that no other run works there."""
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
    """--out holds nothing of the user's where a run writes (`lock`: absent or a process id; `partial/`: absent or
    a run's), so that neither the lock nor the clean-up touches the user's files; and no other run works there."""
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
    """The disks of --export and --out have room for the exported model and the elastic file (G LoRA pairs of rank
    r and an activation norm per layer, float32). model: on the meta device, in the run's dtype."""
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
    """Calibration streams (N, T, C) a row holds at once: pruning's, or OWL's ratio pass's two where more (EPTS's
    four are counted apart)."""
    if method in ("dense", "epts"):
        return 0
    return max(prune.calibration_streams(method), 2 * (allocation == "owl"))


def check_memory(r, rows, model, dtype, windows, train_epts):
    """The least memory the run needs fits where it will be: a run too big is refused now, not killed hours later.
    The model (on the GPU, or in CPU memory), a copy of its blocks while a row but the last is pruned, and on a CPU
    run the calibration streams of windows = (N, T) tokens (EPTS's 4, a pruned row's 2, 3 with SI); under torchrun
    each local process holds a model and EPTS's streams. model: on the meta device, in `dtype`."""
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


def flagged(flag, check, *args):
    """check(*args), its ValueError (in the algorithm's words) turned into a user error that names the flag."""
    try:
        return check(*args)
    except ValueError as e:
        raise UserError(f"{flag}: {e}.") from None


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
    if r.export and any(m.endswith("+si") for m in r.methods) and r.pruning.si_init == "eq5":
        M.check_bias_export(cfg)  # Eq. 5's shift gives every layer a bias
    deployed = allocation if isinstance(allocation, list) else [s for m, s in rows if m == "epts"]
    elastic = None
    if "epts" in r.methods and r.elastic:
        elastic = load_elastic(r.elastic)
        for s in deployed:  # every requested sparsity inside the trained range, or a clear error
            flagged(f"--elastic {r.elastic!r} at --sparsities {s}", group_of, elastic["edges"], s)
    if train_epts:
        config = replace(config, edges=tuple(flagged("--groups", extend_edges, config.edges, max(deployed))))
        if config.mixer not in ("msfm", "dense"):  # the one sparsity fed forward lies inside the trained range
            flagged("--mixer", group_of, config.edges, config.mixer)
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
    """Before any method runs: every N:M pattern fits every layer (prune.check_nm), SSLC leaves every layer a rank
    >= 1 (check_sslc_rank), and a model with low-rank parts (an SSLC export) is evaluated, never pruned again."""
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
    """What every row depends on but its method and sparsity (flags, EPTS settings or --elastic's model, weights,
    input files, calibration windows, this program's code): an earlier --json's rows are reused only if all agree."""
    r = p.request
    modules = ("cli", "data", "default_model", "epts", "eval", "model", "parallel", "prune", "run")
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
    """One row per (method, sparsity, evaluation) on stdout and in --json (rewritten after every row), --export
    from the one pruned model; the rows an interrupted run with the same settings wrote are reused."""

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
    """run_epts for the plan; its time (None: an earlier run's) and the elastic file's size reported (process 0)."""
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
    """Run the requested methods at every sparsity, print the perplexity table, write --json/--out/--export; every
    check runs first (plan), so a bad flag never costs the time of the methods before it."""
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
    if elastic is not None:
        check_fingerprint(model, elastic)
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
        pruned, t0, deployed = model if in_place else prune.prunable_copy(model), time.time(), allocate(method, s, elastic)
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


def as_flag(e):
    """A settings class's ValueError, which opens on the setting's name, in the words of its flag."""
    name, _, rest = str(e).partition(" ")
    return f"--{'groups' if name == 'edges' else name.replace('_', '-')} {rest}"


def parse_sparsity(text):
    """'0.5' -> 0.5, '2:4' -> (2, 4); ValueError with the reason otherwise."""
    text = text.strip()
    if ":" in text:
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"N:M sparsity {text!r} must be two integers such as 2:4") from None
        if not 0 < n < m:
            raise ValueError(f"N:M sparsity {text!r} must keep n of m weights with 0 < n < m, e.g. 2:4 or 4:8")
        return (n, m)
    try:
        s = float(text)
    except ValueError:
        raise ValueError(f"sparsity {text!r} is neither a fraction such as 0.5 nor an N:M pattern such as 2:4") \
            from None
    if not (0 <= s < 1) or math.isnan(s):
        raise ValueError(f"sparsity {s} is outside [0, 1); use a fraction of weights to remove, e.g. 0.5")
    return s


PRUNING_FLAGS = {
    "ria_alpha": "RIA and EGGS: the exponent a on the input norm ||X_j||",
    "eggs_diagonals": "EGGS: cyclic diagonals kept in every M x M tile (every input keeps that many per tile)",
    "rank_ratio": "SSLC: the share of the kept parameters given to the low-rank part, in [0, 1)",
    "alternations": "SSLC: at most this many (low-rank, sparse) steps per layer (fewer once the error stops falling)",
    "sslc_momentum": "SSLC: the low-rank step fits S moved on by this share of its last change (0: as OATS)",
    "si_epochs": "Sparsity Induction: epochs per block, the masks refreshed at each",
    "si_lr": "SI: Adam's learning rate for scales and shifts",
    "si_lambda": "SI: weight of the norm term",
    "si_alpha": "SI: the norm term's exp(-alpha sum ||W~||_p)",
    "si_p": "SI: the norm term's entrywise p",
    "si_clamp": "SI: Eq. 5's scales clamped into [1/c, c] times their median; 1: the shift alone",
    "si_init": "SI: act (ours: magnitude's scales from the activation norms, where they help) or eq5 (the paper's)"}


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
    for name, what in PRUNING_FLAGS.items():  # the baselines' settings, defaults PruneConfig's
        default = getattr(prune.PruneConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=what)
    a = p.parse_args(argv)
    try:
        sparsities = [parse_sparsity(s) for s in a.sparsities.split(",") if s.strip()]
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
    except ValueError:
        p.error(f"--mixer {a.mixer!r} must be msfm, dense, or one sparsity in [0, 1) such as 0.5.")
    try:
        config = EPTSConfig(edges, epochs, a.lr, a.rank, a.batch_size, a.seed, nested=not a.no_nesting, mixer=mixer,
                            check_low_group=not a.no_low_group_check)
    except ValueError as e:
        p.error(as_flag(e))
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if any(t not in TASKS for t in tasks):
        p.error(f"--tasks: unknown task {', '.join(t for t in tasks if t not in TASKS)}; choose from "
                f"{', '.join(sorted(TASKS))}")
    if a.si_epochs < 1:  # the library's 0 keeps the transform as initialised: not the method the flag names
        p.error(f"--si-epochs {a.si_epochs} must be an integer >= 1")
    try:
        pruning = prune.PruneConfig(**{name: getattr(a, name) for name in PRUNING_FLAGS})
    except ValueError as e:
        p.error(as_flag(e))
    given = {k: v for k, v in vars(a).items() if k in Request.__dataclass_fields__}
    return Request(**dict(given, sparsities=sparsities, methods=methods, evals=a.eval, tasks=tasks,
                          pruning=pruning)), config


def interrupt(signum, frame):
    """SIGTERM (timeout, kill, Slurm) ends the run as Ctrl-C does: temporary files go, finished EPTS blocks stay."""
    raise KeyboardInterrupt


def command(argv):
    """`python epts.py ARGS`: exit status 0; 2 on bad input (one `error:` line, no traceback); 130 interrupted."""
    signal.signal(signal.SIGTERM, interrupt)
    request, config = parse_args(argv)
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
