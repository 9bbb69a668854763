# Two commands on a fresh machine (Python 3.11):  `make demo`  and  `make test`.
# Both create ./.venv and install everything pinned (idempotent: a stamp file skips reinstalling).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.ibisagent-installed
EXTRAS ?= train,app,ray,sam2,dev

.PHONY: install demo test test-fast test-browser lint bench bench-server browser clean help weights

help:
	@echo "make demo    install (venv, pinned CPU torch, package) and run the agent on a bundled real case"
	@echo "make test    install and run the test suite (browser tests skipped without Chromium)"
	@echo "make test-browser  install Chromium (apt-get, as root) and run the web-app browser tests"
	@echo "make lint    ruff"
	@echo "make bench   run the benchmarks (slow; results go to docs/benchmarks.md by hand)"
	@echo "make weights retrain the shipped segmenter and policy weights from ../shared/data (~2.5 h on 2 cores)"

$(STAMP): pyproject.toml constraints/cpu.txt constraints/nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps -r constraints/nodeps.txt
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-deps --no-build-isolation -r constraints/sam2.txt
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ibisagent demo --out demo_out

# Installs Chromium with apt-get when it is missing and we are root: only `make browser` / `make test-browser` do this.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  echo "installing chromium with apt-get (for the browser tests)" && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

# Installs nothing system-wide; without /usr/bin/chromium the browser tests are skipped and listed (-rs) with the reason.
test: $(STAMP)
	@[ -x /usr/bin/chromium ] || echo "note: /usr/bin/chromium not found: the browser tests will be skipped (make test-browser installs it)"
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

test-browser: $(STAMP) browser   ## the web app in headless Chromium (Playwright + /usr/bin/chromium), ~45 s
	IBISAGENT_SCREENSHOT_DIR=runs/app_shots $(BIN)/python -m pytest -q tests/test_app_browser.py

bench-server: $(STAMP)           ## bounded loopback load test of `ibisagent serve` (8 clients x 20 s)
	nice -n 10 $(BIN)/python benchmarks/bench_server.py --clients 8 --duration 20 --segmenter fake \
	    --json runs/bench_server_fake.json --md runs/bench_server_fake.md

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	bash benchmarks/run_all.sh

# Reproduces the shipped weights (commands also in the model cards, src/ibisagent/weights/*.md). DATA must hold
# the dev data; run artifacts go to runs/; the final files are copied over the package's weights at the end.
DATA ?= ../shared/data
POLICY_B_ARGS ?= --stage all --segmenter litemedsam-click --rollout-clicks 3 --dagger-rounds 1 --synth-frac 0.5 \
    --sft-steps 150 --sft-lr 1e-3 --ckpt-every 50 --val-cases 16 --grpo-iters 60 --grpo-cases 8 --group-size 4 \
    --max-turns 5 --seed 0 --run-dir runs/p3b --out runs/p3b/final.safetensors
# stages 3 (SFT) and 4 (GRPO): fine-tune on the dev data plus 2D cases cut from the train-split 3D label volumes;
# 30 % of the train images are kept out of SFT and used only by GRPO (--grpo-holdout, same value in both commands)
VOLUME_ARGS ?= --volume-stride 2 --volume-datasets totalsegmentator_examples_ct_mr,pyradiomics_testcases_mri
POLICY_C_SFT_ARGS ?= --stage sft --segmenter litemedsam-click $(VOLUME_ARGS) --rollout-clicks 3 --dagger-rounds 1 \
    --synth-frac 0.5 --sft-steps 2000 --sft-lr 7e-4 --ckpt-every 250 --val-cases 16 --seed 0 --threads 2 \
    --grpo-holdout 0.3 --run-dir runs/p6 --out runs/p6/sft_stage.safetensors
POLICY_C_GRPO_ARGS ?= --stage grpo --segmenter litemedsam-click $(VOLUME_ARGS) --val-cases 16 --grpo-iters 30 \
    --grpo-cases 8 --group-size 4 --max-turns 5 --grpo-lr 5e-5 --kl-coef 0.1 --seed 0 --threads 1 \
    --grpo-holdout 0.3 --run-dir runs/p6 --out runs/p6/final.safetensors
weights: $(STAMP)
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --cache-only
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --run-dir runs/s3 \
	    --out runs/s3/click.safetensors --steps 600 --val-every 100 --val-cases 60 --ckpt-every 25 --seed 0 --threads 2
	$(BIN)/ibisagent train-policy --data $(DATA) --segmenter litemedsam --cache-dir runs/embeddings --synth-frac 1.0 \
	    --grpo-iters 0 --stage sft --sft-steps 300 --ckpt-every 50 --val-cases 0 --run-dir runs/p3a \
	    --out runs/p3a/a.safetensors
	$(BIN)/ibisagent train-policy $(POLICY_B_ARGS) --data $(DATA) --init runs/p3a/a.safetensors \
	    --segmenter-weights runs/s3/click.safetensors --cache-dir runs/embeddings
	$(BIN)/ibisagent train-policy $(POLICY_C_SFT_ARGS) --data $(DATA) --init runs/p3b/final.safetensors \
	    --segmenter-weights runs/s3/click.safetensors --cache-dir runs/embeddings
	$(BIN)/ibisagent train-policy $(POLICY_C_GRPO_ARGS) --data $(DATA) \
	    --segmenter-weights runs/s3/click.safetensors --cache-dir runs/embeddings
	cp runs/s3/click.safetensors src/ibisagent/weights/litemedsam_click.safetensors
	cp runs/p6/final.safetensors src/ibisagent/weights/compact_policy.safetensors

clean:
	rm -rf $(VENV) demo_out .pytest_cache
