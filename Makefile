# Two commands for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.hpp')

.PHONY: install demo test test-gpu clean

$(VENV)/.deps: requirements.txt requirements-test.txt
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

test: install
	$(PY) -m pytest -q -ra tests

test-gpu: install
	$(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) build *.egg-info selfrag_engine/*.so
