# Two commands on a fresh machine (Python 3.11):  `make demo`  and  `make test`.
# Both create ./.venv and install everything pinned (idempotent: a stamp file skips reinstalling).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.ibisagent-installed
EXTRAS ?= train,app,ray,sam2,dev,release

.PHONY: install demo test test-fast test-browser lint bench bench-server browser clean help weights

help:
	@echo "make demo    install (venv, pinned CPU torch, package) and run the agent on a bundled real case"
	@echo "make test    install and run the test suite (browser tests skipped without Chromium)"
	@echo "make test-browser  install Chromium (apt-get, as root) and run the web-app browser tests"
	@echo "make lint    ruff"
	@echo "make bench   run the benchmarks (slow; results go to docs/benchmarks.md by hand)"
	@echo "make weights retrain the shipped segmenter and policy weights from ../shared/data (~2.5-3 h on 2 cores)"

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
# the click segmenter was trained on the twelve folders the dev data held then, with the per-image split of that time
OLD_SETS ?= drive_retinal_vessels,ph2_dermoscopy,hc18_fetal_head_ultrasound,busi_breast_ultrasound,polyp_colonoscopy_small,monuseg_he_nuclei_patches,isbi2012_em_membranes,sammed2d_demo_ct,totalsegmentator_examples_ct_mr,pyradiomics_testcases_mri,nilearn_mni152_brain_mri,stardist_dsb2018_nuclei
SEG_ARGS ?= --datasets $(OLD_SETS) --split-by image --steps 600 --val-every 100 --val-cases 60 --ckpt-every 25 \
    --seed 0 --threads 2
# then (after the policy, which was trained against runs/s3) the shipped segmenter continues runs/s3 on every 2D
# folder, split by group, originals only; its run stopped at step 93 by a time limit, --stop-step replays that
SEG4_ARGS ?= --no-flip --zoom 0 --tone 0 --lr 1e-4 --warmup 5 --steps 150 --stop-step 93 --max-clicks 10 \
    --short-max 5 --val-every 50 --val-cases 60 --ckpt-every 10 --seed 0 --threads 2 --run-dir runs/s4
# the compact policy: from scratch on every 2D dev folder (group split), SFT then GRPO in one command (~55 min of
# SFT + 6 min of GRPO on 2 cores once the embeddings are cached; encoding ~1400 train images first: 15-40 min)
POLICY_ARGS ?= --stage all --segmenter litemedsam-click --no-flip --sample-temperature 0.5 --query-variants \
    --volume-stride 2 --volume-datasets totalsegmentator_examples_ct_mr --rollout-clicks 3 --rollout-cases 700 \
    --dagger-rounds 1 --synth-frac 0.5 --sft-steps 3000 --sft-lr 1.5e-3 --ckpt-every 250 --val-cases 24 \
    --grpo-iters 20 --grpo-cases 8 --group-size 4 --max-turns 5 --grpo-lr 5e-5 --kl-coef 0.1 --grpo-holdout 0.2 \
    --seed 0 --threads 2 --sft-minutes 50 --grpo-minutes 12 --run-dir runs/u1 --out runs/u1/final.safetensors
weights: $(STAMP)
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --cache-only $(SEG_ARGS)
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --run-dir runs/s3 \
	    --out runs/s3/click.safetensors $(SEG_ARGS)
	$(BIN)/ibisagent train-policy --data $(DATA) --segmenter-weights runs/s3/click.safetensors \
	    --cache-dir runs/embeddings $(POLICY_ARGS)
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --cache-only $(SEG4_ARGS)
	$(BIN)/ibisagent train-segmenter --data $(DATA) --cache-dir runs/embeddings --cached-only \
	    --init runs/s3/click.safetensors --out runs/s4/click.safetensors $(SEG4_ARGS)
	cp runs/s4/click.safetensors src/ibisagent/weights/litemedsam_click.safetensors
	cp runs/u1/final.safetensors src/ibisagent/weights/compact_policy.safetensors

clean:
	rm -rf $(VENV) demo_out .pytest_cache
