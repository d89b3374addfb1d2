# `make run` and `make test` set everything up on first use (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
ESPEAK := /usr/bin/espeak-ng
POCKETSPHINX_DATA := /usr/share/pocketsphinx/test/data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup data run run-vit test test-fast lint benchmark clean

setup: $(STAMP) data

# Debian's Fashion-MNIST is the offline copy of TFDS `fashion_mnist`.
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# espeak-ng synthesizes the spoken_* datasets; pocketsphinx-testdata has the real recordings
# (LibriVox) that the audio tests compare against librosa and resemblyzer.
$(ESPEAK):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng

$(POCKETSPHINX_DATA):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq pocketsphinx-testdata

# resemblyzer (the GE2E parity reference and weights) goes in with --no-deps: its declared
# deps would pull the obsolete `typing` backport and compile webrtcvad; the [test] extra has
# webrtcvad-wheels and librosa instead.
$(STAMP): pyproject.toml | $(FASHION_MNIST) $(ESPEAK) $(POCKETSPHINX_DATA)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps resemblyzer==0.1.4
	touch $(STAMP)

data: $(STAMP)
	$(PY) tools/prepare_data.py fashion_mnist bbc_news spoken_keywords spoken_speakers \
		spoken_languages fashion_scenes

# The main job: real transfer learning on the offline default (see README).
run: setup
	$(PY) experiments/transfer_vs_scratch.py --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

benchmark: setup
	$(PY) tools/benchmark.py

clean:
	rm -rf runs
