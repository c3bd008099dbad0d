"""`make mutate`: plant single-line bugs in PPO with mutmut and count how many the fast tests catch.

The scope is the algorithm part of ppo_cartpole.py (everything above its banner) plus
make_envs, NumpyToTorch, TorchCartPole, ReturnTracker, BestPolicy, the script's Adam, train, its divergence check
(nonfinite) and its Ending, how a run ends: out_of_memory, describe, catch_ending_signals,
BestEffort, and why it did not learn: diagnose, its rules (DIAGNOSES) and their helpers later_half
and mean_of. A mutant that survives must be killed by a new test or listed in mutation/explained.md
with its one-line reason (equivalent, or CUDA-only).

    python mutation/score.py            # run mutmut on the scope, then print the score
    python mutation/score.py --count    # only count the last run's results
    python mutation/score.py --recheck  # rerun the timeouts one at a time, then count
    python mutation/score.py --renumber # after a code change: entries follow their lines to new numbers

mutmut's verdicts can flip between "survived" and "timeout" when the machine is loaded, so
timeouts are counted apart, and --recheck runs them again alone.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import functools
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPLAINED = Path(__file__).resolve().parent / "explained.md"
MODULE = "ppo_cartpole"
# Not `option`: it runs only while the module is imported, before mutmut switches a mutant on.
FUNCTIONS = ["make_envs", "layer_init", "compute_gae", "clipped_surrogate_loss", "value_loss", "approx_kl",
             "explained_variance", "lr_at", "entropy_coef_at", "minibatch_loss", "ppo_update", "ppo_iterations",
             "nonfinite", "train", "out_of_memory", "describe", "catch_ending_signals", "later_half", "mean_of",
             "policy_collapsed", "policy_frozen", "entropy_bonus_dominates", "horizon_too_short", "critic_not_learning",
             "diagnose"]
CLASSES = ["NumpyToTorch", "ActorCritic", "Collector", "ReturnTracker", "BestPolicy", "TorchCartPole", "Ending",
           "BestEffort", "Adam"]
PATTERNS = ([f"{MODULE}.x_{name}__mutmut_*" for name in FUNCTIONS]
            + [f"{MODULE}.x\u01c1{name}\u01c1*" for name in CLASSES])  # mutmut names a method xǁClassǁmethod


def mutmut(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, text=True, **kwargs)


def results() -> dict[str, str]:
    """Every mutant of the last run in scope -> its status ("killed", "survived", "timeout", ...)."""
    out = mutmut("results", "--all", "true", capture_output=True, check=True).stdout
    statuses = dict(re.findall(r"^\s*(\S+): (.+)$", out, re.MULTILINE))
    return {name: status for name, status in statuses.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in PATTERNS)}


def explained() -> dict[str, tuple[str, str, str]]:
    """mutation/explained.md's entries: name -> (kind, the line the mutant makes, reason).

    Each entry is two lines:  - `name` (kind): reason   then, indented, the mutated line (or its
    code without the comment) in backticks.
    """
    entries = re.findall(r"^- `(\S+)` \((equivalent|CUDA-only)\): (.+)\n\s+`(.+)`$", EXPLAINED.read_text(), re.MULTILINE)
    return {name: (kind, line, reason) for name, kind, reason, line in entries}


@functools.cache  # one `mutmut show` (about a second) per mutant, however often renumber asks
def mutated_line(name: str) -> str:
    """The first added line of `mutmut show name`'s diff, stripped of indentation."""
    diff = mutmut("show", name, capture_output=True, check=True).stdout
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def report(statuses: dict[str, str]) -> int:
    """Print the score; 0 if every survivor is explained and every explanation still fits, else 1."""
    counts = collections.Counter(statuses.values())
    notes = explained()
    survivors = sorted(name for name, status in statuses.items() if status in ("survived", "no tests"))
    listed = [name for name in survivors if name in notes]
    stale = [name for name, (kind, line, _) in notes.items()
             if statuses.get(name) not in ("survived", "no tests") or line not in mutated_line(name)]
    unexplained = [name for name in survivors if name not in notes or name in stale]
    by_kind = collections.Counter(notes[name][0] for name in listed if name not in stale)
    killed = counts["killed"]
    total = len(statuses)
    print(f"\nmutants in scope: {total}")
    for status, count in sorted(counts.items()):
        print(f"  {status}: {count}")
    print(f"  of the survivors, explained in {EXPLAINED.name}: {by_kind['equivalent']} equivalent, "
          f"{by_kind['CUDA-only']} CUDA-only ({100 * by_kind['equivalent'] / max(total, 1):.1f}% equivalent)")
    scored = total - sum(by_kind.values())
    print(f"score: {killed}/{scored} killed ({100 * killed / max(scored, 1):.1f}%) of the mutants not explained")
    for name in unexplained:
        print(f"  unexplained survivor: {name}")
    for name in stale:
        print(f"  stale entry in {EXPLAINED.name} (killed now, or another line): {name}")
    for name in sorted(n for n, s in statuses.items() if s == "timeout"):
        print(f"  timeout (recheck with --recheck): {name}")
    return 0 if not unexplained and not stale and counts["timeout"] == 0 else 1


def renumber(statuses: dict[str, str]) -> None:
    """Point each stale entry of explained.md at the survivor of the same function that now makes
    its line (mutmut renumbers a function's mutants when its code changes)."""
    notes, text, moves = explained(), EXPLAINED.read_text(), {}
    survivors = [name for name, status in statuses.items() if status in ("survived", "no tests") and name not in notes]
    for name, (_, line, _) in notes.items():
        if statuses.get(name) in ("survived", "no tests") and line in mutated_line(name):
            continue
        function = name.rsplit("__mutmut_", 1)[0]
        matches = [s for s in survivors if s.rsplit("__mutmut_", 1)[0] == function and line in mutated_line(s)]
        if len(matches) == 1:
            moves[name] = matches[0]
            survivors.remove(matches[0])
            print(f"  {name} -> {matches[0]}")
    # One pass, so that a name moved onto another entry's old name is not moved twice.
    EXPLAINED.write_text(re.sub(r"^- `(\S+)`", lambda m: f"- `{moves.get(m[1], m[1])}`", text, flags=re.MULTILINE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", action="store_true", help="count the last run's results, run nothing")
    parser.add_argument("--recheck", action="store_true", help="rerun the last run's timeouts alone, then count")
    parser.add_argument("--renumber", action="store_true", help="after a code change, move explained.md's entries "
                        "to the mutants that now make their lines, then count")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.renumber:
        renumber(results())
    elif args.recheck:
        timeouts = [name for name, status in results().items() if status == "timeout"]
        if timeouts:
            mutmut("run", "--max-children", "1", *timeouts, stdout=subprocess.DEVNULL)
    elif not args.count:
        mutmut("run", *PATTERNS, stdout=subprocess.DEVNULL, check=True)
    status = report(results())
    if not (args.count or args.renumber):
        print(f"took {time.perf_counter() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
