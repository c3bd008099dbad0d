# `make train` and `make test` install what they need on first use.
# They use the active virtual environment if there is one, else make ./.venv.
ENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.ppo-cartpole-installed

.PHONY: install train train-post test test-slow test-floors mutate mutate-semantic bench long-run ablations failures clip-figure clean

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PYTHON) || python3 -m venv $(ENV_DIR)
	$(PYTHON) -m pip install -r requirements.txt
	@touch $@

train: $(STAMP)  ## a full run that stops once solved, with plot and GIF; replaces runs/train
	rm -rf runs/train
	$(PYTHON) ppo_cartpole.py --stop-when-solved --out-dir runs/train

train-post: $(STAMP)  ## the blog post's hyper-parameters (POST_SETTINGS in the script; its defects fixed), until solved
	rm -rf runs/train-post
	$(PYTHON) ppo_cartpole.py $$($(PYTHON) -c 'import ppo_cartpole; print(ppo_cartpole.POST_SETTINGS)') \
		--stop-when-solved --out-dir runs/train-post

test: $(STAMP)  ## the fast suite, a worker per core (pytest-xdist)
	$(PYTHON) -m pytest -m "not slow" -q -n auto

test-slow: $(STAMP)  ## everything, including a learning test that solves CartPole
	$(PYTHON) -m pytest -q -n auto

test-floors:  ## the fast suite on the lowest version of each package requirements.txt allows, in .venv-floors (not in CI)
	rm -rf .venv-floors && python3 -m venv .venv-floors
	sed -nE 's/^([^#>]+)>=([0-9.]+).*/\1==\2/p' requirements.txt | xargs .venv-floors/bin/python -m pip install -q
	.venv-floors/bin/python -m pytest -m "not slow" -q -n auto

mutate: $(STAMP)  ## plant single-line bugs in PPO (mutmut) and count what the fast tests catch (~26 min on 2 cores; not in CI)
	$(PYTHON) -m pip install -q -r mutation/requirements.txt
	$(PYTHON) mutation/score.py

mutate-semantic: $(STAMP)  ## plant the bugs mutmut cannot (a value scaled, a threshold moved, a mask inverted, ...) and count what the fast tests catch (~28 min on 2 cores; not in CI)
	$(PYTHON) mutation/semantic.py

bench: $(STAMP)  ## ours against Stable-Baselines3 (rl-zoo settings), 5 seeds each, then env backends (~3 min)
	$(PYTHON) -m pip install -q -r bench/requirements.txt
	$(PYTHON) bench/solve_bench.py --seeds 5 --out bench/results
	$(PYTHON) bench/env_bench.py --out bench/results

long-run: $(STAMP)  ## the user's --episodes 2000 on seeds 1-10 (gymnasium) and 1-3 (torch, ~3 min a seed), then the figure
	$(PYTHON) bench/long_run.py --backend gymnasium --seeds 10 --label after
	$(PYTHON) bench/long_run.py --backend torch --seeds 3 --label after
	$(PYTHON) bench/long_run.py --figure assets/long_run.png

ablations: $(STAMP)  ## what each defect of the post and each PPO detail costs: 21 variants x 5 seeds (~15 min)
	$(PYTHON) bench/ablations.py

failures: $(STAMP)  ## what PPO looks like when it fails, on CartPole-v1 and Acrobot-v1: 5 ways of breaking it beside the defaults, 3 seeds each, and the run's diagnosis checked on each (~13 min)
	$(PYTHON) bench/failures.py

clip-figure: $(STAMP)  ## assets/clip.png: L^CLIP of one sample against the ratio, eq. (7), drawn by the script's own loss
	$(PYTHON) docs/clip_figure.py

clean:
	rm -rf runs .pytest_cache __pycache__ mutants mutants-semantic .venv-floors
