# make test   : create/refresh .venv, install cnnfast with its dev extra, run the test suite
# make report : the same install, then write the report into report/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Both lie on this machine's disk; pip takes them from there.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BUILD_DEPS := 'setuptools>=64' wheel 'pybind11>=2.12' 'cmake>=3.24' ninja
# CUTLASS's C++ headers, for the CUDA conv; its Python dependencies are not needed to build.
CUTLASS := nvidia-cutlass==4.2.0.0
INSTALLED := $(VENV)/.cnnfast-installed
SOURCES := setup.py pyproject.toml CMakeLists.txt $(wildcard kernels/cuda/*)

.PHONY: test report install clean

# One pytest worker per core (pytest-xdist): the interpreter-bound suite is CPU-bound; an idle
# worker takes queued cases from a busy one (worksteal), and each worker's PyTorch takes its share
# of the cores (conftest.py).
test: $(INSTALLED)
	$(PY) -m pytest tests -q -n auto --dist worksteal

report: $(INSTALLED)
	$(VENV)/bin/cnnfast report --out report

install: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when the build inputs change; the editable install picks up Python edits itself.
$(INSTALLED): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) $(BUILD_DEPS)
	$(PY) -m pip install -q --no-deps $(CUTLASS)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

clean:
	rm -rf build report *.egg-info cnnfast/_C*.so
