# Plateau: `make train export compile TARGET=arm64`, then `make validate TARGET=arm64`.
# Each stage reads the previous stage's files from runs/$(RUN)/ and writes its own with a manifest.
# Every variable reaches the shell single-quoted ($(call q,...)): a value with spaces or shell characters is one
# argument and never runs as a command. The *_ARGS variables are lists of options and are split on spaces.

# Shell-quote one value: 'it'\''s' (close the quote, an escaped quote, reopen).
q = '$(subst ','\'',$(1))'

PYTHON   ?= .venv/bin/python
PLATEAU   = $(call q,$(PYTHON)) -m plateau
RUN      ?= default
MODEL    ?= small_cnn
DATA     ?= synthetic
BITS     ?= W8A8
TARGET   ?= host
CKPT     ?=
EPOCHS   ?=
NOISE    ?=
METHOD   ?=
QAT      ?=
DEVICE   ?=
RPC      ?=
LIMIT    ?=
IMG_SIZE ?=
MODEL_KWARGS ?=
RESUME   ?=
OVERWRITE ?=
RUN_DIR   = runs/$(RUN)

# RUN is a folder name under runs/: refused when empty or a path (a '/' or '..' could reach outside runs/).
ifneq ($(or $(if $(strip $(RUN)),,empty),$(findstring /,$(RUN)),$(filter . ..,$(RUN))),)
$(error RUN='$(RUN)' must be a folder name under runs/ (not empty, no '/', not '.' or '..'))
endif

# Options given on the command line (or in the environment) override what the run folder remembers.
user_set = $(filter command line environment,$(origin $(1)))
MODEL_OPTS   = $(if $(IMG_SIZE),--img-size $(call q,$(IMG_SIZE))) \
               $(if $(MODEL_KWARGS),--model-kwargs $(call q,$(MODEL_KWARGS)))
TRAIN_OPTS   = --model $(call q,$(MODEL)) --data $(call q,$(DATA)) --bits $(call q,$(BITS)) \
               $(if $(CKPT),--checkpoint $(call q,$(CKPT))) $(if $(EPOCHS),--epochs $(call q,$(EPOCHS))) \
               $(if $(or $(METHOD),$(NOISE)),--method $(call q,$(or $(METHOD),$(NOISE)))) $(MODEL_OPTS) \
               $(if $(filter 1 yes true,$(RESUME)),--resume) $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite) \
               $(if $(filter 1 yes true,$(QAT)),--qat)
# A QAT run is exported at the bits it trained at: --bits only when BITS is given.
EXPORT_OPTS  = $(if $(call user_set,BITS),--bits $(call q,$(BITS))) $(if $(CKPT),--checkpoint $(call q,$(CKPT))) \
               $(if $(call user_set,MODEL),--model $(call q,$(MODEL))) \
               $(if $(call user_set,DATA),--data $(call q,$(DATA))) $(if $(LIMIT),--eval-limit $(call q,$(LIMIT))) \
               $(MODEL_OPTS) $(EXPORT_ARGS)
VALIDATE_OPTS = --target $(call q,$(TARGET)) $(if $(DEVICE),--device $(call q,$(DEVICE))) \
               $(if $(RPC),--rpc $(call q,$(RPC))) $(if $(LIMIT),--limit $(call q,$(LIMIT))) $(VALIDATE_ARGS)
# arm64 builds run under qemu here unless a board is given: they need the arm64 Python root.
NEEDS_SYSROOT := $(if $(and $(filter arm64% rpi%,$(TARGET)),$(if $(RPC),,x)),arm64-sysroot)

.PHONY: help setup venv system-deps arm64-sysroot train export compile validate bench test lint clean-run

help:
	@echo "make setup                         install system packages and the Python environment (.venv)"
	@echo "make train export compile TARGET=arm64   the pipeline on runs/\$$(RUN)"
	@echo "make validate TARGET=arm64         run the artifact (qemu for arm64) and check it against the reference"
	@echo "make bench TARGET=host             latency beside onnxruntime"
	@echo "make test                          the test suite"
	@echo "make train RESUME=1                continue a run's training (OVERWRITE=1: delete it, start over)"
	@echo "make train QAT=1 BITS=W2A4 CKPT=f  quantization-aware training from a trained model (METHOD=lsq|fpq|cr|mec|ti)"
	@echo "make clean-run RUN=name            delete runs/name (and nothing else)"
	@echo variables: RUN=$(call q,$(RUN)) MODEL=$(call q,$(MODEL)) DATA=$(call q,$(DATA)) BITS=$(call q,$(BITS)) \
	  TARGET=$(call q,$(TARGET)) CKPT=$(call q,$(CKPT))

setup: system-deps venv

system-deps:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user qemu-user-static file >/dev/null; \
	fi
	@echo "system packages: aarch64 cross compiler and qemu-aarch64 ready"

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

arm64-sysroot:
	$(call q,$(PYTHON)) -m plateau.runtime.sysroot

train:
	$(PLATEAU) train --run $(call q,$(RUN_DIR)) $(TRAIN_OPTS) $(TRAIN_ARGS)

export:
	$(PLATEAU) export --run $(call q,$(RUN_DIR)) $(EXPORT_OPTS)

compile:
	$(PLATEAU) compile --run $(call q,$(RUN_DIR)) --target $(call q,$(TARGET)) $(COMPILE_ARGS)

validate: $(NEEDS_SYSROOT)
	$(PLATEAU) validate --run $(call q,$(RUN_DIR)) $(VALIDATE_OPTS)

bench:
	$(PLATEAU) bench --run $(call q,$(RUN_DIR)) --target $(call q,$(TARGET)) \
	  $(if $(DEVICE),--device $(call q,$(DEVICE))) $(if $(RPC),--rpc $(call q,$(RPC))) $(BENCH_ARGS)

test:
	$(call q,$(PYTHON)) -m pytest -q

lint:
	$(call q,$(PYTHON)) -m ruff check .

# Only runs/$(RUN) itself (RUN is checked above to be a plain folder name), as one quoted argument.
clean-run:
	rm -rf -- $(call q,$(RUN_DIR))
