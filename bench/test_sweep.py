"""bench/sweep.py's table: medians and maxima of the solved runs, an unsolved run said as such."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402


def test_the_table_gives_medians_and_the_worst_of_the_solved_runs_and_counts_the_unsolved():
    results = {"defaults": [dict(seconds=5.0, cpu_seconds=5.5, steps=100_000, iterations=98),
                            dict(seconds=7.0, cpu_seconds=6.5, steps=140_000, iterations=137),
                            dict(seconds=6.0, cpu_seconds=7.5, steps=120_000, iterations=118)],
               "lr 5e-3": [dict(seconds=4.0, steps=80_000, iterations=79), dict(seconds=None, steps=None,
                                                                                 iterations=None)]}
    rows = sweep.table(results).splitlines()
    assert rows[2] == "| defaults | `(none)` | 3/3 | 6.0 | 7.0 | 6.5 | 120,000 | 140,000 | 118 |"
    assert rows[3] == "| lr 5e-3 | `--lr 5e-3` | 1/2 | 4.0 | unsolved | - | 80,000 | 80,000 | 79 |"
