"""Sweep of the CPU defaults by the measure that counts: whole-process seconds to solve CartPole-v1.

Each candidate is a few flags on top of today's defaults ("defaults" is none), run as
`python ppo_cartpole.py --seed S --stop-when-solved --no-plot --no-gif <flags>`, one process at a
time, seed-major (seed 1 of every candidate, then seed 2, ...) so that the machine's load falls on
every candidate alike. A run that does not solve in its 2000 iterations counts as unsolved (no
iteration cap here: --episodes would also shorten the annealed lr's schedule).
Prints, and writes to --out, a markdown table: median and max seconds to solve, median env steps and
iterations, solved count, and the median CPU seconds of the process (user + system: steadier than
wall seconds when other jobs share the machine). Stage 1 is coarse (3 seeds, every candidate); stage 2 takes the best few
on 10 seeds, the defaults always among them:

    python bench/sweep.py --seeds 3 --out bench/results/sweep-coarse
    python bench/sweep.py --seeds 10 --only defaults "epochs 6" "lr 5e-3" --out bench/results/sweep-fine
"""

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CANDIDATES = {
    "defaults": "",
    "16 envs, T 32": "--num-envs 16 --buffer-size 512 --minibatch-size 128",
    "32 envs, T 16": "--buffer-size 512 --minibatch-size 128",
    "32 envs, T 64": "--buffer-size 2048 --minibatch-size 512",
    "minibatch 128": "--minibatch-size 128",
    "minibatch 512": "--minibatch-size 512",
    "epochs 6": "--update-epochs 6",
    "epochs 10, minibatch 512": "--update-epochs 10 --minibatch-size 512",
    "lr 2e-3": "--lr 2e-3",
    "lr 5e-3": "--lr 5e-3",
    "lr constant": "--no-anneal-lr",
    "gamma 0.99": "--gamma 0.99",
    "lambda 0.9": "--gae-lambda 0.9",
    "lambda 0.95": "--gae-lambda 0.95",
    "clip 0.3": "--clip-eps 0.3",
    "the post's entropy schedule": "--entropy-coef 0.02 --entropy-floor 0.001",
    "lr 5e-3, lambda 0.9": "--lr 5e-3 --gae-lambda 0.9",
    "rl-zoo's shape (8 x 32, 20 epochs of 1)": "--num-envs 8 --buffer-size 256 --minibatch-size 256 "
                                               "--update-epochs 20 --lr 1e-3 --gamma 0.98",
    # Stage 3, after the script took its own Adam (docs/sweep.md): around lr 5e-3, and whole-batch steps.
    "lr 7e-3": "--lr 7e-3",
    "epochs 3, lr 5e-3": "--update-epochs 3 --lr 5e-3",
    "T 16, whole batch x 8, lr 5e-3": "--buffer-size 512 --minibatch-size 512 --update-epochs 8 --lr 5e-3",
    "T 16, whole batch x 8": "--buffer-size 512 --minibatch-size 512 --update-epochs 8",
    "T 8, whole batch x 8, lr 5e-3": "--buffer-size 256 --minibatch-size 256 --update-epochs 8 --lr 5e-3",
}


def run(flags: str, seed: int, out: Path) -> dict:
    """One run of the script; whole-process seconds from launch to exit, and its summary's figures."""
    run_dir = out / "runs" / f"{flags.replace(' ', '_') or 'defaults'}__seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, str(ROOT / "ppo_cartpole.py"), "--seed", str(seed), "--stop-when-solved", "--no-plot",
               "--no-gif", "--out-dir", str(run_dir), *flags.split()]
    launch, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - launch
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    summary = json.loads((run_dir / "summary.json").read_text())
    solved = summary["solved_at_step"] is not None
    return dict(seconds=seconds if solved else None, cpu_seconds=cpu_seconds if solved else None,
                steps=summary["solved_at_step"],
                iterations=summary["solved_at_iteration"] + 1 if solved else None)


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| candidate | flags | solved | median s to solve | max s | median CPU s | median env steps | "
            "max env steps | median iterations |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        solved = [r for r in runs if r["seconds"] is not None]
        fmt = lambda values, spec: format(statistics.median(values), spec) if values else "-"  # noqa: E731
        worst = lambda values, spec: format(max(values), spec) if values else "-"  # noqa: E731
        seconds, cpu, steps, iterations = ([r.get(k) for r in solved] for k in ("seconds", "cpu_seconds", "steps",
                                                                                  "iterations"))
        rows.append(f"| {name} | `{CANDIDATES[name] or '(none)'}` | {len(solved)}/{len(runs)} | {fmt(seconds, '.1f')} | "
                    f"{worst(seconds, '.1f') if len(solved) == len(runs) else 'unsolved'} | "
                    f"{fmt(cpu, '.1f') if None not in cpu else '-'} | {fmt(steps, ',.0f')} | "
                    f"{worst(steps, ',.0f')} | {fmt(iterations, '.0f')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="these candidates (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep")
    args = parser.parse_args()
    names = args.only or list(CANDIDATES)
    results = {name: [] for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for seed in range(1, args.seeds + 1):
        for name in names:
            results[name].append(run(CANDIDATES[name], seed, args.out))
            print(f"seed {seed}, {name}: {results[name][-1]}", flush=True)
    text = (f"`python bench/sweep.py {' '.join(sys.argv[1:])}`: {time.perf_counter() - start:.0f} s wall, "
            f"one run at a time.\n\n{table(results)}\n")
    (args.out / "sweep.md").write_text(text)
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
