# The two set-up commands: `make demo` (the main job on generated slides) and
# `make test` (the test suite). Both build everything they need into .venv.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
NIC     := $(VENV)/bin/nic-fast
DEMO    ?= demo-out
# The paper's BiGAN encoder, when the reference data sits beside the checkout.
BIGAN_H5 ?= ../shared/data/nic-paper-encoders/encoder_bigan.h5

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch is pinned for the test set-up only (the runtime requirement is a range).
# cuCIM's reader needs only numpy, click and lazy-loader: --no-deps keeps CuPy and
# ~3 GB of CUDA libraries out.
$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps cucim-cu13
	$(PY) -m pip install -q scikit-build-core pybind11 numpy click lazy-loader
	$(PY) -m pip install -q --no-build-isolation -e '.[test,dali]'
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(NIC) synth slides -o $(DEMO)/slides --n 4 --size 4096 --seed 0
	if [ -f $(BIGAN_H5) ]; then \
	  $(NIC) encoders import-keras $(BIGAN_H5) -o $(DEMO)/bigan.pt && encoder=$(DEMO)/bigan.pt; \
	else encoder=mean-rgb; fi; \
	$(NIC) compress $(DEMO)/slides/*.tif -o $(DEMO)/compressed --augment --encoder $$encoder
	$(NIC) info $(DEMO)/compressed/slide_000.zarr

bench: install
	$(PY) benchmarks/compress_cpu.py

clean:
	rm -rf build $(DEMO) .pytest_cache
