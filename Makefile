# Set-up and everyday commands. `make demo` and `make test` install what they need into .venv.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
NNUNET_PACKAGES ?= nnunetv2==2.8.1 dynamic-network-architectures==0.4.4

.PHONY: install install-nnunet realct demo test test-fast bench evaluate evaluate-realct lint format clean

# one stamp per torch version: `make TORCH_VERSION=2.5.1 test` reinstalls into the same .venv
STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-torch-*
	touch $@

# nnU-Net v2 beside the project, for the nnU-Net route's end-to-end test (see requirements-nnunet.txt)
NNUNET_STAMP := $(VENV)/.installed-nnunet
install-nnunet: $(NNUNET_STAMP)

$(NNUNET_STAMP): $(STAMP) requirements-nnunet.txt
	$(PY) -m pip install -q -r requirements-nnunet.txt
	$(PY) -m pip install -q --no-deps $(NNUNET_PACKAGES)
	$(VENV)/bin/desd-nnunet-trainer
	touch $@

# Real CT for the tests, fetched once through pip and kept outside the repository (nothing is
# committed; the product never downloads): the reference scans that the source distribution of
# TotalSegmentator 2.18.0 (Apache-2.0) ships, with that tool's predicted labels.
REALCT ?= $(or $(DESD_REALCT),$(HOME)/.cache/desd/realct)
REALCT_SDIST := totalsegmentator-2.18.0.tar.gz
REALCT_SHA256 := 5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03
realct: $(REALCT)/.complete

$(REALCT)/.complete: | $(STAMP)
	mkdir -p $(REALCT)/download
	[ -f $(REALCT)/download/$(REALCT_SDIST) ] || $(PY) -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
	  totalsegmentator==2.18.0 -d $(REALCT)/download
	echo "$(REALCT_SHA256)  $(REALCT)/download/$(REALCT_SDIST)" | sha256sum -c --quiet -
	tar xzf $(REALCT)/download/$(REALCT_SDIST) -C $(REALCT) --strip-components=1 \
	  totalsegmentator-2.18.0/tests/reference_files totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py
	rm -f $(REALCT)/download/$(REALCT_SDIST)
	touch $@

demo: install
	PYTHON=$(abspath $(PY)) sh demo.sh

test: install install-nnunet realct
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DESD_REALCT=$(REALCT) DESD_REQUIRE_REALCT=1 $(PY) -m pytest -q -m "not slow"
	DESD_REALCT=$(REALCT) DESD_REQUIRE_REALCT=1 $(PY) -m pytest -q -m slow

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_preprocessing.py

# DeSD vs DINO vs no pretraining on generated CT, CPU-sized (53 min on 2 cores, measured); results
# and figure in evidence/ (docs/evidence.png is redrawn from them: evaluate.py --from_results ... --figure)
evaluate: install
	$(PY) evaluate.py --config cpu --out evidence

# then the same encoders on real CT (TotalSegmentator's reference scans, that tool's labels): heads
# fitted on one scan, scored on two others; adds a secondary table to evidence/results.md (3 min)
evaluate-realct: install realct
	$(PY) tools/real_ct_probe.py --results evidence/results.json --realct $(REALCT)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo_data demo_output bench_data evidence .pytest_cache
