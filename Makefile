# The two set-up commands: `make demo` (the main job on generated slides) and
# `make test` (the test suite). Both build everything they need into .venv.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
NIC     := $(VENV)/bin/nic-fast
DEMO    ?= demo-out

.PHONY: install test demo bench bench-synthetic clean

install: $(VENV)/.installed

# torch is pinned for the test set-up only (the runtime requirement is a range).
# cuCIM's reader needs only numpy, click and lazy-loader: --no-deps keeps CuPy and
# ~3 GB of CUDA libraries out.
# timm and timm-ctp are the tests' references for the foundation-model presets (nic-fast
# never imports them). Both depend on torchvision, whose PyPI wheels do not load beside the
# CPU torch (and would pull another torch): --no-deps, and the tests stand in for the
# torchvision names timm imports but its model code never calls.
$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps cucim-cu13
	$(PY) -m pip install -q scikit-build-core pybind11 numpy click lazy-loader
	$(PY) -m pip install -q --no-build-isolation -e '.[test,dali,foundation,cluster]'
	$(PY) -m pip install -q --no-deps timm==1.0.31 timm-ctp==0.5.4
	touch $@

test: install
	$(PY) -m pytest -q

# The whole method on generated slides: synth (lesions, masks, labels) -> compress with the
# 8 dihedral variants -> cross-validated training (AUC with its 95 % interval) -> Grad-CAM
# heatmap of the first lesion slide with its Jaccard index against the lesion mask.
# DEMO_ENCODER is the one place the demo's encoder is chosen: a built-in name or a .pt/.pt2
# file (e.g. one imported with `nic-fast encoders import-keras`). These sizes took 6 minutes
# on a busy 2-core CPU (AUC 0.98); a test runs this target at a smaller size.
demo: DEMO_ENCODER ?= mean-rgb
demo: DEMO_SLIDES ?= 64
demo: DEMO_SIZE ?= 4096
demo: DEMO_EPOCHS ?= 20
demo: install
	$(NIC) synth slides -o $(DEMO)/slides --n $(DEMO_SLIDES) --size $(DEMO_SIZE) --seed 0
	$(NIC) compress $(DEMO)/slides/*.tif -o $(DEMO)/compressed --augment --encoder $(DEMO_ENCODER)
	$(NIC) info $(DEMO)/compressed/slide_000.zarr
	$(NIC) train $(DEMO)/slides/labels.csv --stores $(DEMO)/compressed -o $(DEMO)/run \
	  --crop-cells 24 --epochs $(DEMO_EPOCHS) --crops-per-slide 32 --tta-crops 4
	slide=$$(awk -F, '$$2 + 0 == 1 { sub(/\.tif$$/, "", $$1); print $$1; exit }' $(DEMO)/slides/labels.csv); \
	$(NIC) heatmap $(DEMO)/run $(DEMO)/compressed/$$slide.zarr --mask $(DEMO)/slides/$${slide}_mask.png \
	  -o $(DEMO)/heatmap.png

bench: install
	$(PY) benchmarks/compress_cpu.py

# The paper's synthetic MNIST benchmark, quick configuration (about 25 minutes on 2 CPU
# cores): results.md and plots in benchmarks/results/synthetic-quick/.
bench-synthetic: install
	$(PY) benchmarks/synthetic.py --config quick

clean:
	rm -rf build $(DEMO) .pytest_cache
