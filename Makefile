PYTHON ?= python3

.PHONY: setup test demo bench

# runtime and test dependencies (torch is pinned: an unpinned torch pulls CUDA wheels)
setup:
	$(PYTHON) -m pip install -q -r requirements-test.txt

# the whole suite, the real-shape tier included (about 8 minutes on 2 CPU cores); pytest exits 5 when no
# test ran, which must fail too
test:
	$(PYTHON) -m pytest -q test_epts.py bench/test_bench.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no test ran"; fi; exit $$rc

# the main job on the built-in model (trains it the first time, a few minutes on a laptop CPU)
demo:
	$(PYTHON) epts.py --methods dense,wanda,sparsegpt,epts --sparsities 0.3,0.5,0.7

bench:
	$(PYTHON) -m pip install -q -r requirements-bench.txt
	$(PYTHON) bench/load_bench.py
	$(PYTHON) bench/memory_check.py
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/nm_bench.py
	$(PYTHON) bench/sslc_bench.py
	$(PYTHON) bench/si_bench.py
	$(PYTHON) bench/gpu.py
	$(PYTHON) bench/speed.py
