"""Each defect variant in bench/defects.py really has its defect, and the ablation study runs.

Each is checked against an independent computation or against ppo_cartpole.py's correct piece
on the same data: the variant must differ in exactly the way the post's code did.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import ablations  # noqa: E402
import defects  # noqa: E402
import ppo_cartpole as ppo  # noqa: E402
from test_ppo_cartpole import gae_plain_loop, read_csv  # noqa: E402  (the textbook recursion, one env at a time)


def rollouts(collector_class, num_envs=3, num_steps=8, count=6, seed=0, **env_kwargs):
    """count rollouts of a random-init net on real CartPole, copied out of the collector."""
    envs = ppo.make_envs("CartPole-v1", num_envs, torch.device("cpu"), "gymnasium", "sync", **env_kwargs)
    torch.manual_seed(seed)  # the net's init and the sampling, as train seeds them
    net = ppo.ActorCritic(4, 2)
    collector = collector_class(envs, num_steps, seed, torch.device("cpu"))
    copies = []
    for _ in range(count):
        r = collector.collect(net, 0.99)
        copies.append(ppo.Rollout(**{k: v.clone() for k, v in vars(r).items()}))
    envs.close()
    return copies


def test_reset_every_rollout_caps_episodes_at_T_steps():
    T = 8
    ours = rollouts(ppo.Collector, num_steps=T)
    post = rollouts(defects.ResetEveryRollout, num_steps=T)
    lengths = lambda rs: np.concatenate([r.ended_lengths[r.dones > 0].numpy() for r in rs])  # noqa: E731
    assert lengths(ours).max() > T  # episodes of a random policy outlive a rollout of 8 steps...
    assert len(lengths(post)) == 0 or lengths(post).max() <= T  # ...never with a reset per rollout
    # and the first step of every rollout is a fresh start: |x|, |theta| <= 0.05 (CartPole's reset range)
    assert all(r.obs[0].abs().max() <= 0.05 for r in post)
    assert any(r.obs[0].abs().max() > 0.05 for r in ours[1:])


def test_flat_buffer_gae_is_one_time_series_across_interleaved_envs():
    generator = torch.Generator().manual_seed(3)
    rewards, values = torch.rand(5, 2, generator=generator, dtype=torch.float64), torch.rand(5, 2, generator=generator, dtype=torch.float64)
    dones = torch.zeros(5, 2, dtype=torch.float64)
    dones[2, 0] = 1.0
    last_value = torch.tensor([0.3, 0.7], dtype=torch.float64)
    flat, _ = defects.flat_buffer_gae(rewards, values, dones, last_value, 0.9, 0.8)
    column = lambda x: x.reshape(-1, 1).tolist()  # noqa: E731  [T, N] -> one env's [T*N, 1] time series
    expected = gae_plain_loop(column(rewards), column(values), column(dones), [0.7], 0.9, 0.8)
    assert flat.flatten().tolist() == pytest.approx([a for [a] in expected], abs=1e-12)
    ours, _ = ppo.compute_gae(rewards, values, dones, last_value, 0.9, 0.8)
    assert not torch.allclose(flat, ours)  # two envs mixed up: not the per-env answer


def test_averaged_bootstrap_gives_every_env_the_same_value():
    T, N = 4, 3
    zeros = torch.zeros(T, N)
    last_value = torch.tensor([1.0, 5.0, 9.0])
    advantages, _ = defects.averaged_bootstrap_gae(zeros, zeros, zeros, last_value, 0.5, 1.0)
    assert advantages[-1].tolist() == [2.5, 2.5, 2.5]  # gamma * mean(1, 5, 9) for every env
    ours, _ = ppo.compute_gae(zeros, zeros, zeros, last_value, 0.5, 1.0)
    assert ours[-1].tolist() == [0.5, 2.5, 4.5]


def test_truncation_as_termination_adds_no_bootstrap():
    kwargs = dict(num_envs=2, num_steps=12, count=2, max_episode_steps=5)  # every episode truncates at 5 (or fails)
    ours, post = rollouts(ppo.Collector, **kwargs), rollouts(defects.TruncationAsTermination, **kwargs)
    for o, p in zip(ours, post):
        assert torch.equal(o.dones, p.dones)
        assert torch.equal(p.rewards, torch.where(p.valid > 0, 1.0, 0.0))  # the raw rewards: 1 a step, 0 on resets
        truncated = o.rewards > 1.0  # ours: 1 + gamma * V(final obs)
        assert truncated.any() and (p.rewards[truncated] == 1.0).all()


def test_storing_autoreset_steps_leaves_the_valid_mask_all_ones():
    ours, post = rollouts(ppo.Collector), rollouts(defects.StoreAutoresetSteps)
    assert all((r.valid == 1).all() for r in post)
    assert any((r.valid == 0).any() for r in ours)  # ours masks the reset steps that follow an episode's end


def test_the_post_as_published_has_every_defect_at_once():
    assert issubclass(defects.PostCollector, (defects.ResetEveryRollout, defects.TruncationAsTermination,
                                              defects.StoreAutoresetSteps))
    (r,) = rollouts(defects.PostCollector, count=1, max_episode_steps=5)
    assert (r.valid == 1).all() and r.rewards.max() <= 1.0
    zeros, last_value = torch.zeros(2, 2), torch.tensor([2.0, 4.0])
    advantages, _ = defects.post_gae(zeros, zeros, zeros, last_value, 0.5, 1.0)
    assert advantages.flatten().tolist() == [0.1875, 0.375, 0.75, 1.5]  # gamma * mean(2, 4) = 1.5, halved per step back along the flat series


def test_install_patches_the_module_that_trains(monkeypatch):
    for attribute in ("Collector", "compute_gae"):
        monkeypatch.setattr(ppo, attribute, getattr(ppo, attribute))  # undone after the test
    defects.install("all defects")
    assert ppo.Collector is defects.PostCollector and ppo.compute_gae is defects.post_gae
    zeros = torch.zeros(2, 2)
    advantages, _ = ppo.compute_gae(zeros, zeros, zeros, torch.tensor([2.0, 4.0]), 0.5, 1.0)  # runs once patched
    assert advantages.flatten().tolist() == [0.1875, 0.375, 0.75, 1.5]


def losses(run_dir: Path) -> list[tuple[str, str]]:
    return [(row["policy_loss"], row["value_loss"]) for row in read_csv(run_dir / "metrics.csv")]


@pytest.mark.parametrize("name", [name for name, _, _, patch in ablations.VARIANTS if patch])
def test_every_patched_variant_trains_in_the_loop_and_changes_it(name, tmp_path, monkeypatch):
    """Each defect swapped into train() runs there, two iterations, and changes its losses (all
    but truncation as termination, which needs an episode of 500 steps to show)."""
    for attribute in ("Collector", "compute_gae", "layer_init", "ppo_iterations"):
        monkeypatch.setattr(ppo, attribute, getattr(ppo, attribute))  # undone after the test
    ablations.child(ablations.OURS, 1, 2048, str(tmp_path / "ours"))
    ablations.child(name, 1, 2048, str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env_steps"] == 2048 and (tmp_path / "run" / "final.pt").exists()
    if name != "truncation as termination":
        assert losses(tmp_path / "run") != losses(tmp_path / "ours")


@pytest.mark.shell
def test_quick_study_writes_its_table_and_figure(tmp_path):
    assert ablations.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ablations.md").read_text()
    for name in ablations.QUICK:
        assert name in table
    with Image.open(tmp_path / "ablations.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
