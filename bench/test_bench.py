"""Tests of the benchmarks' own code: the README's memory formula against autograd, and the results table.
Run by `make test` beside the test_*.py files."""

import json
import os
import subprocess
import sys

import pytest
import torch

import epts

import model as M
import prune
from conftest import calib_ids, tiny_llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import memory_check  # noqa: E402
import nm_bench  # noqa: E402
import outliers  # noqa: E402
import si_bench  # noqa: E402
import smollm2  # noqa: E402
import sslc_bench  # noqa: E402


def test_memory_formula_counts_what_autograd_saves():
    """The README formula's 'saved for backward' + 'activations' terms against the bytes autograd really keeps
    for one group's forward through a LLaMA block (fp32, C = 256, F = 688, T = 128)."""
    C, F, heads, kv_heads, T = 256, 688, 8, 2, 128
    block = tiny_llama(hidden_size=C, intermediate_size=F, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       num_hidden_layers=1).blocks[0]
    layers = epts.elastic_layers(block, {n: torch.rand(lin.in_features) + 0.1 for n, lin in block.linears().items()},
                                 n_groups=7, rank=8)
    storages = {}  # data_ptr -> bytes: a tensor saved twice (or two views of one) counts once

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        epts.block_forward(block, layers, torch.randn(1, T, C), g=6, s=0.7)
    terms = memory_check.epts_block_bytes(dict(C=C, F=F, heads=heads, kv_heads=kv_heads, N=1, T=T, G=7, r=8,
                                                 elt=4))["training"]
    formula = terms["saved for backward: bool mask + merged weight"] + terms["activations of one batch"]
    assert 0.8 * formula < sum(storages.values()) < 1.1 * formula


def test_bench_table_json_and_readme_section(tmp_path):
    """The benchmark turns results into a table with every method and sparsity, and rewrites only its section."""
    rows = [{"method": "dense", "sparsity": 0.0, "ppl": 10.0, "seconds": 0}]
    for m in ("magnitude", "wanda", "sparsegpt", "lora-single", "epts"):
        rows += [{"method": m, "sparsity": s, "ppl": 11.0 + s, "seconds": 1.0} for s in bench.SPARSITIES]
    rows += [{"method": "wanda", "sparsity": "2:4", "ppl": 13.5, "seconds": 1.0}]
    rows += [{"method": "epts, adapter 0 off", "sparsity": 0.3, "ppl": 11.2, "seconds": 0.0}]
    timing = {"epts_one_run_s": 7.0, "wanda_sum_s": 5.0, "sparsegpt_sum_s": 5.0, "lora_single_sum_s": 5.0,
              "epts_over_lora_single": 1.4, "epts_over_wanda": 1.4, "epts_over_sparsegpt": 1.4}
    results = {"date": "2026-11-22", "command": "make bench", "machine": {"cpu": "x", "threads": 2, "torch": "t"},
               "models": {"llama": {"results": rows, "timing": timing}},
               "gflops": {"reconstruction": 1.0, "matmul": 2.0}}
    table = bench.table(results)
    assert "| llama | epts | 11.30 | 11.40 | 11.50 | 11.60 | 11.70 | — |" in table
    assert "| llama | wanda | 11.30 | 11.40 | 11.50 | 11.60 | 11.70 | 13.50 |" in table
    assert "| llama | epts, adapter 0 off | 11.20 | — | — | — | — | — |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench.README_START}\nold\n{bench.README_END}\nafter\n")
    bench.write_readme(results, str(readme))
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| llama | 7.0 | 5.0 | 5.0 | 5.0 | 1.40 |" in text
    pytest.importorskip("matplotlib")
    bench.plot(results, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_bench_runs_its_measurements_on_the_cpu(tmp_path):
    """bench/gpu.py's whole path (random checkpoint, one EPTS run, a block's steps, the matmul bound) on a tiny
    config on the CPU: every figure present and positive, the extrapolation consistent with its parts."""
    import gpu
    cfg = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    results = gpu.main(["--configs", str(tmp_path / "tiny.json"), "--device", "cpu", "--dtype", "float32",
                        "--seqlen", "16", "--nsamples", "2", "--profile", "2", "--out", str(tmp_path / "r.json")])
    row = results["rows"][0]
    assert "MaskedMerge" in row["profile"] and "aten::mm" in row["profile"]  # the merge and the products
    assert row["profile_syncs"] is None  # no GPU to wait for
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == [row]
    assert row["step_ms"] > 0 and row["bound_ms"] > 0 and row["ratio"] == pytest.approx(row["bound_ms"] / row["step_ms"])
    assert row["full_run_min"] * 60 >= 32 * 10 * 128 * row["step_ms"] / 1e3  # at least the training steps
    assert row["peak_gib"] is None and row["peak_full_model_gib"] is None  # the CPU has no peak to report
    # on a GPU: the measured peak of 2 blocks plus the weights of the real model's other 30, unless offloaded
    assert gpu.full_model_peak(3.0, 32, 2, 2**29, offload=False) == 18.0
    assert gpu.full_model_peak(3.0, 32, 2, 2**29, offload=True) == 3.0


def test_speed_bench_says_what_it_needs_without_a_gpu():
    """bench/speed.py measures 2:4 kernels on CUDA only; without a GPU it says so and exits cleanly."""
    import speed
    W = torch.randn(8, 16)
    kept = (speed.two_four(W) != 0).view(8, 4, 4).sum(-1)
    assert (kept == 2).all()
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "speed.py")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "needs a CUDA GPU" in r.stdout


def test_cloze_task_items_are_winogrande_items():
    """The synthetic task's items have WinoGrande's fields and the blank first; the answer's opening and the
    sentence's rest make one sentence of the text, the other option's do not."""
    import cloze_task
    import eval as eval_module
    sentences = [f"sentence {i} opens " + " ".join(["w"] * (10 + i % 5)) + f" ends {i}" for i in range(60)]
    text = "\n".join(" . ".join(sentences[j:j + 3]) for j in range(0, 60, 3))
    for item in cloze_task.items(text, n=10):
        pairs, gold = eval_module.TASKS["winogrande"][1](item)
        assert item["sentence"].startswith("_ ") and [c for c, _ in pairs] == [item["option1"], item["option2"]]
        rest = item["sentence"][2:].removesuffix(".")
        assert f"{pairs[gold][0]} {rest}" in sentences and f"{pairs[1 - gold][0]} {rest}" not in sentences


def test_lm_eval_check_builds_items_of_every_task():
    """The lm-eval cross-check's items pass eval.read_task's checks for every task, and each gold choice is the
    rest of its context's own sentence (the other choices are other sentences' rests)."""
    import random

    import eval as eval_module
    import lm_eval_check
    sentences = [f"sentence {i} opens " + " ".join(f"w{i}x{k}" for k in range(12)) + f" ends {i}." for i in range(600)]
    items = lm_eval_check.task_items(list(sentences), 20, random.Random(0))
    assert set(items) == set(eval_module.TASKS) and all(len(docs) == 20 for docs in items.values())
    assert all(eval_module.item_problem(task, doc) is None for task, docs in items.items() for doc in docs)
    for task, docs in items.items():
        for doc in docs:
            if task in ("arc_easy", "arc_challenge", "openbookqa"):
                opening, choices = doc.get("question", doc.get("question_stem")), doc["choices"]["text"]
                gold = "ABCD".index(doc["answerKey"])
            elif task == "piqa":
                opening, choices, gold = doc["goal"], [doc["sol1"], doc["sol2"]], doc["label"]
            elif task == "winogrande":
                rest, gold = doc["sentence"].removeprefix("_ "), int(doc["answer"]) - 1
                options = [doc["option1"], doc["option2"]]
                assert [f"{o} {rest}" in sentences for o in options] == [k == gold for k in range(2)]
                continue
            else:
                continue
            assert [f"{opening} {c}" in sentences for c in choices] == [k == gold for k in range(len(choices))]


def test_reference_check_runs_the_reference_at_our_count():
    """SparseGPT's reference prunes int(numel * s) + 1 weights of each lazy batch: reference_check runs it at the
    sparsity where that count is ours, int(numel * s)."""
    import reference_check
    for numel in (96 * 128, 512 * 128, 4096 * 128):
        for s in (0.3, 0.5, 0.7, 0.123, 0.99):
            assert int(numel * reference_check.reference_sparsity(s, numel)) + 1 == int(numel * s)


def test_nm_bench_counts_inputs_cut_off_and_writes_its_tables(tmp_path):
    """nm_bench's connectivity measure: 0 for EGGS (every input keeps a weight in every tile), above 0 for Wanda
    2:4 on a random model; its tables replace only their own section of a page."""
    import prune
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    cut = {m: nm_bench.disconnected(prune.prune_model(tiny_llama(), m, (2, 4), calib), 4) for m in ("wanda", "eggs")}
    assert cut["eggs"] == 0 < cut["wanda"]
    rows = [{"method": "dense", "sparsity": "0", "ppl": 10.0}]
    rows += [{"method": label, "sparsity": s, "ppl": 11.0, "seconds": 0.5, "disconnected": 0.25}
             for label, _, _ in nm_bench.METHODS for s in ("2:4", "4:8")]
    table = nm_bench.tables({"fixtures": {"llama": rows}})
    assert "| llama | eggs b=1 | 11.00 | 11.00 | 0.50 | 0.50 | 25.00 % / 25.00 % |" in table
    page = tmp_path / "methods.md"
    start, end = bench.markers("nm")
    page.write_text(f"before\n{start}\nold\n{end}\nafter\n")
    bench.replace_section(str(page), f"{start}\n{table}\n{end}")
    assert page.read_text() == f"before\n{start}\n{table}\n{end}\nafter\n"


def test_sslc_bench_tables():
    """sslc_bench's tables: one row per setting with the perplexity, time per block and kept parameters; the
    7B-shaped layer's runs with their seconds, alternations, error and ratio to SparseGPT's seconds."""
    rows = [{"method": "dense", "ppl": 10.0},
            {"method": "sslc", "sparsity": 0.5, "rank_ratio": 0.25, "alternations": 10, "momentum": 0.8,
             "block_s": 1.5, "kept": 0.499, "ppl": 11.0},
            {"method": "wanda", "sparsity": 0.5, "rank_ratio": None, "alternations": None, "momentum": None,
             "block_s": 0.1, "kept": 0.5, "ppl": 12.0}]
    run = {"s": 30.0, "alternations": 10, "error": 700.0}
    table = sslc_bench.tables({"fixtures": {"opt": rows},
                               "real_shape": {"layer": "x", "sslc": run, "plain": dict(run, s=60.0, alternations=20),
                                              "oats": dict(run, s=300.0, alternations=12, reached=False),
                                              "sparsegpt_s": 3.0,
                                              "one_block": {"block": "b", "sslc": 60.0, "sparsegpt": 12.0}}})
    assert "| opt | 0.5 | sslc | 0.25 | 10 | 0.8 | 11.00 | 1.50 | 49.9 % |" in table
    assert "| opt | 0.5 | wanda | — | — | — | 12.00 | 0.10 | 50.0 % |" in table
    assert "| SSLC, defaults (momentum 0.8, warm low-rank steps) | 30.0 | 10 | 700.00 | 10.0 |" in table
    assert "| plain alternation (momentum 0), 20 alternations | 60.0 | 20 | 700.00 | 20.0 |" in table
    assert "| OATS's loop (full SVD), until the defaults' error | 300.0 | 12 (not reached) | 700.00 | 100.0 |" in table
    assert "| b | 60.0 s | 12.0 s | 5.0 |" in table


def test_si_bench_mean_bias_and_tables():
    """si_bench's Wanda with the mean bias alone: on the calibration windows the first pruned layer's outputs keep
    the dense layer's mean; its table has one row per method and variant."""
    import prune
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama()
    corrected = si_bench.mean_corrected_wanda(prune.prunable_copy(dense), calib, 0.5)
    x = dense.blocks[0].input_layernorm(dense.embed(calib))
    q, q_pruned = dense.blocks[0].self_attn.q_proj, corrected.blocks[0].self_attn.q_proj
    assert prune.achieved_sparsity(corrected) == 0.5
    torch.testing.assert_close(q_pruned(x).mean((0, 1)), q(x).mean((0, 1)), rtol=1e-4, atol=1e-5)
    rows = [{"method": "dense", "ppl": 10.0}, {"method": "epts (one run)", "block_s": 3.0}]
    rows += [{"method": m + label, "sparsity": s, "block_s": 0.25, "ppl": 11.0}
             for m in si_bench.BASES for label, _ in si_bench.VARIANTS for s in (0.5, 0.7, "2:4")]
    rows += [{"method": "wanda, mean bias only", "sparsity": s, "block_s": 0, "ppl": 12.0, "calib_ppl": 9.0,
              "wanda_calib_ppl": 8.0} for s in (0.5, 0.7, "2:4")]
    table = si_bench.tables({"fixtures": {"opt": rows}})
    assert "| opt | sparsegpt+si shift only | 11.00 | 11.00 | 11.00 | 0.25 |" in table
    assert "| opt | wanda, mean bias only (no SI) | 12.00 | 12.00 | 12.00 | |" in table
    assert "| opt | the same on the calibration windows: Wanda → mean bias | 8.00 → 9.00 | 8.00 → 9.00 | " \
        "8.00 → 9.00 | |" in table


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_outlier_bed_keeps_the_function_and_wandas_masks_and_strips_magnitudes(family):
    """add_outliers (k = 64) leaves the model's logits and Wanda's 50 % masks the same to the last bit, while
    magnitude's 50 % masks now empty the outlier columns of every layer a norm feeds and nothing else changes."""
    if family == "llama":
        model = tiny_llama(num_hidden_layers=2)
    else:
        cfg = dict(model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
        torch.manual_seed(0)
        model = M.build_model(M.config_from_dict(cfg)).eval().requires_grad_(False)
        for block in model.blocks:  # LayerNorms with weights and biases away from 1 and 0
            for norm in (block.self_attn_layer_norm, block.final_layer_norm):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
    ids = calib_ids(4, 16, 64)
    channels = outliers.outlier_channels(model, ids)
    norms = prune.new_stats(model.blocks[0], False, "cpu")
    prune.run_block(model.blocks[0], model.embed(ids), "cpu", 4, norms)
    act_norm = next(iter(norms.values())).act_norm  # the first norm's outputs: the outliers are its loudest
    assert (act_norm[channels].min() >= act_norm.topk(outliers.CHANNELS).values.min()) and len(channels) == 2
    bed = outliers.add_outliers(prune.prunable_copy(model), channels)
    assert not torch.equal(bed.blocks[0].linears()[next(iter(bed.blocks[0].linears()))].weight,
                           model.blocks[0].linears()[next(iter(model.blocks[0].linears()))].weight)
    assert torch.equal(bed(ids), model(ids))
    masks = {}
    for name, m in (("plain", model), ("bed", bed)):
        for method in ("wanda", "magnitude"):
            pruned = prune.prune_model(prune.prunable_copy(m), method, 0.5, ids)
            masks[name, method] = [lin.weight != 0 for b in pruned.blocks for lin in b.linears().values()]
    assert all(torch.equal(a, b) for a, b in zip(masks["plain", "wanda"], masks["bed", "wanda"]))
    fed = [n for n, lin in bed.blocks[0].linears().items() if lin.in_features == model.cfg.hidden_size
           and not n.endswith(("o_proj", "out_proj", "down_proj", "fc2"))]  # the layers a norm feeds
    per_block = len(bed.blocks[0].linears())
    for i, name in enumerate(list(bed.blocks[0].linears()) * len(bed.blocks)):
        stripped = masks["bed", "magnitude"][i][:, channels]
        assert not stripped.any() if name in fed else stripped.any(), name
    assert len(fed) == (5 if family == "llama" else 4) and per_block > len(fed)
    assert any(m[:, channels].any() for m in masks["plain", "magnitude"])


def test_outliers_table():
    """outliers.py's table: one row per fixture and method, plain and outlier bed side by side."""
    rows = [{"model": "llama", "bed": bed, "method": m, "sparsity": s, "ppl": p}
            for bed, base in (("plain", 10.0), ("outliers", 20.0))
            for m in ("dense", *outliers.METHODS) for s, p in ((0.0, base), (0.5, base + 1), (0.7, base + 2))
            if (m == "dense") == (s == 0.0)]
    table = outliers.table({"rows": rows})
    assert "| llama | dense | 10.00 | 20.00 |" in table
    assert "| llama | magnitude | 11.00 / 12.00 | 21.00 / 22.00 |" in table


def test_smollm2_unpermute_undoes_llama_cpps_rotary_interleave():
    """llama.cpp's converter stores each q/k head's rows as (d, d + hd/2) pairs interleaved for its RoPE;
    smollm2.unpermute puts them back in Hugging Face's order (rows of 3 heads of 8, 2 inputs)."""
    n_head, hd, in_f = 3, 8, 2
    W = torch.arange(n_head * hd * in_f, dtype=torch.float32).view(n_head * hd, in_f).numpy()
    interleaved = W.reshape(n_head, 2, hd // 2, in_f).swapaxes(1, 2).reshape(n_head * hd, in_f)  # llama.cpp's
    assert (interleaved[1] == W[hd // 2]).all() and (smollm2.unpermute(interleaved, n_head) == W).all()
