"""What each detail is worth: the post's defects and PPO's details, one change at a time.

Every variant is one change from ppo_cartpole.py's defaults: a flag, or (the post's defects, the
default init) one piece of the script swapped for the variant in bench/defects.py. Each runs for
a fixed budget of env steps on several seeds, two processes at a time, and stops early once
solved (last-100 mean >= 475). Prints and writes a table (median and interquartile range of
steps to solve, seeds solved, best and final last-100 mean; sorted by cost) and draws the
last-100 mean against env steps, median over seeds with the interquartile band, the defects on
one panel and the details on the other.

    python bench/ablations.py                    # the whole study: ~15 min on 2 cores
    python bench/ablations.py --quick            # a smoke run: 3 variants, 1 seed, small budget
"""

import argparse
import csv
import itertools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import ppo_cartpole as ppo  # noqa: E402

OURS = "ours (the defaults)"
# (name, panel, flags, patch from bench/defects.py or None). Each is one change from the defaults.
VARIANTS = [
    (OURS, "both", "", None),
    ("reset every rollout", "defects", "", "reset every rollout"),
    ("flat buffer GAE", "defects", "", "flat buffer GAE"),
    ("averaged bootstrap", "defects", "", "averaged bootstrap"),
    ("truncation as termination", "defects", "", "truncation as termination"),
    ("autoreset steps stored", "defects", "", "autoreset steps stored"),
    ("post's settings, defects fixed", "defects", ppo.POST_SETTINGS, None),
    ("the post as published", "defects", ppo.POST_SETTINGS, "all defects"),
    ("advantage normalisation (the post's)", "details", "--normalize-advantages", None),
    ("PyTorch's default init", "details", "", "default init"),
    ("value clip 0.2 (the post's)", "details", "--value-clip-eps 0.2", None),
    ("no gradient clipping", "details", "--max-grad-norm 0", None),
    ("no lr annealing", "details", "--no-anneal-lr", None),
    ("gamma 0.98 (the zoo's)", "details", "--gamma 0.98", None),
    ("entropy bonus 0.01", "details", "--entropy-coef 0.01 --entropy-floor 0.01", None),
    ("the post's entropy annealing, 0.02 to 0.001", "details", "--entropy-coef 0.02 --entropy-floor 0.001", None),
    ("KL early stop 0.02", "details", "--target-kl 0.02", None),
    ("2 epochs", "details", "--update-epochs 2", None),
    ("8 epochs", "details", "--update-epochs 8", None),
    ("minibatch 64", "details", "--minibatch-size 64", None),
    ("minibatch 1024", "details", "--minibatch-size 1024", None),
]
QUICK = [OURS, "truncation as termination", "no lr annealing"]
GRID = 200  # points of the median curve


def child(name: str, seed: int, budget: int, out_dir: str) -> None:
    """One run of one variant, in this process: patch, then train until solved or out of budget."""
    _, _, flags, patch = next(v for v in VARIANTS if v[0] == name)
    if patch:
        import defects

        defects.install(patch)
    config, run_config = ppo.parse_args([*shlex.split(flags), "--seed", str(seed), "--stop-when-solved",
                                         "--confirm-episodes", "0", "--device", "cpu", "--no-plot", "--no-gif",
                                         "--eval-episodes", "1", "--out-dir", out_dir])
    budget_iterations = max(1, budget // config.buffer_size)
    # The lr schedule still runs over --episodes: only the loop over them is cut short.
    real_iterations = ppo.ppo_iterations
    ppo.ppo_iterations = lambda *args: itertools.islice(real_iterations(*args), budget_iterations)
    ppo.train(config, run_config)


def run(name: str, seed: int, budget: int, folder: Path) -> dict:
    run_dir = folder / f"{slug(name)}__seed{seed}"
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():  # a run that did not finish: start it again
            shutil.rmtree(run_dir)
        command = [sys.executable, __file__, "--child", name, "--seed", str(seed), "--budget", str(budget),
                   "--out", str(run_dir)]
        child_run = subprocess.run(command, capture_output=True, text=True)
        if child_run.returncode:
            raise SystemExit(f"error: variant {name!r}, seed {seed} failed:\n{child_run.stderr[-3000:]}")
    with open(run_dir / "episodes.csv") as f:
        rows = [(int(r["env_step"]), float(r["mean100_return"])) for r in csv.DictReader(f)]
    summary = json.loads((run_dir / "summary.json").read_text())
    steps, mean100 = (np.array(x) for x in zip(*rows)) if rows else (np.zeros(0), np.zeros(0))
    return dict(name=name, seed=seed, solved_at_step=summary["solved_at_step"], env_steps=summary["env_steps"],
                best_mean100=float(mean100.max()) if rows else None,
                final_mean100=float(mean100[-1]) if rows else None, steps=steps.tolist(), mean100=mean100.tolist())


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def curve_on_grid(r: dict, grid: np.ndarray) -> np.ndarray:
    """A run's last-100 mean at each grid step (held after a solved run stopped; NaN before its
    first episode)."""
    if not r["steps"]:
        return np.full(len(grid), np.nan)
    index = np.searchsorted(r["steps"], grid, side="right") - 1
    return np.where(index >= 0, np.asarray(r["mean100"])[np.maximum(index, 0)], np.nan)


def summarise(name: str, runs: list[dict], budget: int) -> dict:
    solved = [r["solved_at_step"] for r in runs if r["solved_at_step"] is not None]
    quartiles = np.percentile(solved, [25, 50, 75]) if solved else [None] * 3
    cost = statistics.median([r["solved_at_step"] or 2 * budget for r in runs])  # an unsolved run counts twice the budget
    return dict(name=name, seeds=len(runs), solved=len(solved), q1=quartiles[0], median=quartiles[1], q3=quartiles[2],
                best=max(r["best_mean100"] or 0 for r in runs), final=statistics.median(r["final_mean100"] or 0 for r in runs),
                cost=cost)


def table(rows: list[dict], budget: int) -> str:
    lines = ["| variant | steps to solve: median (IQR) | solved | best last-100 mean | final last-100 mean (median) |",
             "|---|---|---|---|---|"]
    for s in sorted(rows, key=lambda s: (s["name"] != OURS, s["cost"])):
        if s["solved"]:
            steps = f"{s['median'] / 1e3:,.0f}k ({s['q1'] / 1e3:,.0f}k-{s['q3'] / 1e3:,.0f}k)"
            steps += "" if s["solved"] == s["seeds"] else f", {s['seeds'] - s['solved']} never"
        else:
            steps = f"never in {budget / 1e3:,.0f}k; best last-100 mean {s['best']:.0f}"
        name = f"**{s['name']}**" if s["name"] == OURS else s["name"]
        lines.append(f"| {name} | {steps} | {s['solved']}/{s['seeds']} | {s['best']:.0f} | {s['final']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], budget: int, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    grid = np.linspace(0, budget, GRID)
    fig = Figure(figsize=(16, 6), layout="constrained")
    axes = dict(zip(("defects", "details"), fig.subplots(1, 2, sharey=True)))
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive",
                                     "cyan")] + ["gold", "navy", "lime", "magenta"]
    colors = {panel: iter(palette) for panel in axes}
    for name, panel, _, _ in VARIANTS:
        if name not in results:
            continue
        curves = np.array([curve_on_grid(r, grid) for r in results[name]])
        with warnings.catch_warnings():  # before a run's first episode ends, a grid step has no value yet
            warnings.simplefilter("ignore", RuntimeWarning)
            low, median, high = np.nanpercentile(curves, [25, 50, 75], axis=0)
        for ax in (axes.values() if panel == "both" else [axes[panel]]):
            color = "black" if name == OURS else next(colors[panel])
            ax.plot(grid, median, color=color, lw=2.2 if name == OURS else 1.3, label=name)
            ax.fill_between(grid, low, high, color=color, alpha=0.12)
    for panel, ax in axes.items():
        ax.axhline(475, color="gray", ls="--", lw=1)
        ax.set_title("the post's defects, each alone" if panel == "defects" else "PPO's details, each toggled")
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes["defects"].set_ylabel("mean of the last 100 returns (median over seeds, IQR band)")
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=500_000, help="env steps per run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 variants, 1 seed, 4,096 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ablations")
    parser.add_argument("--figure", type=Path, default=None, help="default: assets/ablations.png (--quick: in --out)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seed, args.budget, str(args.out))
        return 0
    if args.quick:
        args.seeds, args.budget = 1, 4_096
    names = QUICK if args.quick else [v[0] for v in VARIANTS]
    figure = args.figure or (args.out / "ablations.png" if args.quick else ROOT / "assets" / "ablations.png")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(name, seed) for name in names for seed in range(1, args.seeds + 1)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run(*job, args.budget, args.out / "runs"), jobs))
    results = {name: [r for r in runs if r["name"] == name] for name in names}
    rows = [summarise(name, results[name], args.budget) for name in names]
    text = table(rows, args.budget)
    command = " ".join(["python bench/ablations.py", *(sys.argv[1:] if argv is None else argv)])
    text += (f"\n\n`{command}`: {len(names)} variants x {args.seeds} seeds, {args.budget:,} env steps at most, "
             f"{time.perf_counter() - start:.0f} s wall with {args.jobs} processes at a time.\n")
    (args.out / "ablations.md").write_text(text)
    (args.out / "ablations.json").write_text(json.dumps(rows, indent=1))
    plot(results, args.budget, figure)
    print(text)
    print(f"wrote {args.out / 'ablations.md'} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
