"""bench/long_run.py's numbers, checked on a hand-made run folder, and its figure."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import long_run  # noqa: E402
import ppo_cartpole as ppo  # noqa: E402


def fake_run(folder: Path, seed: int, solved, returns, mean100, steps, config=None):
    """A run folder as ppo_cartpole.py writes it: summary.json, episodes.csv, final.pt."""
    folder.mkdir(parents=True)
    config = config or dict(env_id="CartPole-v1", num_envs=32, buffer_size=1024, minibatch_size=256, gamma=0.995,
                             lr=0.002, normalize_advantages=False)
    (folder / "summary.json").write_text(json.dumps(dict(
        solved_at_step=solved, env_steps=steps[-1], seconds=1.0, eval_return_mean=500.0, config=config)))
    with open(folder / "episodes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_step", "return", "mean100_return"])
        writer.writerows(zip(steps, returns, mean100))
    torch.manual_seed(0)
    ppo.save_checkpoint(folder / "final.pt", ppo.ActorCritic(4, 2), config)


def test_seed_stats_counts_only_the_episodes_after_the_solve(tmp_path):
    # 20 episodes; the solve at step 100: the episodes ending at 110 ... 200 are "after".
    steps = list(range(10, 210, 10))
    returns = [100.0] * 10 + [500.0] * 8 + [300.0, 500.0]
    mean100 = [50.0] * 9 + [475.0, 480.0, 490.0, 495.0, 498.0, 499.0, 420.0, 470.0, 480.0, 490.0, 500.0]
    fake_run(tmp_path / "seed7", 7, 100, returns, mean100, steps)
    s = long_run.seed_stats(tmp_path / "seed7", 7)
    assert s["solved_at_step"] == 100 and s["episodes"] == 20
    assert s["after_solve_mean"] == pytest.approx((500 * 9 + 300) / 10)  # 480: episodes 11-20
    assert s["last10_mean"] == pytest.approx((300 + 500) / 2)  # the last 10%: the last 2 of 20 episodes
    assert s["min_mean100_after_solve"] == 420.0
    assert s["final_greedy"] < 100  # an untrained net: the final weights are really played
    assert 420.0 in s["curve"]["mean100"]  # the dip survives the curve's thinning
    # 480 after the solve, but the last 10% average 400 and the last-100 mean fell to 420: no
    assert not long_run.meets_goal(s)
    assert long_run.meets_goal(s | dict(last10_mean=500.0, min_mean100_after_solve=476.0, final_greedy=500.0))
    assert not long_run.meets_goal(s | dict(solved_at_step=None))


def test_a_run_that_never_solves_has_no_after_solve_numbers(tmp_path):
    fake_run(tmp_path / "seed1", 1, None, [20.0, 30.0], [20.0, 25.0], [10, 20])
    s = long_run.seed_stats(tmp_path / "seed1", 1)
    assert s["after_solve_mean"] is None and s["min_mean100_after_solve"] is None
    assert "| 1 | - | - |" in long_run.table([s], "x", "gymnasium")


def test_figure_orders_before_then_steps_then_after(tmp_path):
    for label in ("after", "before", "gamma-step"):
        folder = tmp_path / label / "gymnasium"
        fake_run(folder / "seed1", 1, 10, [500.0, 500.0], [500.0, 500.0], [10, 20])
        (folder / "stats.json").write_text(json.dumps([long_run.seed_stats(folder / "seed1", 1)]))
    fig = long_run.plot(tmp_path, tmp_path / "long_run.png")
    assert [ax.get_title().split(",")[0] for ax in fig.axes] == ["before", "gamma-step", "after"]
    assert "32 envs x 32 steps, minibatch 256" in fig.axes[0].get_title()
    assert "advantage normalisation off" in fig.axes[0].get_title()
    assert Image.open(tmp_path / "long_run.png").format == "PNG"
