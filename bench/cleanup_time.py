"""Seconds from SIGTERM to exit: how long the clean-up after a signal takes, at the defaults.

    python bench/cleanup_time.py --after 20 --runs 5      # a run 20 iterations in
    python bench/cleanup_time.py --after 1900 --runs 2    # near the end of the user's --episodes 2000

Each run is `ppo_cartpole.py --seed S` in a child process (plot on; after a signal no GIF is made),
signalled once it has logged --after iterations. The grace periods to fit: docker stop 10 s,
SLURM 30 s, LSF's SIGINT-to-SIGTERM 10 s.
"""

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "ppo_cartpole.py"


def logged(out: Path) -> int:
    path = out / "metrics.csv"
    return sum(1 for _ in path.open()) - 1 if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=int, default=20, help="iterations logged before the signal")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seconds = []
    for seed in range(1, args.runs + 1):
        out = Path(tempfile.mkdtemp()) / "run"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--seed", str(seed), "--out-dir", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while logged(out) < args.after:
            time.sleep(0.05)
            assert proc.poll() is None, "the run ended before the signal"
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait()
        seconds.append(time.perf_counter() - start)
        print(f"seed {seed}: exit {status}, clean-up {seconds[-1]:.2f} s, files {sorted(p.name for p in out.iterdir())}")
    print(f"median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s over {args.runs} runs")


if __name__ == "__main__":
    main()
