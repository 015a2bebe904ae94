"""
make bench: two pruning-sensitive fixture models built from ../shared/data, every method at 0.3-0.7
(and 2:4 for the baselines), timings, bench/results.json, bench/results.png and the table in bench/README.md.

    python bench/bench.py [--render]
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import default_model  # noqa: E402
import cli  # noqa: E402
import run  # noqa: E402
import data  # noqa: E402
import epts  # noqa: E402
import model as M  # noqa: E402
import prune  # noqa: E402
from eval import perplexity  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
CACHE = os.path.join(HERE, "cache")
SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7]
FIXTURES = {
    "llama": dict(model_type="llama", vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2),
    "opt": dict(model_type="opt", vocab_size=2048, hidden_size=128, ffn_dim=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=128,
                do_layer_norm_before=True, bos_token_id=2, eos_token_id=2, pad_token_id=1),
}
# ~3.3M tokens, no weight decay. A d=256 model trained on 2.5M tokens of this text barely noticed pruning
# (OPT: magnitude 70 % at 1.04x dense perplexity); narrower blocks trained longer behave like real LLMs.
TRAIN = dict(steps=800, batch_size=16, seqlen=256, lr=5e-3, seed=0)
RUN = dict(nsamples=32, seqlen=256, epochs=4, seed=0)
EVAL_LINES = 700  # the first 700 lines of WikiText-2 test (~50k tokens), to keep a CPU run short
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# fixtures


def training_text():
    parts = [os.path.join(SHARED, "wikitext-2", "valid.txt"), os.path.join(SHARED, "tinyshakespeare", "input.txt")]
    return "\n".join(open(p, encoding="utf-8").read() for p in parts)


def train_bpe(text, folder, vocab_size):
    """A byte-level BPE (OPT/GPT-2 style vocab.json + merges.txt) trained with `tokenizers`."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n"), trainer)
    tok.model.save(folder)


def build_fixture(kind):
    """Train (once, cached) the fixture model of `kind` and print how much pruning hurts it."""
    folder = os.path.join(CACHE, kind)
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    os.makedirs(CACHE, exist_ok=True)
    tok_dir = os.path.join(CACHE, f"{kind}-tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    text = training_text()
    cfg = FIXTURES[kind]
    if kind == "llama":
        with open(os.path.join(tok_dir, "train.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        default_model.train_sentencepiece(os.path.join(tok_dir, "train.txt"), os.path.join(tok_dir, "tokenizer"),
                                    cfg["vocab_size"])
    else:
        train_bpe(text, tok_dir, cfg["vocab_size"])
    tok = data.load_tokenizer(tok_dir, cfg["bos_token_id"])
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    log(f"training the {kind} fixture on {len(ids):,} tokens ({TRAIN['steps']} steps)")
    t0 = time.time()
    default_model.train_checkpoint(cfg, ids, folder, tok_dir, TRAIN, log=lambda m: log(f"{kind}: {m}"))
    log(f"{kind} fixture trained in {time.time() - t0:.0f}s")
    sensitivity_check(kind, folder)
    return folder


def sensitivity_check(kind, folder):
    """Print how much magnitude pruning hurts the fixture: a robust model would make every method look alike."""
    model, tok = cli.load(folder)
    ids = data.eval_tokens(eval_file(), tok, RUN["seqlen"])
    dense = perplexity(model, ids, RUN["seqlen"], 8)
    cells = []
    for s in (0.5, 0.7):
        pruned = prune.prune_model(M.load_model(folder), "magnitude", s)
        ppl = perplexity(pruned, ids, RUN["seqlen"], 8)
        cells.append(f"magnitude {s}: {ppl:.2f} ({ppl / dense:.2f}x)")
    log(f"{kind} fixture check: dense {dense:.2f}; " + "; ".join(cells))


def eval_file():
    """The first EVAL_LINES lines of WikiText-2 test, cached as a file in WikiText format."""
    path = os.path.join(CACHE, "wiki.test.head.tokens")
    if not os.path.isfile(path):
        lines = open(os.path.join(SHARED, "wikitext-2", "test.txt"), encoding="utf-8").read().splitlines(True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines[:EVAL_LINES])
    return path


# -----------------------------------------------------------------------------
# measurements


def single_sparsity_runs(ckpt, calib, s_list, out_root):
    """The 'one session per sparsity' way: our EPTS code with one group pinned at the target sparsity."""
    model, tok = cli.load(ckpt)
    calib_ids = data.calibration(calib, tok, RUN["nsamples"], RUN["seqlen"], RUN["seed"])
    results = {}
    for s in s_list:
        t0 = time.time()
        config = epts.EPTSConfig(edges=(s - 1e-6, s), epochs=RUN["epochs"], seed=RUN["seed"])
        elastic = run.run_epts(model, calib_ids, os.path.join(out_root, f"single-{s}"), config)
        results[s] = (elastic, time.time() - t0)
    return results


def matmul_gflops(n=1024, repeat=20):
    A, B = torch.randn(n, n), torch.randn(n, n)
    A @ B
    t0 = time.time()
    for _ in range(repeat):
        A @ B
    return 2 * n ** 3 * repeat / (time.time() - t0) / 1e9


def reconstruction_gflops(ckpt, calib):
    """Achieved GFLOP/s of one block's EPTS training loop, counting the block's matmuls (fwd + 2x for bwd)."""
    model, tok = cli.load(ckpt)
    calib_ids = data.calibration(calib, tok, 8, RUN["seqlen"], 0)
    block = model.blocks[0]
    X = model.embed(calib_ids)
    stats = prune.new_stats(block, False, "cpu")
    Y = prune.run_block(block, X, "cpu", 8, stats)
    config = epts.EPTSConfig(epochs=1)
    G = len(config.edges) - 1
    layers = epts.elastic_layers(block, {n: s.act_norm for n, s in stats.items()}, G, 8)
    t0 = time.time()
    epts.train_block(block, layers, (X, Y), config, torch.Generator().manual_seed(0))
    seconds = time.time() - t0
    T, C = RUN["seqlen"], model.cfg.hidden_size
    weights = sum(lin.in_features * lin.out_features for lin in block.linears().values())
    forward = sum(2 * T * weights  # the Linear layers on T tokens
                  + 4 * T * T * C  # attention scores and weighted values
                  + 2 * weights * 8 * (g + 1)  # merging the cumulative adapters B A (rank 8) into W
                  for g in range(G))
    flops = 3 * forward * len(calib_ids)  # backward costs about twice the forward
    return flops / seconds / 1e9


def run_fixture(kind, ckpt, calib, evals):
    out = os.path.join(CACHE, f"run-{kind}")
    shutil.rmtree(out, ignore_errors=True)  # timings are measured: never reuse an earlier run's elastic model
    request = cli.Request(ckpt=ckpt, sparsities=SPARSITIES + [(2, 4)],
                           methods=["dense", "magnitude", "wanda", "sparsegpt", "epts"], calib=calib, evals=[evals],
                           nsamples=RUN["nsamples"], seqlen=RUN["seqlen"], out=out, eval_batch_size=8)
    report = cli.main(request, epts.EPTSConfig(epochs=RUN["epochs"], seed=RUN["seed"]))
    singles = single_sparsity_runs(ckpt, calib, SPARSITIES, out)
    model, tok = cli.load(ckpt)
    ids = data.eval_tokens(evals, tok, RUN["seqlen"])
    for s, (elastic, seconds) in singles.items():
        m = epts.deploy(M.load_model(ckpt), elastic, s)
        ppl = perplexity(m, ids, RUN["seqlen"], 8)
        report["results"].append({"method": "lora-single", "sparsity": s, "eval": os.path.basename(evals),
                                  "ppl": ppl, "seconds": round(seconds, 3)})
    # ablation: the low-group check keeps adapter 0 in a block when it lowers that block's error on the
    # calibration windows it was trained on; here group 0 deploys bare in every block instead
    elastic = run.load_elastic(out)
    bare = {**elastic, "blocks": [{**rec, "use_adapter0": False} for rec in elastic["blocks"]]}
    for s in [s for s in SPARSITIES if s <= elastic["edges"][1]]:
        ppl = perplexity(epts.deploy(M.load_model(ckpt), bare, s), ids, RUN["seqlen"], 8)
        report["results"].append({"method": "epts, adapter 0 off", "sparsity": s, "eval": os.path.basename(evals),
                                  "ppl": ppl, "seconds": 0.0})
    rows = report["results"]
    secs = lambda m: sum(r["seconds"] for r in rows if r["method"] == m and r["sparsity"] in SPARSITIES)  # noqa
    train = report["epts"]["train_seconds"]
    report["timing"] = {"epts_one_run_s": train, "wanda_sum_s": secs("wanda"), "sparsegpt_sum_s": secs("sparsegpt"),
                        "lora_single_sum_s": secs("lora-single"),
                        "epts_over_lora_single": train / secs("lora-single"),
                        "epts_over_wanda": train / secs("wanda"), "epts_over_sparsegpt": train / secs("sparsegpt")}
    return report


# -----------------------------------------------------------------------------
# outputs: JSON, plot, the table in bench/README.md


def table(results):
    """Markdown table: one row per (model, method), one column per sparsity, perplexity in the cells."""
    cols = [str(s) for s in SPARSITIES] + ["2:4"]
    lines = []
    for kind, rep in results["models"].items():
        rows = rep["results"]
        dense = next(r["ppl"] for r in rows if r["method"] == "dense")
        lines.append(f"| {kind} | dense | " + " | ".join(f"{dense:.2f}" if c == "0.3" else "" for c in cols) + " |")
        for method in ("magnitude", "wanda", "sparsegpt", "lora-single", "epts", "epts, adapter 0 off"):
            cells = {str(r["sparsity"]): f"{r['ppl']:.2f}" for r in rows if r["method"] == method}
            if cells:
                lines.append(f"| {kind} | {method} | " + " | ".join(cells.get(c, "—") for c in cols) + " |")
    head = "| model | method | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2)
    return head + "\n" + "\n".join(lines)


def timing_table(results):
    lines = ["| model | EPTS one run (s) | Σ Wanda (s) | Σ SparseGPT (s) | Σ single-sparsity LoRA (s) | "
             "EPTS / Σ LoRA |", "|---|---|---|---|---|---|"]
    for kind, rep in results["models"].items():
        t = rep["timing"]
        lines.append(f"| {kind} | {t['epts_one_run_s']:.1f} | {t['wanda_sum_s']:.1f} | {t['sparsegpt_sum_s']:.1f} "
                     f"| {t['lora_single_sum_s']:.1f} | {t['epts_over_lora_single']:.2f} |")
    return "\n".join(lines)


def readme_section(results):
    m = results["machine"]
    return "\n".join([
        README_START,
        f"Measured {results['date']} on {m['cpu']} ({m['threads']} threads), torch {m['torch']}, by "
        f"`{results['command']}`. Perplexity on the first {EVAL_LINES} lines of "
        f"WikiText-2 test (`../shared/data`, v1 tokenized text), seqlen {RUN['seqlen']}, {RUN['nsamples']} "
        f"calibration windows of WikiText-2 valid, seed {RUN['seed']}, EPTS {RUN['epochs']} epochs.",
        "",
        table(results),
        "",
        timing_table(results),
        "",
        f"Reconstruction loop: {results['gflops']['reconstruction']:.1f} GFLOP/s against "
        f"{results['gflops']['matmul']:.1f} GFLOP/s for a dense 1024² fp32 matmul on the same machine.",
        "",
        "![perplexity against sparsity](results.png)",
        README_END])


def replace_section(path, section):
    """Replace the lines from the section's first line (a start marker) to its last (the end marker) in `path`."""
    first, last = section.split("\n")[0], section.split("\n")[-1]
    text = open(path, encoding="utf-8").read()
    start, end = text.index(first), text.index(last) + len(last)
    with M.atomic_write(path) as f:
        f.write(text[:start] + section + text[end:])


def fixture_and_data(kind):
    """The fixture model of `kind`, its calibration windows (RUN's), and a function giving a model's perplexity
    on the evaluation text."""
    model, tok = cli.load(build_fixture(kind))
    calib = data.calibration(os.path.join(SHARED, "wikitext-2", "valid.txt"), tok, RUN["nsamples"], RUN["seqlen"],
                             RUN["seed"])
    ids = data.eval_tokens(eval_file(), tok, RUN["seqlen"])
    return model, calib, lambda m: perplexity(m, ids, RUN["seqlen"], 8)


def random_block(name, windows, seqlen):
    """One decoder block of configs/NAME.json with random weights (float32), and `windows` x `seqlen` random
    calibration ids: a real model's shapes for timing, where perplexity would mean nothing."""
    with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
        cfg = M.config_from_dict(dict(json.load(f), num_hidden_layers=1))
    torch.manual_seed(0)
    model = M.build_model(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.02)
    return model, torch.randint(0, cfg.vocab_size, (windows, seqlen))


def prune_seconds(model, method, sparsity, calib):
    """Seconds of prune_model(method) on a copy of `model`, its calibration pass over `calib` included."""
    pruned = prune.prunable_copy(model)
    t0 = time.time()
    prune.prune_model(pruned, method, sparsity, calib)
    return time.time() - t0


def block_seconds(methods, name="llama-2-7b", windows=4, seqlen=128):
    """Seconds of prune_model at 0.5 for each of `methods` on one block of configs/NAME.json (random_block), each
    with its calibration pass of `windows` x `seqlen` tokens."""
    model, calib = random_block(name, windows, seqlen)
    times = {"block": f"{name}, {windows} x {seqlen} tokens"}
    for method in methods:
        times[method] = prune_seconds(model, method, 0.5, calib)
        log(f"{name} block: {method} {times[method]:.1f}s")
    return times


def markers(name):
    """The lines between which a benchmark's tables stand in docs/methods.md."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def methods_bench(name, fixture_rows, real_shape, tables, description):
    """The frame of nm_bench.py and sslc_bench.py: fixture_rows(kind) for every fixture, real_shape() unless
    --skip-7b, then bench/NAME_results.json and the tables in docs/methods.md between markers(NAME)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--skip-7b", action="store_true", help="only the fixtures, not the LLaMA-2-7B shape")
    skip = p.parse_args().skip_7b
    if not os.path.isdir(SHARED):
        print(f"{name}_bench needs ../shared/data, absent at {SHARED}; nothing to do.")
        return
    results = {"date": str(date.today()), "command": f"python bench/{name}_bench.py", "machine": machine(),
               "fixtures": {kind: fixture_rows(kind) for kind in FIXTURES}}
    if not skip:
        results["real_shape"] = real_shape()
    M.save_json(results, os.path.join(HERE, f"{name}_results.json"))
    start, end = markers(name)
    replace_section(os.path.join(ROOT, "docs", "methods.md"), f"{start}\n{tables(results)}\n{end}")
    print(tables(results))


def write_readme(results, path=os.path.join(HERE, "README.md")):
    replace_section(path, readme_section(results))


def plot(results, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results["models"]), figsize=(6 * len(results["models"]), 4.5), squeeze=False)
    for ax, (kind, rep) in zip(axes[0], results["models"].items()):
        rows = rep["results"]
        dense = next(r["ppl"] for r in rows if r["method"] == "dense")
        for method in ("magnitude", "wanda", "sparsegpt", "lora-single", "epts"):
            pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == method
                         and not isinstance(r["sparsity"], str))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(dense, color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("WikiText-2 perplexity (log scale)")
        ax.set_title(f"{kind} fixture")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main():
    if not os.path.isdir(SHARED):
        print(f"make bench needs ../shared/data (WikiText-2, tinyshakespeare), which is absent at {SHARED}; "
              "nothing to do.")
        return
    results = {"date": str(date.today()), "command": "make bench", "machine": machine(), "models": {}}
    calib = os.path.join(SHARED, "wikitext-2", "valid.txt")
    for kind in FIXTURES:
        ckpt = build_fixture(kind)
        results["models"][kind] = run_fixture(kind, ckpt, calib, eval_file())
    results["gflops"] = {"reconstruction": reconstruction_gflops(build_fixture("llama"), calib),
                         "matmul": matmul_gflops()}
    M.save_json(results, os.path.join(HERE, "results.json"))
    plot(results, os.path.join(HERE, "results.png"))
    write_readme(results)
    print(table(results))
    print(timing_table(results))


def render(path=os.path.join(HERE, "results.json")):
    """Redraw the plot and the bench/README.md section from an existing results.json."""
    with open(path) as f:
        results = json.load(f)
    plot(results, os.path.join(HERE, "results.png"))
    write_readme(results)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--render", action="store_true", help="only redraw plot and bench/README.md table from results.json")
    if p.parse_args().render:
        render()
    else:
        main()
