"""bench/failures.py's verdicts on hand-made runs: it must catch a run that gets a diagnosis other
than its mode's, and a healthy run that would speak if cut short; and its figure draws."""

import csv
import sys
from pathlib import Path

import pytest

from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import failures  # noqa: E402
import ppo_cartpole as ppo  # noqa: E402


def fake_run(rows, diagnosis, solved_at_iteration=None):
    """What failures.run returns for a run folder whose summary.json and stdout said `diagnosis`."""
    return dict(env_id="CartPole-v1", name="mode", seed=1, rows=rows, printed=diagnosis,
                summary=dict(diagnosis=diagnosis, solved_at_iteration=solved_at_iteration,
                             solved_at_step=None if solved_at_iteration is None else 1024 * (solved_at_iteration + 1)))


def rows(n=40, **columns):
    figures = dict(entropy=0.5, approx_kl=0.005, value_loss=2.0, policy_loss=-1.0, explained_variance=0.8,
                   entropy_coef=0.0, clip_fraction=0.1, mean100_return=100.0, lr=3e-3) | columns
    return [dict(iteration=i, env_steps=1024 * (i + 1), **{k: v[i] if isinstance(v, list) else v
                                                           for k, v in figures.items()}) for i in range(n)]


def test_a_run_passes_only_with_its_own_rules_diagnosis_everywhere():
    frozen = rows(approx_kl=1e-8, explained_variance=-0.3)  # both rules hold; policy_frozen comes first
    own = ppo.diagnose(frozen)
    assert own == [ppo.policy_frozen(frozen)] and failures.check(fake_run(frozen, own), "policy_frozen") == []
    assert failures.check(fake_run(frozen, own), "critic_not_learning")  # holds too, but is not the diagnosis
    assert failures.check(fake_run(frozen, []), "policy_frozen")  # summary.json and stdout said nothing
    assert failures.check(fake_run(rows(), []), None) == []
    assert failures.check(fake_run(rows(), own), None)  # a healthy run that spoke


def test_a_healthy_run_must_stay_silent_when_cut_at_any_iteration_before_its_solve():
    slow_start = rows(explained_variance=[-0.4] * 25 + [0.9] * 15)  # the critic learns late: at 24, EV < 0 still
    assert ppo.diagnose(slow_start) == [] and ppo.diagnose(slow_start[:24])
    problems = failures.check(fake_run(slow_start, [], solved_at_iteration=39), None)
    assert problems and all("cut at" in problem for problem in problems)
    assert "cut at 24 iterations" in " ".join(problems) and "cut at 40 " not in " ".join(problems)


def test_the_figure_draws_a_mode_beside_the_healthy_runs(tmp_path):
    bonus = fake_run(rows(entropy_coef=20.0, entropy=0.69, approx_kl=[0.0] + [1e-4] * 39), [])
    failures.plot("entropy bonus too large", "--entropy-coef 20", [bonus], [fake_run(rows(), [])], 475,
                  tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000


RULE_OF = {(env_id, failures.slug(name)): rule for env_id, gallery in failures.GALLERIES.items()
           for name, _, rule, _ in gallery["modes"]} | {
    (env_id, failures.slug(name)): None for env_id, gallery in failures.GALLERIES.items()
    for name, _ in gallery["cut_short"]}
RECORDED = sorted(failures.FIXTURES.glob("*/*.csv"))


def env_and_mode(path):
    return path.parent.name, path.name.split("__")[0]


def test_the_gallery_is_recorded_for_every_env_mode_and_seed():
    assert {env_and_mode(path) for path in RECORDED} == set(RULE_OF) and len(RECORDED) == 3 * len(RULE_OF)


@pytest.mark.parametrize("path", RECORDED, ids=[f"{path.parent.name}/{path.stem}" for path in RECORDED])
def test_each_recorded_run_gets_its_own_modes_diagnosis_and_a_healthy_one_none_at_any_cut(path):
    """The calibration of ppo.DIAGNOSES on the gallery's own runs (make failures writes them):
    a failing run gets its rule's message and no other; a healthy run, cut anywhere from 10 iterations
    to its solve or end, gets none."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    rule = RULE_OF[env_and_mode(path)]
    if rule is None:
        assert [n for n in range(10, len(rows) + 1) if ppo.diagnose(rows[:n])] == []
    else:
        message = getattr(ppo, rule)(rows)
        assert message is not None and ppo.diagnose(rows) == [message]
