# gsq: `make install eval` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact versions CI tested (`make lock` writes them): torch and triton for the CPU, everything else.
TORCH_LOCK := requirements/torch-cpu.txt
LOCK := requirements/lock.txt
TORCH_PART := '^(torch|triton|setuptools)=='  # what a CUDA torch pins itself (torch 2.11: triton==3.6.0, setuptools<82)
# The newest releases pyproject allows, in a venv of their own (`make test-latest`).
LATEST ?= .venv-latest
LATEST_TESTS := tests/test_layout.py tests/test_fixture.py tests/test_export.py tests/test_eval.py tests/test_quantize.py tests/test_nvfp4.py
DATA ?= ../shared/data
MODEL ?= models/tiny-deepseek-v3
NAME := $(notdir $(patsubst %/,%,$(MODEL)))
OUT ?= out/$(NAME)-gsq-w2
SEQLEN ?= 256
TINY := models/tiny-deepseek-v3 models/tiny-qwen3-moe
# The bundled models get the scaled-down preset, calibrated on the local WikiText-2 valid split where
# $(DATA) exists (else the Hub's train split); any other MODEL the paper's settings. The perplexity watch
# reads the local test split where $(DATA) exists (else the Hub's). Extra flags: ARGS=...
CALIB_DATA := $(if $(wildcard $(DATA)),--dataset $(DATA)/wikitext-2/wiki.valid.tokens,)
EVAL_DATA := $(if $(wildcard $(DATA)),--eval-data $(DATA)/wikitext-2-raw/wiki.test.raw,)
PRESET ?= $(if $(filter $(TINY) $(addsuffix /,$(TINY)),$(MODEL)),--preset tiny $(CALIB_DATA),)
ARGS ?=
LLMCOMPRESSOR ?=
NPROC ?=
KEEP ?= 4
PRUNED ?= out/$(NAME)-reap$(KEEP)
PRUNE_ARGS ?=
BUDGET ?= 2.625

.PHONY: install test-latest lock gpu-wheels gpu-check quantize prune compress eval compare prune-compare budget-compare inspect test bench fixture fixture-report

# The locked versions: the same `pip freeze` on every fresh machine. On a GPU machine install your CUDA torch
# into the venv first and skip $(TORCH_LOCK): `make install TORCH_LOCK=`.
install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip
	$(if $(TORCH_LOCK),$(PY) -m pip install --quiet -r $(TORCH_LOCK))
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[lm-eval,dev,report]'

# Tomorrow's releases before a user meets them: a fresh venv with the newest versions pyproject allows (torch
# stays the CPU wheel of $(TORCH_LOCK)), what differs from the lock, then the fast tests. Not part of CI.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet $$(grep '^torch==' $(TORCH_LOCK))
	$(LATEST)/bin/python -m pip install --quiet -e '.[lm-eval,dev,report]'
	$(LATEST)/bin/python eval/versions.py $(LOCK) $(TORCH_LOCK)
	$(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile $(LATEST_TESTS)
	touch $(LATEST)/passed

# Freeze the venv `make test-latest` passed in as the new lock (commit it on its own, then run make test).
lock:
	@test -f $(LATEST)/passed || { echo "error: no passing $(LATEST): run make test-latest first"; exit 2; }
	{ echo "# torch and what it pins, as CI tested them (CPU); a GPU machine brings its own CUDA build. Written by make lock."; \
	  $(LATEST)/bin/python -m pip freeze --all | grep -E $(TORCH_PART) | sed 's/+cpu$$//'; } > $(TORCH_LOCK)
	{ echo "# Every other package as CI tested it (pip constraints, Python 3.11). Written by make lock."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -vE $(TORCH_PART); } > $(LOCK)

# What a bare CUDA image (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, no network; its package list:
# the device tool's KINDS.md) lacks for gsq, at the locked versions, as CPython 3.12 manylinux x86-64 wheels in
# $(WHEELS), with the local WikiText-2 files gsq's checks read. There: pip install --no-index --no-deps --target
# /tmp/site $(WHEELS)/*.whl, then PYTHONPATH=/tmp/site:. (README, "On a GPU machine").
WHEELS ?= .whl
GPU_WHEELS := transformers huggingface-hub hf-xet httpx2 httpcore2 truststore anyio h11 idna click regex kernels \
	tomlkit compressed-tensors loguru pydantic pydantic-core annotated-types typing-inspection typing-extensions
PLATFORMS := $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)/data
	for name in $(GPU_WHEELS); do \
	  pin=$$(grep -iE "^$$(echo $$name | sed 's/[-_]/[-_]/g')==" $(LOCK)) || { echo "error: $$name is not in $(LOCK)"; exit 2; }; \
	  $(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    $(PLATFORMS) -d $(WHEELS) "$$pin" || exit 1; done
	cp $(DATA)/wikitext-2/wiki.valid.tokens $(DATA)/wikitext-2-raw/wiki.test.raw $(WHEELS)/data/
	@size=$$(du -sm $(WHEELS) | cut -f1); ls $(WHEELS) | sed 's/^/  /'; echo "$(WHEELS): $$size MiB"; \
	  if [ $$size -gt 48 ]; then echo "error: $(WHEELS) is $$size MiB, over the 48 MiB a device call can carry"; exit 1; fi

# Proof of a GPU machine in one call, under 8 minutes on one H200 (eval/gpu_check.py): environment, kernels at
# Kimi-K2.5 shapes, the tiny model quantized and evaluated on the GPU, plan vs measured memory, one Kimi-K2.5 layer
# share, a kill-and-resume byte check; a record and a summary in OUT= (default out/gpu-check). DEVICE=cpu: the same
# parts at toy sizes. Uses .venv where there is one, else python3 (a bare CUDA image with $(WHEELS) installed).
DEVICE ?= cuda
CHECK_OUT := $(if $(filter command line environment,$(origin OUT)),$(OUT),out/gpu-check)
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) eval/gpu_check.py --device $(DEVICE) --out $(CHECK_OUT) \
	  --data $(if $(wildcard $(DATA)),$(DATA),$(WHEELS)/data)

# GSQ 2-bit quantization of MODEL's routed experts into OUT (compressed-tensors pack-quantized).
# NPROC=N: N processes under torchrun, the experts of each layer split across them.
quantize:
	$(if $(NPROC),$(VENV)/bin/torchrun --nproc-per-node $(NPROC),$(PY)) -m gsq.quantize --model $(MODEL) --out $(OUT) $(PRESET) $(EVAL_DATA) $(ARGS)

# REAP expert pruning: keep the KEEP most salient routed experts of each MoE layer, into PRUNED.
prune:
	$(PY) -m gsq.prune --model $(MODEL) --out $(PRUNED) --keep $(KEEP) $(PRESET) $(PRUNE_ARGS)

# Prune, then GSQ quantize the pruned model: PRUNED, then PRUNED-gsq-w2 (PRUNED-gsq-nvfp4 with ARGS="--format nvfp4").
compress: prune
	$(PY) -m gsq.quantize --model $(PRUNED) --out $(PRUNED)-gsq-$(if $(findstring nvfp4,$(ARGS)),nvfp4,w2) $(PRESET) $(EVAL_DATA) $(ARGS)

# WikiText-2 test perplexity of MODEL (the bundled tiny MoE unless MODEL=... is given).
eval:
	$(PY) -m gsq.eval --model $(MODEL) --data-file $(DATA)/wikitext-2-raw/wiki.test.raw --seqlen $(SEQLEN)

# GSQ vs GPTQ vs RTN (and llm-compressor's GPTQ W2A16 with LLMCOMPRESSOR=its env's python) on MODEL, each evaluated against it: table, JSON record and plots under eval/results/.
compare:
	$(PY) eval/compare.py --model $(MODEL) --work out/compare $(if $(LLMCOMPRESSOR),--llmcompressor $(LLMCOMPRESSOR)) $(ARGS)

# REAP vs frequency vs random pruning at KEEP experts, then REAP + GSQ next to each step alone.
prune-compare:
	$(PY) eval/prune_compare.py --model $(MODEL) --keep $(KEEP) $(ARGS)

# Allocations of one --bits-budget side by side: gsq's, from measured sensitivity, against the same widths placed
# first, last, alternating and at random, and uniform 2 bits; predicted vs measured KL (eval/budget_compare.py).
# SIZE=...: that checkpoint size by fewer bits, fewer experts (REAP) and a mix, and the KL-vs-bits curve with
# uniform GPTQ at 2, 3, 4 bits (eval/size_compare.py).
budget-compare:
	$(if $(SIZE),$(PY) eval/size_compare.py --size $(SIZE),$(PY) eval/budget_compare.py --budget $(BUDGET)) \
	  --model $(MODEL) $(if $(ARGS),--args "$(ARGS)")

# What a quantized checkpoint holds: bits per weight per layer, codes per group, size vs the original.
inspect:
	$(PY) -m gsq.inspect $(OUT)

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test:
	@$(PY) -m pytest -q -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# Kernel vs eager timings (CUDA), peak memory vs calibration windows (activations on disk and in host
# memory), and the expert-parallel benchmark (1 vs 2 CPU ranks, or GSQ steps of one rank's share of a
# Kimi-K2.5 layer on a GPU); JSON under eval/results/
bench:
	$(PY) eval/bench_kernels.py
	$(PY) eval/bench_memory.py
	$(PY) eval/bench_parallel.py $(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')"),--gpu,)

# Re-train the bundled tiny MoE (about 15 minutes on 2 CPU cores; deterministic).
fixture:
	$(PY) models/train_tiny_moe.py --out $(MODEL)

# Perplexity of the fixture with and without its routed experts (eval/results/fixture.json).
fixture-report:
	$(PY) eval/fixture_report.py --model $(MODEL) --data-file $(DATA)/wikitext-2-raw/wiki.test.raw
