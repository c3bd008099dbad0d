"""When PPO fails: the ways of breaking it, each a flag or two from the defaults, beside a healthy run, on two envs.

Runs `ppo_cartpole.py` as a learner would, one command line per run, on CartPole-v1 and Acrobot-v1
(3 actions, -1 a step, 500-step episodes): the defaults until solved, each failure mode for 150
iterations, and the healthy runs cut short (the defaults for 30 iterations; on CartPole the torch
backend too, which is CartPole's alone), 3 seeds each, one process at a time, on the CPU. Each run
prints (and writes to summary.json) its own diagnosis; this script checks the calibration of the
script's DIAGNOSES on them: every run of a failure mode gets its own rule's message and no
other, and the healthy runs get none, nor would at any iteration before they solve. It writes
the gallery's tables and the figures: per env and failure mode, its diagnostic panels beside the
healthy runs' (docs/failures.md).

    python bench/failures.py                         # both galleries: 45 runs, about 12 min on 2 cores
    python bench/failures.py --envs Acrobot-v1       # one
    python bench/failures.py --seeds 1               # a smaller one
"""

import argparse
import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ppo_cartpole as ppo  # noqa: E402

HEALTHY = "healthy"
# Per env: its modes, each (name, flags, the rule of ppo.DIAGNOSES its runs must get (None: no diagnosis),
# the figures that give it away), the healthy run first; then the healthy runs cut short before their solve,
# which must get no diagnosis. Every run adds --env-id.
GALLERIES = {
    "CartPole-v1": dict(modes=[
        (HEALTHY, "--stop-when-solved", None, "entropy falls slowly, 0.69 to ~0.37 at the solve; approx KL ~0.01; "
         "explained variance near 1 from ~30k steps"),
        ("lr far too high", "--lr 1 --episodes 150", "policy_collapsed",
         "the first update: approx KL 10 to 100, clip fraction ~0.9; then entropy below 0.1 and KL ~0 (one action), "
         "or entropy near 0.69 with explained variance exactly 0 (every hidden unit off: seed 1)"),
        ("lr far too low", "--lr 1e-5 --episodes 150", "policy_frozen",
         "approx KL ~1e-8 (healthy ~1e-2), clip fraction 0, entropy flat at 0.693"),
        ("entropy bonus too large", "--entropy-coef 20 --entropy-floor 20 --episodes 150", "entropy_bonus_dominates",
         "entropy flat at 0.68 with the coefficient at 20; approx KL ~2e-4; clip fraction 0"),
        ("horizon too short", "--gamma 0.8 --episodes 150", "horizon_too_short",
         "value loss ~0.005, 100 times below healthy; the last-100 mean rises to ~270, then slides back"),
        ("no value loss", "--value-coef 0 --episodes 150", "critic_not_learning",
         "explained variance below 0 throughout; value loss flat at ~9; entropy falls to ~0.03 while returns are "
         "under 150"),
    ], cut_short=[("defaults cut short", "--episodes 30"),
                  ("torch backend cut short", "--env-backend torch --episodes 30")]),
    "Acrobot-v1": dict(modes=[
        (HEALTHY, "--stop-when-solved", None, "entropy falls from 1.10 (ln 3) to ~0.2 at the solve; approx KL ~0.01 to "
         "0.04; explained variance below 0 (down to -2) for ~30 iterations, as the critic catches up, then near 1"),
        ("lr far too high", "--lr 1 --episodes 150", "policy_collapsed",
         "an early update: approx KL 190 to 460, clip fraction ~0.9; then one action (entropy ~0: seeds 1, 2), or "
         "entropy ~0.89 with explained variance within 0.01 of 0 (seed 3)"),
        ("lr far too low", "--lr 1e-5 --episodes 150", "policy_frozen",
         "approx KL ~1e-9, clip fraction 0, entropy flat at 1.099 (ln 3)"),
        ("entropy bonus too large", "--entropy-coef 20 --entropy-floor 20 --episodes 150", "entropy_bonus_dominates",
         "entropy flat at 1.098 with the coefficient at 20; approx KL ~6e-4; clip fraction 0"),
        ("horizon too short", "--gamma 0.5 --episodes 150", "horizon_too_short",
         "value loss ~3e-5 (healthy: 1.3 or more); explained variance ~-40, as every return is a hair from -2; "
         "the last-100 mean stays at -500"),
        ("no value loss", "--value-coef 0 --episodes 150", "critic_not_learning",
         "explained variance within 0.09 of 0 throughout (-0.02 on average); value loss flat at 9.6; policy loss "
         "flat at ~4.3, every advantage about -4.3"),
    ], cut_short=[("defaults cut short", "--episodes 30")]),
}
PANELS = [  # metrics.csv column, title, log scale
    ("mean100_return", "mean of the last 100 returns", False),
    ("policy_loss", "policy loss", False),
    ("value_loss", "value loss (log)", True),
    ("entropy", "entropy", False),
    ("approx_kl", "approx KL (log; 0 drawn at 1e-10)", True),
    ("clip_fraction", "clip fraction", False),
    ("explained_variance", "explained variance (clipped at -1)", False),
    ("lr", "lr (log); entropy coefficient (dashed, right)", True),
]
LOG_FLOOR = 1e-10  # a KL of exactly 0 (a policy that plays one action) on a log axis
# The gallery's runs kept small for the fast tests (bench/test_failures.py): the columns the rules
# read, a healthy run up to its solve. <env id>/<mode's slug>__seed<S>.csv
FIXTURES = ROOT / "bench" / "gallery"
FIXTURE_COLUMNS = ["iteration", "approx_kl", "entropy", "entropy_coef", "value_loss", "explained_variance"]


def rel(path: Path) -> str:
    """path as the reader of the report would type it: from the repository's root when it lies inside."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run(env_id: str, name: str, flags: str, seed: int, folder: Path) -> dict:
    """One run as a learner would start it, unless its folder already holds a finished one."""
    run_dir = folder / env_id / f"{slug(name)}__seed{seed}"
    command = ["ppo_cartpole.py", "--env-id", env_id, *shlex.split(flags), "--seed", str(seed), "--device", "cpu",
               "--no-gif", "--no-plot", "--out-dir", str(run_dir)]
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():  # a run that did not finish: start it again
            shutil.rmtree(run_dir)
        child = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"error: {env_id} {name!r}, seed {seed} failed:\n{child.stderr[-3000:]}")
        (run_dir / "stdout.txt").write_text(child.stdout)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((run_dir / "summary.json").read_text())
    printed = [line.removeprefix("why: ") for line in (run_dir / "stdout.txt").read_text().splitlines()
               if line.startswith("why: ")]
    return dict(env_id=env_id, name=name, seed=seed, rows=rows, summary=summary, printed=printed)


def healthy_cuts(r: dict) -> list[list[dict]]:
    """A healthy run's metrics cut at every iteration from 10 (the fewest ppo.diagnose judges) up to
    its solve, or its end: what a run stopped there would have to judge."""
    solved_at = r["summary"]["solved_at_iteration"]
    return [r["rows"][:n] for n in range(10, (len(r["rows"]) if solved_at is None else solved_at) + 1)]


def check(r: dict, rule: str | None) -> list[str]:
    """What is wrong with run r's diagnosis, if anything: it must be rule's message (none for None),
    the same in summary.json, on stdout and from ppo.diagnose on its metrics.csv; and a healthy run
    must get none cut at any iteration before its solve either."""
    problems = []
    expected = [] if rule is None else [getattr(ppo, rule)(r["rows"])]
    if expected == [None]:
        problems.append(f"{rule} does not hold")
    for where, got in (("summary.json", r["summary"]["diagnosis"]), ("stdout", r["printed"]),
                       ("diagnose", ppo.diagnose(r["rows"]))):
        if got != expected:
            problems.append(f"{where}: {got}")
    if rule is None:
        problems += [f"cut at {len(rows)} iterations: {ppo.diagnose(rows)}" for rows in healthy_cuts(r)
                     if ppo.diagnose(rows)]
    return [f"{r['env_id']} {r['name']}, seed {r['seed']}: {problem}" for problem in problems]


def write_fixture(r: dict, folder: Path) -> None:
    """Run r's metrics into `folder`/<its env id> (a folder that must exist), the columns the rules read
    (6 significant digits), up to its solve if it solved."""
    solved_at = r["summary"]["solved_at_iteration"]
    rows = r["rows"] if solved_at is None else r["rows"][:solved_at + 1]
    with open(folder / r["env_id"] / f"{slug(r['name'])}__seed{r['seed']}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIXTURE_COLUMNS)
        writer.writerows([row["iteration"], *(format(float(row[key]), ".6g") for key in FIXTURE_COLUMNS[1:])]
                         for row in rows)


def late_figures(rows: list[dict]) -> dict:
    """The figures the rules read, over the later half of a run (ppo.later_half); the peak KL over all of it."""
    late = ppo.later_half(rows)
    figures = {key: ppo.mean_of(late, key) for key in ("entropy", "approx_kl", "value_loss", "explained_variance")}
    figures["largest |explained variance|"] = max(abs(float(row["explained_variance"])) for row in late)
    figures["approx KL, its peak"] = max(float(row["approx_kl"]) for row in rows)
    figures["entropy / start"] = figures["entropy"] / float(rows[0]["entropy"])
    return figures


def calibration(results: dict[str, list[dict]], gallery: dict) -> str:
    """Each figure a rule reads: its range over each failure mode's runs, and over the healthy runs cut
    at every iteration from 10 up to their solve (or their end), the runs the rules must stay silent on."""
    healthy = [rows for name in [HEALTHY, *(name for name, _ in gallery["cut_short"])] for r in results[name]
               for rows in healthy_cuts(r)]
    columns = list(late_figures(results[HEALTHY][0]["rows"]))
    lines = ["| runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def spans(all_figures):
        return " | ".join(f"{min(f[c] for f in all_figures):.2g} to {max(f[c] for f in all_figures):.2g}"
                          for c in columns)
    lines.append(f"| healthy, cut at any iteration from 10 ({len(healthy)} cuts) | "
                 f"{spans([late_figures(rows) for rows in healthy])} |")
    for name, _, rule, _ in gallery["modes"][1:]:
        lines.append(f"| {name} (`{rule}`) | {spans([late_figures(r['rows']) for r in results[name]])} |")
    return "\n".join(lines)


def overlaps(results: dict[str, list[dict]]) -> str:
    """Which rules hold on each mode's runs, each rule by itself (ppo.diagnose takes the first that
    holds, in the order of ppo.DIAGNOSES): how many of the seeds."""
    names = [rule.__name__ for rule in ppo.DIAGNOSES]
    lines = ["| runs | " + " | ".join(f"`{name}`" for name in names) + " |", "|---" * (len(names) + 1) + "|"]
    for name in results:
        held = [sum(bool(rule(r["rows"])) for r in results[name]) for rule in ppo.DIAGNOSES]
        lines.append(f"| {name} | " + " | ".join(f"{count}/{len(results[name])}" if count else "" for count in held)
                     + " |")
    return "\n".join(lines)


def table(results: dict[str, list[dict]], gallery: dict) -> str:
    seeds = len(results[HEALTHY])
    lines = [f"| mode | flags | the figures that give it away | solved (seeds 1-{seeds}) | diagnosis |",
             "|---|---|---|---|---|"]
    for name, flags, rule, figures in gallery["modes"]:
        solved = ", ".join(f"{r['summary']['solved_at_step'] / 1e3:.0f}k" if r["summary"]["solved_at_step"] else "no"
                           for r in results[name])
        lines.append(f"| {name} | `{flags}` | {figures} | {solved} | {f'`{rule}`' if rule else 'none'} |")
    for name, flags in gallery["cut_short"]:
        solved = ", ".join("yes" if r["summary"]["solved_at_step"] else "no" for r in results[name])
        lines.append(f"| {name} | `{flags}` | healthy, stopped before its solve | {solved} | none |")
    return "\n".join(lines)


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([math.nan if row[key] in ("", None) else float(row[key]) for row in rows])


def plot(name: str, flags: str, runs: list[dict], healthy: list[dict], target: float, path: Path) -> None:
    """The diagnostic panels of one failure mode's runs (coloured) beside the healthy runs' (gray)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(16, 6.5), layout="constrained")
    axes = fig.subplots(2, 4, sharex=True).flatten()
    coef_axis = None  # the entropy coefficient, on the lr panel's right axis, when a run has one
    for group, color, label in ((healthy, "gray", "healthy: the defaults"), (runs, "tab:red", f"{name}: {flags}")):
        for index, r in enumerate(group):
            steps = column(r["rows"], "env_steps")
            for ax, (key, _, log) in zip(axes, PANELS):
                values = column(r["rows"], key)
                if key == "approx_kl":
                    values = np.maximum(values, LOG_FLOOR)
                if key == "explained_variance":
                    values = np.maximum(values, ppo.EV_FLOOR)
                ax.plot(steps, values, color=color, lw=1.2, alpha=0.8, label=label if index == 0 else None)
            coef = column(r["rows"], "entropy_coef")
            if np.nanmax(coef) > 0:
                coef_axis = coef_axis or axes[-1].twinx()
                coef_axis.plot(steps, coef, color=color, ls="--", lw=1.2)
                coef_axis.set_ylim(0, 1.1 * np.nanmax(coef))
    for ax, (key, title, log) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
    axes[0].axhline(target, color="black", ls=":", lw=1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    for ax in axes[4:]:
        ax.set_xlabel("env steps")
    fig.suptitle(f"{runs[0]['env_id']}: {name} (red, seeds 1-{len(runs)}) against the defaults (gray, seeds "
                 f"1-{len(healthy)}, each until solved)", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--envs", nargs="+", choices=list(GALLERIES), default=list(GALLERIES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "failures")
    parser.add_argument("--figures", type=Path, default=ROOT / "assets" / "failures",
                        help="a PNG per env and failure mode, <env id>/<mode>.png")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help="the runs' metrics, small, for the tests")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, problems = {}, []
    for env_id in args.envs:
        gallery, results[env_id] = GALLERIES[env_id], {}
        groups = [(name, flags, rule) for name, flags, rule, _ in gallery["modes"]] + [
            (name, flags, None) for name, flags in gallery["cut_short"]]
        for name, flags, rule in groups:
            results[env_id][name] = [run(env_id, name, flags, seed, args.out / "runs")
                                     for seed in range(1, args.seeds + 1)]
            for r in results[env_id][name]:
                problems += check(r, rule)
                print(f"{env_id} {name}, seed {r['seed']}: "
                      f"{'solved' if r['summary']['solved_at_step'] else 'not solved'}; "
                      f"diagnosis: {r['summary']['diagnosis'] or 'none'}", flush=True)
    seconds = time.perf_counter() - start
    command = " ".join(["python bench/failures.py", *(sys.argv[1:] if argv is None else argv)])
    runs = [r for by_name in results.values() for group in by_name.values() for r in group]
    training = sum(r["summary"]["seconds"] for r in runs)
    text = (f"`{command}`: {len(runs)} runs, one at a time, {training:.0f} s of training in all (each run's "
            f"`seconds`); this call took {seconds:.0f} s wall (a run already in {rel(args.out / 'runs')} is reused, "
            f"not rerun).\n")
    for env_id, by_name in results.items():
        gallery = GALLERIES[env_id]
        for name, flags, _, _ in gallery["modes"][1:]:
            plot(name, flags, by_name[name], by_name[HEALTHY], ppo.env_spec(env_id).reward_threshold,
                 args.figures / env_id / f"{slug(name)}.png")
        (args.fixtures / env_id).mkdir(parents=True, exist_ok=True)
        for group in by_name.values():
            for r in group:
                write_fixture(r, args.fixtures)
        text += (f"\n## {env_id}\n\n{table(by_name, gallery)}\n\nThe figures each rule reads, over the later half "
                 f"of the run (at most its last {ppo.DIAGNOSIS_WINDOW} iterations):\n\n"
                 f"{calibration(by_name, gallery)}\n\nEach rule by itself, on each mode's runs (seeds where it "
                 f"holds):\n\n{overlaps(by_name)}\n\nThe diagnosis of each failure mode's run (seed 1):\n\n"
                 + "\n".join(f"- {name}: {by_name[name][0]['summary']['diagnosis']}"
                             for name, *_ in gallery["modes"][1:]) + "\n")
    (args.out / "failures.md").write_text(text)
    print(f"\n{text}\nwrote {rel(args.out / 'failures.md')}, {rel(args.figures)}/ and {rel(args.fixtures)}/")
    for problem in problems:
        print(f"calibration: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
