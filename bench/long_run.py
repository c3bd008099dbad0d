"""Does the user's run stay solved? N seeds of `ppo_cartpole.py --episodes 2000` on one backend.

The design card's command runs 2000 iterations, about 20 times what a solve needs. This runs it
for seeds 1..N, two processes at a time, and reports per seed what happens after the solve:

    solve        env steps to the solve (mean of the last 100 training returns >= target)
    after solve  mean return of every training episode that ended after the solve
    last 10%     mean return of the last 10% of the run's training episodes
    min last-100 the lowest last-100 mean after the solve (a collapse shows here)
    final.pt     the final weights, greedy, on 20 evaluation episodes
    best.pt      the saved best policy, greedy (the run's own evaluation)

The goal (issue "the user's run stays solved"): after solve, last 10% and final.pt >= 475, and
min last-100 >= 400. Each seed's run folder is kept under --out/<label>/<backend>/seed<S> and
reused if it is complete, so a table can be redrawn without rerunning. --figure draws every
label and backend found under --out side by side: last-100 mean against env steps, solve marked.

    python bench/long_run.py --backend gymnasium --seeds 10 --label after
    python bench/long_run.py --backend torch --seeds 3 --label after      # ~3 min a seed on 2 cores
    python bench/long_run.py --figure assets/long_run.png
    python bench/long_run.py --label before --script /tmp/before/ppo_cartpole.py ...   # another version
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo_cartpole  # noqa: E402  (for load_agent and evaluate)

GOAL_MEAN, GOAL_FLOOR = 475.0, 400.0
FINAL_EVAL_EPISODES = 20
CURVE_POINTS = 600  # the stored curve is thinned to about this many points


def run_seed(script: str, backend: str, seed: int, iterations: int, run_dir: Path, extra: list[str]) -> float:
    """One long run in its own process; returns its wall seconds (0 if the folder was complete)."""
    if (run_dir / "summary.json").exists() and (run_dir / "final.pt").exists():
        return 0.0
    if run_dir.exists():
        raise SystemExit(f"error: {run_dir} holds an incomplete run; remove it first")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, script, "--seed", str(seed), "--episodes", str(iterations), "--device", "cpu",
               "--env-backend", backend, "--no-gif", "--out-dir", str(run_dir), *extra]
    start = time.perf_counter()
    with open(run_dir.parent / f"seed{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def seed_stats(run_dir: Path, seed: int) -> dict:
    """The table's numbers for one run folder, and its thinned last-100 curve."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["env_step"]) for r in rows])
    returns = np.array([float(r["return"]) for r in rows])
    mean100 = np.array([float(r["mean100_return"]) for r in rows])
    solved = summary["solved_at_step"]
    after = steps > solved if solved is not None else np.zeros(len(rows), bool)
    last = returns[-max(1, len(returns) // 10):]
    net, config = ppo_cartpole.load_agent(run_dir / "final.pt")
    final_greedy = ppo_cartpole.evaluate(net, config["env_id"], FINAL_EVAL_EPISODES,
                                         seed + ppo_cartpole.EVAL_SEED_OFFSET).mean()
    keep = np.unique(np.linspace(0, len(rows) - 1, CURVE_POINTS).astype(int))
    # the lowest point of the curve must survive the thinning: it is what a collapse looks like
    if after.any():
        keep = np.union1d(keep, [int(np.argmin(np.where(after, mean100, np.inf)))])
    return dict(
        seed=seed, solved_at_step=solved, episodes=len(rows), env_steps=summary["env_steps"],
        seconds=summary["seconds"],
        after_solve_mean=float(returns[after].mean()) if after.any() else None,
        last10_mean=float(last.mean()), last10_all_solved=bool((last >= GOAL_MEAN).all()),
        min_mean100_after_solve=float(mean100[after].min()) if after.any() else None,
        final_greedy=float(final_greedy), best_greedy=summary["eval_return_mean"],
        curve=dict(steps=steps[keep].tolist(), mean100=mean100[keep].round(1).tolist()))


def meets_goal(s: dict) -> bool:
    return (s["solved_at_step"] is not None and s["after_solve_mean"] >= GOAL_MEAN and s["last10_mean"] >= GOAL_MEAN
            and s["min_mean100_after_solve"] >= GOAL_FLOOR and s["final_greedy"] >= GOAL_MEAN)


def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(stats: list[dict], label: str, backend: str) -> str:
    lines = [f"**{label}, {backend} backend**", "",
             "| seed | solve (env steps) | after solve: mean | last 10% | min last-100 after solve "
             "| final.pt greedy | best.pt greedy | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| {s['seed']} | {fmt(s['solved_at_step'], 0)} | {fmt(s['after_solve_mean'])} "
                     f"| {fmt(s['last10_mean'])} | {fmt(s['min_mean100_after_solve'])} | {fmt(s['final_greedy'])} "
                     f"| {fmt(s['best_greedy'])} | {'yes' if meets_goal(s) else '**no**'} |")
    median = lambda key: fmt(statistics.median([s[key] for s in stats if s[key] is not None] or [None]), 0 if key == "solved_at_step" else 1)  # noqa: E731
    worst = lambda key: fmt(min([s[key] for s in stats if s[key] is not None] or [None]))  # noqa: E731
    lines.append(f"| median | {median('solved_at_step')} | {median('after_solve_mean')} | {median('last10_mean')} "
                 f"| {median('min_mean100_after_solve')} | {median('final_greedy')} | {median('best_greedy')} "
                 f"| {sum(map(meets_goal, stats))}/{len(stats)} |")
    lines.append(f"| worst | | {worst('after_solve_mean')} | {worst('last10_mean')} "
                 f"| {worst('min_mean100_after_solve')} | {worst('final_greedy')} | {worst('best_greedy')} | |")
    return "\n".join(lines)


def plot(out: Path, path: Path):
    """One panel per (backend, label) found under out: every seed's last-100 mean, solve marked.
    Columns: "before", then other labels by name, then "after"; rows: gymnasium, then torch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    stage = {"before": 0, "after": 2}  # columns: before, any steps between (by name), after
    found = sorted(out.glob("*/*/stats.json"), key=lambda p: (p.parent.name != "gymnasium", p.parent.name,
                                                               stage.get(p.parent.parent.name, 1), p.parent.parent.name))
    backends = list(dict.fromkeys(p.parent.name for p in found))
    labels = list(dict.fromkeys(p.parent.parent.name for p in found))
    fig = Figure(figsize=(6 * len(labels), 3.6 * len(backends)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(backends), len(labels), sharey=True, squeeze=False))
    for p in found:
        ax = axes[backends.index(p.parent.name), labels.index(p.parent.parent.name)]
        stats = json.loads(p.read_text())
        for i, s in enumerate(stats):
            color = f"C{i % 10}"
            ax.plot(s["curve"]["steps"], s["curve"]["mean100"], color=color, lw=1, label=f"seed {s['seed']}")
            if s["solved_at_step"] is not None:
                ax.plot(s["solved_at_step"], GOAL_MEAN, "o", color=color, ms=4)
        ax.axhline(GOAL_MEAN, color="black", ls="--", lw=1)
        ax.axhline(GOAL_FLOOR, color="gray", ls=":", lw=1)
        ok = sum(map(meets_goal, stats))
        c = json.loads((p.parent / f"seed{stats[0]['seed']}" / "summary.json").read_text())["config"]
        norm = "on" if c.get("normalize_advantages", True) else "off"  # a version without the flag normalised
        ax.set_title(f"{p.parent.parent.name}, {p.parent.name} backend: {ok}/{len(stats)} seeds meet the goal\n"
                     f"{c['num_envs']} envs x {c['buffer_size'] // c['num_envs']} steps, minibatch {c['minibatch_size']}, "
                     f"gamma {c['gamma']}, lr {c['lr']:g}, advantage normalisation {norm}", fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylabel("mean of last 100 returns")
        ax.set_ylim(0, 520)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=7, ncol=2)
    fig.suptitle("--episodes 2000: after the solve (dots; dashed = target 475, dotted = 400)")
    fig.savefig(path, dpi=80)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("gymnasium", "torch"), default="gymnasium")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 1..N")
    parser.add_argument("--episodes", type=int, default=2000, help="iterations per run (the user's 2000)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--label", default="after", help="a name for this version: before, after, ...")
    parser.add_argument("--script", default=str(ROOT / "ppo_cartpole.py"), help="the ppo_cartpole.py to run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_run")
    parser.add_argument("--figure", type=Path, help="only draw every result under --out into this PNG")
    args, extra = parser.parse_known_args(argv)  # unknown flags go to ppo_cartpole.py
    if args.figure:
        plot(args.out, args.figure)
        print(f"wrote {args.figure}")
        return 0

    folder = args.out / args.label / args.backend
    seeds = range(1, args.seeds + 1)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda s: run_seed(args.script, args.backend, s, args.episodes, folder / f"seed{s}", extra),
                      seeds))
    stats = [seed_stats(folder / f"seed{s}", s) for s in seeds]
    (folder / "stats.json").write_text(json.dumps(stats))
    text = table(stats, args.label, args.backend)
    command = " ".join(["python bench/long_run.py", *(argv if argv is not None else sys.argv[1:])])
    text += f"\n\n`{command}`: {time.perf_counter() - start:.0f} s wall, {args.jobs} runs at a time.\n"
    (folder / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
