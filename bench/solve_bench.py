"""Seconds to solve CartPole-v1: ppo_cartpole.py at its defaults against SB3 with rl-zoo's settings.

Runs N seeds of each, alternating (ours seed 1, SB3 seed 1, ours seed 2, ...), each in its own
process, so both see the same machine load. "Whole-process seconds to solve": for ours, from
launching `python ppo_cartpole.py --seed S --stop-when-solved --no-plot --no-gif` to its exit;
for SB3, from launching bench/sb3_cartpole.py to the moment its callback sees the solve.
Prints a markdown table and writes it, the raw numbers and a plot of the learning curves to --out.

    python bench/solve_bench.py --seeds 5 --out bench/results
"""

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def read_episodes(path: Path) -> list[tuple[int, float, float]]:
    """(env step, seconds in process, return) per training episode, from either runner's CSV."""
    with open(path) as f:
        return [(int(r["env_step"]), float(r["seconds"]), float(r["return"])) for r in csv.DictReader(f)]


def run_ours(seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"ours-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own run of an earlier time
    command = [sys.executable, str(ROOT / "ppo_cartpole.py"), "--seed", str(seed), "--stop-when-solved",
               "--no-plot", "--no-gif", "--out-dir", str(run_dir), *extra]
    launch = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    whole = time.perf_counter() - launch
    s = json.loads((run_dir / "summary.json").read_text())
    episodes = read_episodes(run_dir / "episodes.csv")
    return dict(solved_at_step=s["solved_at_step"], whole_seconds=whole if s["solved_at_step"] else None,
                in_process_seconds=s["solved_at_seconds"], collect_sps=s["collect_steps_per_second"],
                overall_sps=s["steps_per_second"], eval_return=s["eval_return_mean"], episodes=episodes)


def run_sb3(seed: int, out: Path) -> dict:
    episodes_csv = out / f"sb3-seed{seed}-episodes.csv"
    command = [sys.executable, str(ROOT / "bench" / "sb3_cartpole.py"), "--seed", str(seed),
               "--episodes-csv", str(episodes_csv)]
    launch_wall = time.time()
    proc = subprocess.run(command, check=True, capture_output=True, text=True)
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    episodes = read_episodes(episodes_csv)
    return dict(solved_at_step=s["solved_at_step"],
                whole_seconds=s["solved_wall"] - launch_wall if s["solved_wall"] else None,
                in_process_seconds=s["solved_at_seconds"], collect_sps=s["collect_steps_per_second"],
                overall_sps=s["steps_per_second"], eval_return=s["eval_return_mean"], episodes=episodes)


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=1):
    if value is None:
        return "-"
    return f"{value:,.0f}" if digits == 0 else f"{value:,.{digits}f}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = ["| run | seed | env steps to solve | whole-process s to solve | in-process s | "
             "collection env-steps/s | overall env-steps/s | best policy greedy return |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs):
            lines.append(f"| {name} | {seed} | {fmt(r['solved_at_step'], 0)} | {fmt(r['whole_seconds'])} | "
                         f"{fmt(r['in_process_seconds'])} | {fmt(r['collect_sps'], 0)} | {fmt(r['overall_sps'], 0)} | "
                         f"{fmt(r['eval_return'])} |")
        solved = sum(r["solved_at_step"] is not None for r in runs)
        lines.append(f"| **{name} median** | {solved}/{len(runs)} solved | {fmt(median(runs, 'solved_at_step'), 0)} | "
                     f"**{fmt(median(runs, 'whole_seconds'))}** | {fmt(median(runs, 'in_process_seconds'))} | "
                     f"{fmt(median(runs, 'collect_sps'), 0)} | {fmt(median(runs, 'overall_sps'), 0)} | "
                     f"{fmt(median(runs, 'eval_return'))} |")
    return "\n".join(lines)


def rolling_mean_100(returns: np.ndarray) -> np.ndarray:
    """Mean of the last (up to) 100 returns at each episode."""
    sums = np.cumsum(returns)
    counts = np.minimum(np.arange(1, len(returns) + 1), 100)
    shifted = np.concatenate([np.zeros(100), sums])[: len(returns)]
    return (sums - shifted) / counts


def plot_curves(results: dict[str, list[dict]], path: Path) -> None:
    """Mean of the last 100 returns, mean and range over seeds, against env steps and seconds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for (name, runs), color in zip(results.items(), ("tab:blue", "tab:orange")):
        for ax, column, label in ((axes[0], 0, "env steps"), (axes[1], 1, "seconds in process")):
            curves = [(np.array([e[column] for e in r["episodes"]]),
                       rolling_mean_100(np.array([e[2] for e in r["episodes"]]))) for r in runs if r["episodes"]]
            # from the point where every run has a first episode; a run that stopped at its solve
            # holds its last value
            grid = np.linspace(max(x[0] for x, _ in curves), max(x[-1] for x, _ in curves), 300)
            ys = np.array([np.interp(grid, x, y) for x, y in curves])
            ax.plot(grid, ys.mean(axis=0), color=color, label=f"{name} (mean of {len(curves)} seeds)")
            ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.2)
            ax.set_xlabel(label)
    for ax in axes:
        ax.axhline(475, color="black", ls="--", lw=1, label="solved: 475")
        ax.set_ylabel("mean of the last 100 training returns")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("CartPole-v1: time to solve, range over seeds shaded")
    fig.savefig(path, dpi=90)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N of each")
    parser.add_argument("--out", default="bench/results", help="folder for results.md, results.json, plot")
    parser.add_argument("--ours-args", default="", help="extra flags for ppo_cartpole.py (default: none)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("argument --seeds: must be a positive integer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, args.seeds + 1))
    results = {"ppo_cartpole": [], "SB3-zoo": []}
    for seed in seeds:
        results["ppo_cartpole"].append(run_ours(seed, out, args.ours_args.split()))
        results["SB3-zoo"].append(run_sb3(seed, out))
        ours, sb3 = results["ppo_cartpole"][-1], results["SB3-zoo"][-1]
        print(f"seed {seed}: ours {fmt(ours['whole_seconds'])} s ({fmt(ours['solved_at_step'], 0)} steps), "
              f"SB3 {fmt(sb3['whole_seconds'])} s ({fmt(sb3['solved_at_step'], 0)} steps)", flush=True)

    ours_median = median(results["ppo_cartpole"], "whole_seconds")
    sb3_median = median(results["SB3-zoo"], "whole_seconds")
    ratio = ours_median / sb3_median if ours_median and sb3_median else None
    command = f"python bench/solve_bench.py --seeds {args.seeds}"
    if args.ours_args:
        command += f" --ours-args='{args.ours_args}'"
    report = "\n".join([
        f"Machine: {machine()}. Command: `{command}`.",
        "",
        table(results, seeds),
        "",
        f"Median whole-process seconds to solve: ours {fmt(ours_median)}, SB3-zoo {fmt(sb3_median)}: "
        f"ratio **{fmt(ratio, 2)}** (target <= 0.5).",
    ])
    print(report)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(
        {name: [{k: v for k, v in r.items() if k != "episodes"} for r in runs] for name, runs in results.items()}
        | {"ratio": ratio, "machine": machine(), "command": command}, indent=2))
    plot_curves(results, out / "solve_curves.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'solve_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
