# Plateau: `make train export compile TARGET=arm64`, then `make validate TARGET=arm64`.
# Each stage reads the previous stage's files from runs/$(RUN)/ and writes its own with a manifest.

PYTHON   ?= .venv/bin/python
PLATEAU  := $(PYTHON) -m plateau
RUN      ?= default
MODEL    ?= small_cnn
DATA     ?= synthetic
BITS     ?= W8A8
TARGET   ?= host
CKPT     ?=
EPOCHS   ?=
NOISE    ?=
DEVICE   ?=
RPC      ?=
LIMIT    ?=
RUN_DIR  := runs/$(RUN)

# Options given on the command line (or in the environment) override what the run folder remembers.
user_set = $(filter command line environment,$(origin $(1)))
TRAIN_OPTS  := --model $(MODEL) --data $(DATA) --bits $(BITS) $(if $(CKPT),--checkpoint $(CKPT)) \
               $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(NOISE),--method $(NOISE))
EXPORT_OPTS := --bits $(BITS) $(if $(CKPT),--checkpoint $(CKPT)) $(if $(call user_set,MODEL),--model $(MODEL)) \
               $(if $(call user_set,DATA),--data $(DATA)) $(if $(LIMIT),--eval-limit $(LIMIT)) $(EXPORT_ARGS)
VALIDATE_OPTS := --target $(TARGET) $(if $(DEVICE),--device $(DEVICE)) $(if $(RPC),--rpc $(RPC)) \
               $(if $(LIMIT),--limit $(LIMIT)) $(VALIDATE_ARGS)
# arm64 builds run under qemu here unless a board is given: they need the arm64 Python root.
NEEDS_SYSROOT := $(if $(and $(filter arm64% rpi%,$(TARGET)),$(if $(RPC),,x)),arm64-sysroot)

.PHONY: help setup venv system-deps arm64-sysroot train export compile validate bench test lint clean-run

help:
	@echo "make setup                         install system packages and the Python environment (.venv)"
	@echo "make train export compile TARGET=arm64   the pipeline on runs/\$$(RUN)"
	@echo "make validate TARGET=arm64         run the artifact (qemu for arm64) and check it against the reference"
	@echo "make bench TARGET=host             latency beside onnxruntime"
	@echo "make test                          the test suite"
	@echo "variables: RUN=$(RUN) MODEL=$(MODEL) DATA=$(DATA) BITS=$(BITS) TARGET=$(TARGET) CKPT=$(CKPT)"

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
	$(PYTHON) -m plateau.runtime.sysroot

train:
	$(PLATEAU) train --run $(RUN_DIR) $(TRAIN_OPTS) $(TRAIN_ARGS)

export:
	$(PLATEAU) export --run $(RUN_DIR) $(EXPORT_OPTS)

compile:
	$(PLATEAU) compile --run $(RUN_DIR) --target $(TARGET) $(COMPILE_ARGS)

validate: $(NEEDS_SYSROOT)
	$(PLATEAU) validate --run $(RUN_DIR) $(VALIDATE_OPTS)

bench:
	$(PLATEAU) bench --run $(RUN_DIR) --target $(TARGET) $(if $(DEVICE),--device $(DEVICE)) $(if $(RPC),--rpc $(RPC)) \
	  $(BENCH_ARGS)

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

clean-run:
	rm -rf $(RUN_DIR)
