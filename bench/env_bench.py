"""Env backends and devices: raw stepping speed, and the user's command on the CPU and on CUDA.

1. Stepping alone, random actions: gymnasium's native vector CartPole (numpy, CPU) against
   TorchCartPole on the CPU (and on CUDA where there is one), at 8 to 65536 envs.
2. `python ppo_cartpole.py --device D` at its own defaults (gymnasium on the CPU, the torch
   backend and its preset on CUDA): the training loop's env-steps/s over a fixed 50 iterations,
   and whole-process seconds to solve with --stop-when-solved.

    python bench/env_bench.py --out bench/results
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo_cartpole as ppo  # noqa: E402

ENV_COUNTS = [8, 64, 1024, 4096, 65536]


def steps_per_second(step, num_envs: int, seconds: float = 1.0, sync=lambda: None) -> float:
    """Env steps per second of step(), timed over at least `seconds` after a warm-up."""
    for _ in range(10):
        step()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            step()
        calls += 20
        sync()
    return calls * num_envs / (time.perf_counter() - start)


def gymnasium_stepping(num_envs: int) -> float:
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    envs.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 2, (64, num_envs))
    counter = iter(range(10**9))
    result = steps_per_second(lambda: envs.step(actions[next(counter) % 64]), num_envs)
    envs.close()
    return result


def torch_stepping(num_envs: int, device: str) -> float:
    envs = ppo.TorchCartPole(num_envs, device)
    envs.reset(seed=0)
    actions = torch.randint(0, 2, (64, num_envs), device=device)
    counter = iter(range(10**9))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return steps_per_second(lambda: envs.step(actions[next(counter) % 64]), num_envs, sync=sync)


def users_command(device: str, out: Path, solve: bool) -> dict:
    """Run the script at its defaults on `device`: 50 iterations, or until solved."""
    run_dir = out / f"env-bench-{device}-{'solve' if solve else '50it'}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own run of an earlier time
    extra = ["--stop-when-solved"] if solve else ["--episodes", "50"]
    launch = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "ppo_cartpole.py"), "--device", device, "--no-plot", "--no-gif",
                    "--out-dir", str(run_dir), *extra], check=True, capture_output=True)
    whole = time.perf_counter() - launch
    summary = json.loads((run_dir / "summary.json").read_text())
    return dict(steps_per_second=summary["steps_per_second"], whole_seconds=whole,
                solved_at_step=summary["solved_at_step"], solved_at_seconds=summary["solved_at_seconds"],
                backend=summary["config"]["env_backend"], num_envs=summary["config"]["num_envs"],
                eval_return=summary["eval_return_mean"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--max-envs", type=int, default=65536, help="skip env counts above this")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # as the script's default
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None

    lines = ["Env steps/s, stepping alone with random actions (1 torch thread):", "",
             "| envs | gymnasium native (numpy) | TorchCartPole cpu |" + (" TorchCartPole cuda |" if gpu else ""),
             "|---|---|---|" + ("---|" if gpu else "")]
    raw = {}
    for n in [n for n in ENV_COUNTS if n <= args.max_envs]:
        raw[n] = {"gymnasium": gymnasium_stepping(n), **{f"torch-{d}": torch_stepping(n, d) for d in devices}}
        lines.append(f"| {n:,} | " + " | ".join(f"{v / 1e6:.2f}M" for v in raw[n].values()) + " |")
        print(lines[-1], flush=True)

    lines += ["", "`python ppo_cartpole.py --device D` at its defaults:", "",
              "| device | backend, envs | training env-steps/s (50 iterations) | steps to solve | "
              "whole-process s to solve | best policy greedy return |", "|---|---|---|---|---|---|"]
    runs = {}
    for device in devices:
        fixed, solve = users_command(device, out, solve=False), users_command(device, out, solve=True)
        runs[device] = {"fixed_50": fixed, "solve": solve}
        lines.append(f"| {device} | {fixed['backend']}, {fixed['num_envs']} | {fixed['steps_per_second']:,.0f} | "
                     f"{solve['solved_at_step'] or 0:,} | {solve['whole_seconds']:.1f} | "
                     f"{solve['eval_return']:.1f} |")
        print(lines[-1], flush=True)
    if not gpu:
        lines += ["", "No CUDA device here: the GPU rows are missing, not zero."]
    report = "\n".join([f"Machine: {ppo.versions()} {'GPU: ' + gpu if gpu else 'no GPU'}.", ""] + lines)
    print(report)
    (out / "env_bench.md").write_text(report + "\n")
    (out / "env_bench.json").write_text(json.dumps({"raw": raw, "runs": runs, "gpu": gpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
