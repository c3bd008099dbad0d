"""Stable-Baselines3 PPO with rl-baselines3-zoo's tuned CartPole-v1 settings, stopped at the solve.

The peer that bench/solve_bench.py measures ppo_cartpole.py against. Zoo settings (hyperparams/
ppo.yml): 8 envs, n_steps 32, batch 256, 20 epochs, gamma 0.98, gae_lambda 0.8, ent_coef 0,
learning rate and clip range linear from 1e-3 and 0.2 to zero over 1e5 steps.

"Solved" as for ppo_cartpole.py: the mean of the last 100 training returns first reaches 475.
Prints one JSON line: solve step, wall-clock time of the solve (time.time(), so the caller can
subtract its launch time), collection and overall env-steps/s, the greedy evaluation of the
model at the solve; writes every training episode to --episodes-csv.
"""

import argparse
import csv
import json
import time
from collections import deque

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

TOTAL_STEPS = 100_000  # the zoo's n_timesteps: the linear schedules run to zero over it
TARGET = 475.0


class SolveCallback(BaseCallback):
    """Counts true episode returns (Monitor's info["episode"]), stops training at the solve."""

    def __init__(self, start: float):
        super().__init__()
        self.start, self.recent, self.episodes = start, deque(maxlen=100), []
        self.solved_step = self.solved_wall = None
        self.collect_seconds, self._rollout_start = 0.0, 0.0

    def _on_rollout_start(self) -> None:
        self._rollout_start = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.collect_seconds += time.perf_counter() - self._rollout_start

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.recent.append(info["episode"]["r"])
                self.episodes.append((self.num_timesteps, time.perf_counter() - self.start, info["episode"]["r"]))
                if len(self.recent) == 100 and np.mean(self.recent) >= TARGET and self.solved_step is None:
                    self.solved_step, self.solved_wall = self.num_timesteps, time.time()
                    return False
        return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--episodes-csv", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, which ran SB3 faster here than 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98, gae_lambda=0.8,
                ent_coef=0.0, learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.2 * p,
                seed=args.seed, device="cpu", verbose=0)
    start = time.perf_counter()
    callback = SolveCallback(start)
    model.learn(total_timesteps=TOTAL_STEPS, callback=callback)
    seconds = time.perf_counter() - start

    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 10_000)
    returns = []
    for _ in range(10):
        obs, done, total = eval_env.reset(), False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, done, _ = eval_env.step(action)
            total += float(reward[0])
        returns.append(total)

    if args.episodes_csv:
        with open(args.episodes_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["env_step", "seconds", "return"])
            writer.writerows(callback.episodes)
    steps = model.num_timesteps
    print(json.dumps({
        "solved_at_step": callback.solved_step, "solved_wall": callback.solved_wall,
        "solved_at_seconds": seconds if callback.solved_step else None,
        "env_steps": steps, "seconds": seconds, "steps_per_second": steps / seconds,
        "collect_steps_per_second": steps / callback.collect_seconds,
        "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)),
    }))


if __name__ == "__main__":
    main()
