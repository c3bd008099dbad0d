"""Tests for ppo_cartpole.py: one block per section of the script, in the same order.

Each test checks a function against an independent computation: a plain loop, a hand-worked
number, torch's own Categorical, gymnasium's RecordEpisodeStatistics, or a property.
"""

import ast
import csv
import dataclasses
import errno
import io
import json
import math
import os
import re
import signal
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import tqdm
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ppo_cartpole as ppo
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv


MODES = ["sync", "vector_entry_point"]

# No progress-bar monitor thread: `make mutate` forks this process, and a fork while that thread
# holds tqdm's lock leaves the child waiting on it forever.
tqdm.tqdm.monitor_interval = 0


CUDA = torch.cuda.is_available()  # the real answer, before the fixture below hides it


@pytest.fixture(autouse=True)
def machine_without_cuda(request, monkeypatch, tmp_path):
    """Every test sees a machine without CUDA, where the defaults are the CPU's, so the suite
    passes the same on a GPU machine; tests marked `cuda` see the real device. Each runs in a
    folder of its own: parse_args makes the default runs/... folder there, not in the repo."""
    if "cuda" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)


def small_net(seed=0, obs_dim=4, act_dim=2):
    torch.manual_seed(seed)
    return ppo.ActorCritic(obs_dim, act_dim)


def collect(mode="sync", num_envs=4, num_steps=32, rollouts=1, gamma=0.99, seed=0, **env_kwargs):
    """A collector on real CartPole envs; returns (collector, net, list of rollouts copied out)."""
    envs = ppo.make_envs("CartPole-v1", num_envs, torch.device("cpu"), "gymnasium", mode, **env_kwargs)
    net = small_net(seed)  # (seeds torch's RNG, which the sampling draws from)
    collector = ppo.Collector(envs, num_steps, seed, torch.device("cpu"))
    copies = []
    for _ in range(rollouts):
        r = collector.collect(net, gamma)
        copies.append(ppo.Rollout(**{k: v.clone() for k, v in vars(r).items()}))
    envs.close()
    return collector, net, copies


# ==== Config ======================================================================================

def help_flags() -> set[str]:
    """Every flag --help lists (from the text a user reads, not argparse's internals)."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", ppo.build_parser().format_help()))


def test_every_config_field_is_a_flag_of_the_same_name_with_its_help():
    help_text = " ".join(ppo.build_parser().format_help().split())
    for field in dataclasses.fields(ppo.Config):
        assert "--" + field.name.replace("_", "-") in help_flags(), field.name
        assert " ".join(field.metadata["help"].split()) in help_text, field.name
    for config_class in (ppo.RunConfig,):
        for field in dataclasses.fields(config_class):
            assert "--" + field.name.replace("_", "-") in help_flags(), field.name
            assert " ".join(field.metadata["help"].split()) in help_text, field.name
    config, run = ppo.parse_args([])
    assert config == ppo.Config()  # the defaults are Config's, the gymnasium backend's sizes included
    assert run == ppo.resolve(ppo.RunConfig(), config.env_id)
    assert len(dataclasses.asdict(config) | dataclasses.asdict(run)) == 32  # summary.json's config keys


def test_the_algorithms_config_holds_none_of_the_runs_settings():
    run_fields = {"device", "threads", "out_dir", "plot", "gif", "eval", "eval_episodes", "env_backend",
                  "vectorization_mode", "ema_alpha", "target_return", "stop_when_solved", "confirm_episodes"}
    assert {f.name for f in dataclasses.fields(ppo.RunConfig)} == run_fields
    assert run_fields.isdisjoint(f.name for f in dataclasses.fields(ppo.Config))


def test_the_sizes_help_shows_both_backends_defaults():
    help_text = " ".join(ppo.build_parser().format_help().split())
    for name, size in ppo.BACKEND_SIZES["gymnasium"].items():
        assert f"(default: {size}; torch backend: {ppo.BACKEND_SIZES['torch'][name]})" in help_text


def test_the_help_ends_with_the_posts_settings_on_one_line_a_shell_can_take():
    """README: copy the last line of --help, add --stop-when-solved: argparse must not wrap it."""
    last = ppo.build_parser().format_help().rstrip("\n").splitlines()[-1]
    assert last == f"python ppo_cartpole.py {ppo.POST_SETTINGS}"
    config, _ = ppo.parse_args(shlex.split(last)[2:] + ["--stop-when-solved"])
    assert (config.num_envs, config.lr, config.value_clip_eps) == (8, 1e-4, 0.2)


def test_each_flag_sets_its_field():
    values = {"num_envs": "16", "buffer_size": "512", "minibatch_size": "64", "lr": "0.01", "gamma": "0.5",
              "value_clip_eps": "0.3", "target_kl": "0.02", "threads": "2", "seed": "9"}
    argv = [x for name, value in values.items() for x in ("--" + name.replace("_", "-"), value)]
    config, run = ppo.parse_args(argv + ["--no-anneal-lr", "--stop-when-solved"])
    for name, value in values.items():
        owner = run if name == "threads" else config
        assert getattr(owner, name) == type(getattr(owner, name))(value), name
    assert not config.anneal_lr and run.stop_when_solved


def test_episodes_and_iterations_are_aliases_of_num_iterations():
    for flag in ("--episodes", "--iterations", "--num-iterations"):
        assert ppo.parse_args([flag, "7"])[0].num_iterations == 7


# ==== Environments ================================================================================

@pytest.mark.parametrize("backend, mode", [("gymnasium", "sync"), ("gymnasium", "vector_entry_point"), ("torch", "auto")])
def test_envs_autoreset_on_the_next_step_on_every_backend(backend, mode):
    """What the collector relies on: the step after an episode ends is a reset with reward 0."""
    envs = ppo.make_envs("CartPole-v1", 2, torch.device("cpu"), backend, mode, max_episode_steps=3)
    obs, _ = envs.reset(seed=0)
    flags = [envs.step(torch.tensor([0, 1]))[1:4] for _ in range(5)]
    envs.close()
    assert obs.shape == (2, 4) and obs.dtype == torch.float32
    assert [rewards.tolist() for rewards, _, _ in flags] == [[1, 1], [1, 1], [1, 1], [0, 0], [1, 1]]
    assert flags[2][2].all() and not flags[3][2].any()
    assert [(rewards.dtype, flag.dtype) for rewards, flag, _ in flags[:1]] == [(torch.float32, torch.bool)]


def test_numpy_envs_of_any_float_dtype_give_float32_tensors():
    """A custom env's Box is often float64: the net gets float32 observations all the same."""
    envs = ppo.NumpyToTorch(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync", wrappers=[
        lambda env: gym.wrappers.DtypeObservation(env, np.float64)]), torch.device("cpu"))
    obs, _ = envs.reset(seed=0)
    step_obs, rewards, terminated, truncated, _ = envs.step(torch.tensor([0, 1]))
    envs.close()
    assert (obs.dtype, step_obs.dtype, rewards.dtype, terminated.dtype, truncated.dtype) == \
        (torch.float32, torch.float32, torch.float32, torch.bool, torch.bool)


def test_a_non_finite_observation_names_how_many_envs_and_the_first_ones_values():
    """Planted: the values shown scaled, or the last bad env named instead of the first."""
    envs = ppo.NumpyToTorch(ScriptedEnvs([([False] * 4, [False] * 4)]), torch.device("cpu"))
    obs = np.array([[0.5, 1.0, 1.5, 2.0], [0.5, np.nan, 1.25, 2.0], [0.0] * 4, [np.inf, 0.0, 0.0, 0.0]], np.float32)
    message = "the env: 2 of 4 envs returned a non-finite observation (env 1: [0.5, nan, 1.25, 2.0])"
    with pytest.raises(ppo.NonFiniteEnv) as raised:
        envs._tensor(obs, "observation")
    assert str(raised.value) == message


# ==== Model =======================================================================================

def test_actor_critic_shapes_and_near_uniform_first_policy():
    net = small_net()
    logits, value = net(torch.randn(5, 4))
    assert logits.shape == (5, 2) and value.shape == (5,)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(probs, torch.full_like(probs, 0.5), atol=0.02)  # policy head gain 0.01
    assert all(isinstance(x, int) for x in (net.obs_dim, net.act_dim, net.hidden))


def linear_layers(net):
    """The net's Linear layers in the order they run: the trunk's two, the policy head, the value head."""
    return [module for module in net.modules() if isinstance(module, torch.nn.Linear)]


def test_forward_is_the_shared_trunk_then_each_head_written_out():
    """Planted: a head's output scaled or negated (the value head's sign is invisible to training)."""
    net, obs = small_net(3), torch.randn(6, 4)
    (w1, b1), (w2, b2), (wp, bp), (wv, bv) = ((layer.weight, layer.bias) for layer in linear_layers(net))
    features = torch.relu(torch.relu(obs @ w1.T + b1) @ w2.T + b2)
    logits, values = net(obs)
    assert torch.allclose(logits, features @ wp.T + bp, atol=1e-6)
    assert torch.allclose(values, (features @ wv.T).squeeze(1) + bv, atol=1e-6)


def test_layers_are_orthogonal_with_the_baselines_gains_and_zero_biases():
    """W W^T = gain^2 I over the smaller side: sqrt(2) for the ReLU trunk, 0.01 for the policy
    head (a near-uniform first policy), 1 for the value head, as in the PPO paper's baselines code."""
    net = small_net(obs_dim=4, act_dim=3)
    for layer, gain in zip(linear_layers(net), (math.sqrt(2), math.sqrt(2), 0.01, 1.0)):
        w = layer.weight.detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, gain ** 2 * torch.eye(len(gram), dtype=torch.float64), atol=1e-5 * gain ** 2)
        assert not layer.bias.any()


class FixedPolicy(torch.nn.Module):
    """A `net` whose policy is softmax(logits) in every state, with value 0."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, obs):
        return self.logits.expand(*obs.shape[:-1], -1), torch.zeros(obs.shape[:-1])


def test_the_rollout_samples_from_softmax_of_the_logits_and_stores_their_log_probs():
    """Every action drawn from pi(.|s) = softmax(logits): frequencies within 0.01 over 32k draws,
    and each stored log pi_old(a|s) is log softmax at the action taken."""
    logits = [0.4, -0.8]
    torch.manual_seed(0)
    rollout = ppo.Collector(ppo.TorchCartPole(4096), 8, 0, torch.device("cpu")).collect(FixedPolicy(logits), 0.99)
    probs = torch.softmax(torch.tensor(logits), -1)
    frequencies = torch.bincount(rollout.actions.flatten(), minlength=2).float() / rollout.actions.numel()
    assert torch.allclose(frequencies, probs, atol=0.01)
    assert torch.allclose(rollout.logprobs, probs.log()[rollout.actions], atol=1e-6)


def test_the_model_works_over_the_last_axis_of_any_shape():
    obs = torch.randn((5, 3, 4), generator=torch.Generator().manual_seed(0))  # [T, N, D]: T, N, D and A differ
    logits, values = small_net(act_dim=6)(obs)
    assert logits.shape == (5, 3, 6) and values.shape == (5, 3)
    assert torch.allclose(logits[2, 1], small_net(act_dim=6)(obs[2, 1])[0])


def test_the_same_seed_gives_the_same_rollout_and_another_seed_another():
    """The sampling draws from torch's RNG, seeded once: the same seed, the same actions."""
    def actions(seed):
        net = small_net(0)
        torch.manual_seed(seed)
        collector = ppo.Collector(ppo.TorchCartPole(4), 16, 0, torch.device("cpu"))
        return collector.collect(net, 0.99).actions.clone()

    first = actions(5)
    assert torch.equal(first, actions(5)) and not torch.equal(first, actions(6))


# ==== Rollout =====================================================================================

def test_every_tensor_lands_on_the_device_it_is_given():
    """torch's meta device stands in for a GPU on a CPU machine: a tensor made without its device
    lands on the CPU, where every other test runs and so would never notice."""
    meta = torch.device("meta")
    envs = ppo.make_envs("CartPole-v1", 2, meta, vectorization_mode="sync")
    collector = ppo.Collector(envs, 3, 0, meta)  # resets the envs
    stepped = envs.step(torch.zeros(2, dtype=torch.long))
    state = [*vars(collector).values(), *vars(collector.rollout).values()]
    tensors = [*stepped[:4], *(v for v in state if isinstance(v, torch.Tensor))]
    assert len(tensors) > len(vars(collector.rollout)) and all(tensor.device == meta for tensor in tensors)
    envs.close()


@pytest.mark.parametrize("mode", MODES)
def test_rollout_is_stored_time_by_env(mode):
    _, _, [r] = collect(mode, num_envs=3, num_steps=10)
    assert r.obs.shape == (10, 3, 4) and r.last_value.shape == (3,)
    for x in (r.actions, r.logprobs, r.rewards, r.values, r.dones, r.valid):
        assert x.shape == (10, 3)


def test_env_state_persists_across_rollouts_so_episodes_outlive_t():
    collector, net, rollouts = collect(num_envs=4, num_steps=8, rollouts=12)
    lengths = np.concatenate([ppo.finished_episodes(r)[1] for r in rollouts])
    assert lengths.max() > 8  # the post reset every rollout: no episode could outlive T
    for before, after in zip(rollouts, rollouts[1:]):
        # the next rollout starts where the last one stopped: same obs, same prev-done mask
        assert not torch.equal(after.obs[0], torch.zeros_like(after.obs[0]))
        assert torch.equal(after.valid[0], 1 - before.dones[-1])


@pytest.mark.parametrize("mode", MODES)
def test_autoreset_steps_are_masked_and_nothing_else(mode):
    _, _, rollouts = collect(mode, num_envs=4, num_steps=64, rollouts=2)
    first, second = rollouts
    for r, prev_done in ((first, torch.zeros(4)), (second, first.dones[-1])):
        ended_before = torch.cat([prev_done.unsqueeze(0), r.dones[:-1]])  # [T, N]
        assert torch.equal(r.valid, 1 - ended_before)
        assert (r.rewards[r.valid == 0] == 0).all()  # reset steps: reward 0, no bootstrap
        assert r.dones.sum() > 0


@pytest.mark.parametrize("backend", ["gymnasium", "torch"])
def test_collector_masks_autoreset_steps_on_both_backends(backend):
    envs = ppo.make_envs("CartPole-v1", 4, torch.device("cpu"), backend)
    collector = ppo.Collector(envs, 64, 0, torch.device("cpu"))
    r = collector.collect(small_net(), 0.99)
    ended_before = torch.cat([torch.zeros(1, 4), r.dones[:-1]])
    assert r.dones.sum() > 4 and torch.equal(r.valid, 1 - ended_before)
    assert (r.rewards[r.valid == 0] == 0).all()
    returns, lengths, _ = ppo.finished_episodes(r)
    assert (returns == lengths).all()  # CartPole pays 1 per real step; reset steps count for neither


@pytest.mark.parametrize("mode", ["SameStep", "Disabled"])
def test_collector_refuses_envs_that_do_not_autoreset_on_the_next_step(mode):
    """gymnasium >= 1.1's other modes would make the valid mask wrong without a sound."""
    if not hasattr(gym.vector, "AutoresetMode"):
        pytest.skip("gymnasium 1.0 autoresets on the next step only")
    mode = gym.vector.AutoresetMode(mode)
    envs = ppo.NumpyToTorch(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync",
                                         vector_kwargs={"autoreset_mode": mode}), torch.device("cpu"))
    with pytest.raises(ValueError, match=re.escape(f"needs next-step autoreset, got {mode.value}: use gymnasium")):
        ppo.Collector(envs, 8, 0, torch.device("cpu"))
    envs.close()


def test_collector_reads_an_autoreset_mode_given_as_a_string_too():
    envs = ppo.TorchCartPole(2)
    envs.metadata = {"autoreset_mode": "SameStep"}  # a hand-written vector env's metadata
    with pytest.raises(ValueError, match="needs next-step autoreset, got SameStep"):
        ppo.Collector(envs, 8, 0, torch.device("cpu"))
    envs.metadata = {"autoreset_mode": "NextStep"}
    ppo.Collector(envs, 8, 0, torch.device("cpu"))
    bare = types.SimpleNamespace(num_envs=2, single_observation_space=envs.single_observation_space,
                                 reset=envs.reset, step=envs.step)  # a hand-written env without metadata
    assert ppo.Collector(bare, 8, 0, torch.device("cpu")).collect(small_net(), 0.99).obs.shape == (8, 2, 4)


def test_collector_refuses_gymnasium_below_1_which_resets_on_the_same_step(monkeypatch):
    """gymnasium 0.29 (CleanRL's pin) declares no mode and resets on the same step: the masks and the
    bootstrap would come out silently wrong. An env that declares next-step is taken on any version."""
    monkeypatch.setattr(gym, "__version__", "0.29.1")
    envs = ppo.NumpyToTorch(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync"), torch.device("cpu"))
    envs.metadata = {k: v for k, v in envs.metadata.items() if k != "autoreset_mode"}  # as 0.29 has it
    with pytest.raises(ValueError, match=r"got gymnasium 0\.29\.1, which resets on the same step: use gymnasium >= 1\.0"):
        ppo.Collector(envs, 8, 0, torch.device("cpu"))
    ppo.Collector(ppo.TorchCartPole(2), 8, 0, torch.device("cpu"))
    envs.close()


class SameStepInfo(gym.vector.VectorWrapper):
    """A vector env that says nothing of its mode but hands over final observations, as same-step
    autoreset does (`final_obs` in gymnasium 1.x, `final_observation` in 0.29)."""

    def __init__(self, envs, key):
        super().__init__(envs)
        self.key, self.metadata = key, {}

    def step(self, actions):
        *out, info = self.env.step(actions)
        return (*out, {**info, self.key: np.zeros(self.num_envs), f"_{self.key}": out[2] | out[3]})


@pytest.mark.parametrize("key", ["final_obs", "final_observation"])
def test_collector_refuses_a_step_whose_info_carries_final_observations(key):
    envs = ppo.NumpyToTorch(SameStepInfo(gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync"), key),
                            torch.device("cpu"))
    collector = ppo.Collector(envs, 8, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="got a final observation in info \\(same-step autoreset\\)"):
        collector.collect(small_net(), 0.99)
    envs.close()


@pytest.mark.parametrize("mode", MODES)
def test_truncation_bootstraps_from_the_value_of_the_final_observation(mode):
    gamma = 0.9
    _, net, [r] = collect(mode, num_envs=3, num_steps=12, gamma=gamma, max_episode_steps=5)
    # A random policy cannot topple the pole in 5 steps: every episode end here is a truncation.
    assert r.dones.sum() >= 6
    with torch.no_grad():
        values_of_next_obs = net(r.obs[1:].reshape(-1, 4))[1].reshape(11, 3)  # [T-1, N], computed afresh
    next_values = torch.cat([values_of_next_obs, r.last_value.unsqueeze(0)])  # obs[t+1] is step t's final obs
    expected = torch.where(r.dones.bool(), 1 + gamma * next_values, r.valid)
    assert torch.allclose(r.rewards, expected, atol=1e-5)


def test_termination_gets_no_bootstrap():
    _, _, [r] = collect(num_envs=4, num_steps=128)
    # With a random policy every CartPole episode ends by falling (terminated), well before 500.
    assert r.dones.sum() > 4
    assert (r.rewards[r.dones.bool()] == 1.0).all()


class ScriptedEnvs(gym.vector.VectorEnv):
    """A vector env that replays scripted (terminated, truncated) flags, next-step autoreset style."""

    def __init__(self, flags):
        self.flags, self.t, self.num_envs = flags, 0, len(flags[0][0])
        self.single_observation_space = gym.spaces.Box(-1, 1, (4,), np.float32)
        self.single_action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None):
        return np.full((self.num_envs, 4), 0.01 * self.t, np.float32), {}

    def step(self, actions):
        terminated, truncated = (np.array(f) for f in self.flags[self.t])
        self.t += 1
        obs = np.full((self.num_envs, 4), 0.01 * self.t, np.float32)
        return obs, np.ones(self.num_envs, np.float32), terminated, truncated, {}


def test_truncated_and_terminated_on_the_same_step_is_a_termination():
    # env 0: truncated only; env 1: both flags (CartPole at step 500 when the pole also falls)
    flags = [([False, False], [False, False]), ([False, True], [True, True]), ([False, False], [False, False])]
    net = small_net()
    collector = ppo.Collector(ppo.NumpyToTorch(ScriptedEnvs(flags), torch.device("cpu")), 3, 0, torch.device("cpu"))
    r = collector.collect(net, gamma=0.5)
    with torch.no_grad():
        value_of_final_obs = net(torch.full((1, 4), 0.02))[1].item()
    assert r.rewards[1, 0].item() == pytest.approx(1 + 0.5 * value_of_final_obs, abs=1e-6)
    assert r.rewards[1, 1].item() == 1.0
    assert r.valid[2].tolist() == [0.0, 0.0]


def test_a_truncation_at_the_rollouts_last_step_bootstraps_from_last_value():
    """The last step's bootstrap comes from last_value, V(obs after the rollout), not from a next row.
    Planted: that bootstrap scaled, zeroed or negated."""
    flags = [([False, False], [False, False]), ([False, True], [True, False])]  # at t=1: env 0 truncated, env 1 fell
    net = small_net()
    collector = ppo.Collector(ppo.NumpyToTorch(ScriptedEnvs(flags), torch.device("cpu")), 2, 0, torch.device("cpu"))
    r = collector.collect(net, gamma=0.5)
    with torch.no_grad():
        value_after = net(torch.full((1, 4), 0.02))[1].item()  # ScriptedEnvs' obs after its second step
    assert r.last_value.tolist() == pytest.approx([value_after] * 2, abs=1e-6)
    assert r.rewards[1].tolist() == pytest.approx([1 + 0.5 * value_after, 1.0], abs=1e-6)
    assert r.rewards[0].tolist() == [1.0, 1.0]


class EpisodeSpy(gym.vector.VectorWrapper):
    """Records gymnasium's own episode statistics, in the order the episodes end."""

    def __init__(self, envs):
        super().__init__(gym.wrappers.vector.RecordEpisodeStatistics(envs))
        self.returns, self.lengths = [], []

    def step(self, actions):
        out = self.env.step(actions)
        info = out[-1]
        if "_episode" in info:
            self.returns += info["episode"]["r"][info["_episode"]].tolist()
            self.lengths += info["episode"]["l"][info["_episode"]].tolist()
        return out


@pytest.mark.parametrize("mode", MODES)
def test_episode_returns_match_record_episode_statistics(mode):
    spy = EpisodeSpy(gym.make_vec("CartPole-v1", 4, vectorization_mode=mode))
    collector = ppo.Collector(ppo.NumpyToTorch(spy, torch.device("cpu")), 16, 0, torch.device("cpu"))
    net = small_net()
    returns, lengths = [], []
    for _ in range(10):
        ended_returns, ended_lengths, _ = ppo.finished_episodes(collector.collect(net, 0.99))
        returns += ended_returns.tolist()
        lengths += ended_lengths.tolist()
    assert len(returns) > 10
    assert returns == spy.returns and lengths == spy.lengths


@pytest.mark.parametrize("backend", ["torch", "gymnasium"])
def test_torch_rollout_never_reads_a_tensor_on_the_host(backend, monkeypatch):
    """What would synchronise a GPU, made to fail on the CPU: the torch path must not touch it."""
    envs = ppo.make_envs("CartPole-v1", 8, torch.device("cpu"), backend)
    collector, net = ppo.Collector(envs, 64, 0, torch.device("cpu")), small_net()

    def host_read(*args, **kwargs):
        raise AssertionError("host read during the rollout")

    for name in ("item", "cpu", "numpy", "tolist", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    getitem = torch.Tensor.__getitem__

    def no_boolean_masks(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            host_read()
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", no_boolean_masks)
    if backend == "torch":
        collector.collect(net, 0.99)
    else:  # the check can fail: gymnasium's envs need the actions on the host every step
        with pytest.raises(AssertionError, match="host read"):
            collector.collect(net, 0.99)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_rollout_never_synchronises_and_the_users_command_runs(tmp_path):
    device = torch.device("cuda")
    collector = ppo.Collector(ppo.TorchCartPole(4096, device), 32, 0, device)
    net = small_net().to(device)
    collector.collect(net, 0.99)  # warm-up: first allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        collector.collect(net, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ppo.main(["--device", "cuda", "--episodes", "2", "--no-gif", "--out-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["env_backend"] == "torch"


def test_the_carried_state_of_the_collector_and_torch_cartpole_is_updated_in_place():
    """What carries one step to the next (the envs' state, the last obs, the running episode sums,
    the buffers) is written into the same tensors, never rebound: whoever holds them (a captured
    graph, a subclass) sees every step."""
    envs = ppo.TorchCartPole(4)
    collector, net = ppo.Collector(envs, 8, 0, torch.device("cpu")), small_net()
    names = {"collector": ("next_obs", "prev_done", "episode_return", "episode_length", "rollout"),
             "envs": ("state", "steps", "prev_done")}
    owners = {"collector": collector, "envs": envs}
    held = {(owner, name): getattr(owners[owner], name) for owner in names for name in names[owner]}
    before = {key: x.clone() for key, x in held.items() if isinstance(x, torch.Tensor)}
    for _ in range(3):
        rollout = collector.collect(net, 0.99)
    assert rollout is held["collector", "rollout"] and rollout.dones.sum() > 0  # episodes ended and reset
    assert all(getattr(owners[owner], name) is x for (owner, name), x in held.items())
    changed = [key for key, x in before.items() if not torch.equal(held[key], x)]
    assert {("collector", "next_obs"), ("collector", "episode_return"), ("envs", "state"), ("envs", "steps")} <= set(changed)


# ==== Advantages: GAE =============================================================================

def gae_plain_loop(rewards, values, dones, last_value, gamma, lam):
    """The textbook recursion, one env at a time, in plain Python floats."""
    T, N = len(rewards), len(rewards[0])
    advantages = [[0.0] * N for _ in range(T)]
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            next_value = last_value[n] if t == T - 1 else values[t + 1][n]
            nonterminal = 1.0 - dones[t][n]
            delta = rewards[t][n] + gamma * next_value * nonterminal - values[t][n]
            running = delta + gamma * lam * nonterminal * running
            advantages[t][n] = running
    return advantages


def test_gae_matches_a_plain_python_loop():
    g = torch.Generator().manual_seed(3)
    T, N = 9, 4
    rewards, values = torch.rand(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = (torch.rand(T, N, generator=g) < 0.25).float()
    last_value = torch.randn(N, generator=g)
    advantages, returns = ppo.compute_gae(rewards, values, dones, last_value, 0.97, 0.9)
    expected = gae_plain_loop(rewards.tolist(), values.tolist(), dones.tolist(), last_value.tolist(), 0.97, 0.9)
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-5)
    assert torch.allclose(returns, advantages + values)


def test_gae_hand_worked_across_an_episode_end():
    # gamma 0.9, lambda 0.8; the episode ends at t=1.
    #   t=2: delta = 1 + 0.9*0.2 - 0.3 = 0.88                 A = 0.88
    #   t=1: delta = 1 - 0.4 = 0.6 (no bootstrap)            A = 0.6
    #   t=0: delta = 1 + 0.9*0.4 - 0.5 = 0.86                 A = 0.86 + 0.9*0.8*0.6 = 1.292
    advantages, returns = ppo.compute_gae(torch.ones(3, 1), torch.tensor([[0.5], [0.4], [0.3]]),
                                          torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([0.2]), 0.9, 0.8)
    assert advantages.squeeze(1).tolist() == pytest.approx([1.292, 0.6, 0.88])
    assert returns.squeeze(1).tolist() == pytest.approx([1.792, 1.0, 1.18])


def test_gae_does_not_leak_across_episode_end():
    values, dones = torch.zeros(6, 1), torch.tensor([[0.0], [0.0], [1.0], [0.0], [0.0], [0.0]])
    a1, _ = ppo.compute_gae(torch.ones(6, 1), values, dones, torch.zeros(1), 0.99, 0.95)
    rewards = torch.ones(6, 1)
    rewards[3:] = 100.0  # a different next episode
    a2, _ = ppo.compute_gae(rewards, values, dones, torch.full((1,), 50.0), 0.99, 0.95)
    assert torch.equal(a1[:3], a2[:3])


def test_gae_lambda_extremes_are_td_error_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    rewards, values, last = torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g), torch.rand(2, generator=g)
    dones = torch.zeros(5, 2)
    td0, _ = ppo.compute_gae(rewards, values, dones, last, 0.9, 0.0)
    next_values = torch.cat([values[1:], last.unsqueeze(0)])
    assert torch.allclose(td0, rewards + 0.9 * next_values - values)
    mc, _ = ppo.compute_gae(rewards, values, dones, last, 0.9, 1.0)
    discounted = [sum(0.9 ** k * rewards[t + k] for k in range(5 - t)) + 0.9 ** (5 - t) * last for t in range(5)]
    assert torch.allclose(mc, torch.stack(discounted) - values, atol=1e-6)


def test_the_default_discount_sees_a_failure_100_steps_ahead():
    """Why gamma is 0.995: after the solve, episodes fail by the cart drifting off the track ~100
    steps after the drift starts. A Monte Carlo return (values 0, lambda 1) 100 steps before a
    failure, against the same state in an episode that survives, loses gamma^100 of its value:
    closed form sum_k gamma^k = (1 - gamma^n) / (1 - gamma)."""
    T = 400

    def return_at_0(gamma, fails_at):
        rewards, dones = torch.ones(T, 1, dtype=torch.float64), torch.zeros(T, 1, dtype=torch.float64)
        bootstrap = torch.full((1,), 1 / (1 - gamma), dtype=torch.float64)  # the episode goes on after T
        if fails_at is not None:
            dones[fails_at] = 1.0
        return ppo.compute_gae(rewards, torch.zeros_like(rewards), dones, bootstrap, gamma, 1.0)[1][0].item()

    for gamma in (0.98, ppo.Config.gamma):
        survives, fails = return_at_0(gamma, None), return_at_0(gamma, 99)
        assert survives == pytest.approx(1 / (1 - gamma))
        assert fails == pytest.approx((1 - gamma ** 100) / (1 - gamma))
    seen = lambda gamma: 1 - return_at_0(gamma, 99) * (1 - gamma)  # share of the value the failure takes  # noqa: E731
    assert seen(0.98) == pytest.approx(0.98 ** 100) and seen(0.98) < 0.14  # gamma 0.98: 13%, lost in the noise
    assert seen(ppo.Config.gamma) > 0.6  # 0.995: 61% of V, a signal the critic learns


# ==== Losses ======================================================================================

def test_clipped_surrogate_hand_worked():
    # ratio 1.5, A=+1 -> min(1.5, 1.2) = 1.2;  ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8;
    # ratio 1.1, A=+2 -> 2.2 (inside the clip). Loss = -(1.2 - 0.8 + 2.2) / 3.
    loss = ppo.clipped_surrogate_loss(torch.tensor([1.5, 0.5, 1.1]), torch.tensor([1.0, -1.0, 2.0]), 0.2)
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)


def test_clipped_entries_get_zero_gradient_unclipped_ones_do_not():
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are clipped: no gradient. Ratio 0.5 with A>0 is
    # the pessimistic side (the unclipped term is smaller), so it keeps its gradient -A/B.
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.1], requires_grad=True)
    ppo.clipped_surrogate_loss(ratio, torch.tensor([1.0, -1.0, 1.0, 2.0]), 0.2).backward()
    assert ratio.grad.tolist() == pytest.approx([0.0, 0.0, -1.0 / 4, -2.0 / 4], abs=1e-6)


def test_clipped_value_loss_hand_worked():
    # v=2, v_old=1, R=3: unclipped (2-3)^2 = 1, clipped v=1.2: 3.24 -> 3.24
    # v=0, v_old=0.5, R=0: unclipped 0, clipped v=0.3: 0.09 -> 0.09. Loss = 0.5 * (3.33 / 2).
    values, old, returns = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([3.0, 0.0])
    assert ppo.value_loss(values, old, returns, 0.2).item() == pytest.approx(0.8325)
    assert ppo.value_loss(values, old, returns, None).item() == pytest.approx(0.25)


def test_clipped_value_loss_gradient_is_v_minus_r_except_where_the_clip_holds_v_back():
    """d/dv of 0.5 mean(max(...)): (v - R) / B where v is inside the clip (both branches are v) or the
    unclipped branch is the larger, 0 where the clipped one is (it no longer moves with v).
    Planted: the clipped branch detached (it halves the first sample's gradient)."""
    values = torch.tensor([1.1, 2.0, 0.0], requires_grad=True)
    old, returns = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([3.0, 3.0, 3.0])
    # v - v_old: 0.1 (inside), 1.0 (clipped to 1.2: (1.2-3)^2 = 3.24 > 1), -0.5 (0.3: 7.29 < 9)
    ppo.value_loss(values, old, returns, 0.2).backward()
    assert values.grad.tolist() == pytest.approx([(1.1 - 3) / 3, 0.0, -3 / 3])


def test_approx_kl_has_the_gradient_of_its_formula_for_a_copy_that_penalises_it():
    """d/dx mean(e^x - 1 - x) = (e^x - 1) / M. Planted: approx_kl detached or under no_grad (the
    update reads it without gradient, so only a copy that uses it as a KL penalty would see)."""
    log_ratio = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    ppo.approx_kl(log_ratio).backward()
    assert log_ratio.grad.tolist() == pytest.approx([(math.exp(x) - 1) / 3 for x in (0.3, -0.2, 1.0)])


def test_approx_kl_hand_worked_and_unbiased_for_the_true_kl():
    assert ppo.approx_kl(torch.log(torch.tensor([0.5])) - torch.log(torch.tensor([0.25]))).item() == \
        pytest.approx(1 - math.log(2))
    old_logits, new_logits = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([0.0, 0.4, 0.6])
    p_old, p_new = torch.softmax(old_logits, -1), torch.softmax(new_logits, -1)
    true_kl = (p_old * (p_old.log() - p_new.log())).sum().item()
    torch.manual_seed(1)
    old, new = torch.distributions.Categorical(logits=old_logits), torch.distributions.Categorical(logits=new_logits)
    actions = old.sample((400_000,))
    estimate = ppo.approx_kl(new.log_prob(actions) - old.log_prob(actions)).item()
    assert estimate == pytest.approx(true_kl, rel=0.03) and estimate >= 0


def test_explained_variance_against_its_formula():
    target, predicted = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.5, 2.0, 2.5, 4.0])
    expected = 1 - np.var([-0.5, 0, 0.5, 0], ddof=1) / np.var([1, 2, 3, 4], ddof=1)
    assert ppo.explained_variance(predicted, target).item() == pytest.approx(expected)
    assert ppo.explained_variance(target, target).item() == 1.0
    assert ppo.explained_variance(torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])).item() == \
        pytest.approx(1 - 1 / 1, abs=1e-7)  # Var(target) exactly 1, Var([0, 1, -1]) = 1
    assert math.isnan(ppo.explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0])).item())  # constant target


# ==== PPO update ==================================================================================

def test_lr_anneals_only_when_asked():
    assert ppo.lr_at(25, 100, 1e-3, anneal=True) == pytest.approx(7.5e-4)
    assert ppo.lr_at(25, 100, 1e-3, anneal=False) == 1e-3


def test_entropy_coef_anneals_linearly_to_its_floor():
    assert ppo.entropy_coef_at(0, 100, 0.02, 0.001) == 0.02
    assert ppo.entropy_coef_at(50, 100, 0.02, 0.001) == pytest.approx(0.01)
    assert ppo.entropy_coef_at(99, 100, 0.02, 0.001) == 0.001
    schedule = [ppo.entropy_coef_at(i, 100, 0.02, 0.001) for i in range(100)]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))


UPDATE = dict(update_epochs=1, minibatch_size=4, clip_eps=0.2, value_clip_eps=None, entropy_coef=0.0, value_coef=0.5)


def run_update(net, rollout, advantages, returns, lr=0.0, optimizer=torch.optim.SGD, seed=0, **settings):
    """ppo_update with UPDATE's settings where not given, `optimizer` at `lr` (SGD at 0: the weights
    stay, so every minibatch sees pi = the net), shuffled by torch's RNG seeded with `seed`."""
    optimizer = optimizer(net.parameters(), lr=lr)
    torch.manual_seed(seed)
    return ppo.ppo_update(net, optimizer, rollout, advantages, returns, **(UPDATE | settings))


def update(rollout, net=None, seed=0, **settings):
    """A learning update of a collected rollout: its GAE, then 4 epochs of Adam with the clips and
    an entropy bonus on. Returns (net, stats)."""
    net = net or small_net(seed)
    advantages, returns = ppo.compute_gae(rollout.rewards, rollout.values, rollout.dones,
                                          rollout.last_value, 0.99, 0.95)
    stats = run_update(net, rollout, advantages, returns, seed=seed, **(dict(
        lr=3e-4, optimizer=torch.optim.Adam, update_epochs=4, minibatch_size=16, value_clip_eps=0.2, entropy_coef=0.01,
        max_grad_norm=0.5) | settings))
    return net, stats


RATIOS = [1.5, 0.6, 1.1, 0.9, 1.0, 1.3, 0.7, 1.05, 0.95, 1.25, 0.75, 1.02]  # pi / pi_old of the 12 valid steps


ADVANTAGES = [1.0, -1.0, 2.0, -0.5, 0.3, -2.0, 1.5, -0.2, 0.8, 0.4, -1.2, 0.1]


INVALID = [(3, 0), (5, 1), (6, 0), (7, 1)]  # the autoreset steps of hand_made_rollout, (t, env)


def hand_made_rollout(net):
    """A rollout of T=8 x N=2 steps, four of them autoreset steps (INVALID), whose 12 valid steps
    have the ratios RATIOS under `net`, advantages ADVANTAGES, and old values and returns chosen
    so that value clipping matters. obs[..., 0] is each step's index in storage order plus 1.
    Returns (rollout, advantages [T, N], returns [T, N], valid index [12])."""
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn((8, 2, 4), generator=generator)
    obs[..., 0] = torch.arange(1.0, 17.0).reshape(8, 2)
    actions = torch.randint(0, 2, (8, 2), generator=generator)
    valid = torch.ones(8, 2)
    for t, env in INVALID:
        valid[t, env] = 0.0
    index = valid.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        logits, values = net(obs.flatten(0, 1))
    logprobs = torch.distributions.Categorical(logits=logits).log_prob(actions.flatten())
    old_logprobs, old_values, advantages, returns = torch.zeros(4, 16)
    old_logprobs[index] = logprobs[index] - torch.log(torch.tensor(RATIOS))
    offsets = torch.tensor([0.5, -0.1, 0.3, -0.6, 0.05, 0.4, -0.3, 0.2, -0.05, 0.7, -0.4, 0.1])  # v_old - v
    old_values[index] = values[index] + offsets
    advantages[index] = torch.tensor(ADVANTAGES)
    returns[index] = old_values[index] + torch.linspace(-2.0, 3.0, 12) ** 2
    zeros = torch.zeros(8, 2)
    rollout = ppo.Rollout(obs=obs, actions=actions, logprobs=old_logprobs.reshape(8, 2), rewards=zeros,
                          values=old_values.reshape(8, 2), dones=zeros, valid=valid, last_value=torch.zeros(2),
                          ended_returns=zeros, ended_lengths=zeros)
    return rollout, advantages.reshape(8, 2), returns.reshape(8, 2), index


def seen_steps(net):
    """Records, per forward pass, the storage indices (obs[..., 0] - 1) of the steps it saw."""
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append((args[0][:, 0].long() - 1).tolist()))
    return seen


def per_sample_terms(net, rollout, advantages, returns, index, normalize=False, value_clip_eps=0.2):
    """Each valid step's terms of eq. (9) under `net`, in numpy float64, in storage order [12]."""
    with torch.no_grad():
        logits, values = (x.double().numpy() for x in net(rollout.obs.flatten(0, 1)[index]))
    r, adv = np.array(RATIOS), advantages.flatten()[index].double().numpy()
    if normalize:
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
    old_values, R = rollout.values.flatten()[index].double().numpy(), returns.flatten()[index].double().numpy()
    clipped_values = old_values + np.clip(values - old_values, -value_clip_eps, value_clip_eps)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"policy_loss": -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv),
            "value_loss": 0.5 * np.maximum((values - R) ** 2, (clipped_values - R) ** 2),
            "entropy": -(p * np.log(p)).sum(1), "approx_kl": r - 1 - np.log(r),
            "clip_fraction": (np.abs(r - 1) > 0.2).astype(float)}


@pytest.mark.parametrize("normalize, scale", [(False, 1.0), (True, 1.0), (True, 1e-8)])
def test_update_stats_are_the_batch_means_of_each_term_worked_out_in_numpy(normalize, scale):
    """With lr 0 the policy stays pi, so every minibatch's stats are the same per-sample terms:
    over 2 epochs x 3 minibatches of 4 of the 12 valid steps, their means over those 12. Advantages
    1e-8 small show the normalisation's epsilon: (A - mean) / (std + 1e-8)."""
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)
    seen = seen_steps(net)
    stats = run_update(net, rollout, advantages * scale, returns, update_epochs=2, value_clip_eps=0.2,
                       entropy_coef=0.01, normalize_advantages=normalize)
    assert [len(minibatch) for minibatch in seen] == [4] * 6
    terms = per_sample_terms(net, rollout, advantages * scale, returns, index, normalize)
    expected = {key: np.mean(values) for key, values in terms.items()}
    assert expected["clip_fraction"] == 6 / 12  # 1.5, 0.6, 1.3, 0.7, 1.25, 0.75 are more than 0.2 from 1
    R, old_values = returns.flatten()[index].double().numpy(), rollout.values.flatten()[index].double().numpy()
    expected["explained_variance"] = 1 - np.var(R - old_values) / np.var(R)
    assert {k: stats[k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert (stats["epochs"], stats["minibatches"], ppo.nonfinite(stats, net)) == (2, 6, [])


def test_the_logged_stats_are_the_mean_over_minibatches_the_last_one_smaller():
    """12 valid steps in minibatches of 5: 5, 5 and 2 an epoch. Each stat is the plain mean of the
    minibatches' means (as SB3 logs), so the last, smaller one weighs as much as the others."""
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)
    seen = seen_steps(net)
    stats = run_update(net, rollout, advantages, returns, update_epochs=2, minibatch_size=5, value_clip_eps=0.2)
    minibatches = list(seen)
    assert [len(minibatch) for minibatch in minibatches] == [5, 5, 2] * 2
    terms = per_sample_terms(net, rollout, advantages, returns, index)
    for key, values in terms.items():
        expected = np.mean([np.mean(values[rows_of(minibatch, index)]) for minibatch in minibatches])
        assert stats[key] == pytest.approx(expected, rel=1e-5), key
    assert (stats["epochs"], stats["minibatches"]) == (2, 6)


def test_one_step_follows_the_gradient_of_the_loss_written_out_with_categorical():
    """One minibatch of all 12 valid steps, plain SGD with lr 1: the parameters move by exactly minus
    the gradient of L^CLIP + c1 L^VF - c2 H (eq. 9) over them, each term written out here from
    torch.distributions."""
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)
    reference = small_net()
    logits, values = reference(rollout.obs.flatten(0, 1)[index])
    dist = torch.distributions.Categorical(logits=logits)
    ratio = torch.exp(dist.log_prob(rollout.actions.flatten()[index]) - rollout.logprobs.flatten()[index])
    adv = advantages.flatten()[index]
    policy_loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    value_loss = 0.5 * ((values - returns.flatten()[index]) ** 2).mean()
    (policy_loss + 0.7 * value_loss - 0.3 * dist.entropy().mean()).backward()

    stats = run_update(net, rollout, advantages, returns, lr=1.0, minibatch_size=16, entropy_coef=0.3, value_coef=0.7)
    for stepped, start in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(stepped, start - start.grad, atol=1e-6)
    assert any(p.grad.abs().max() > 1e-3 for p in reference.parameters())
    logged = (stats["policy_loss"], stats["value_loss"], stats["entropy"], stats["minibatches"])
    assert logged == pytest.approx((policy_loss.item(), value_loss.item(), dist.entropy().mean().item(), 1))


@pytest.mark.parametrize("valid, expected_policy_loss", [([0.0, 1.0, 0.0, 0.0], -3.0), ([1.0, 1.0, 0.0, 0.0], 0.0)])
def test_normalising_scales_two_samples_and_leaves_one_alone(valid, expected_policy_loss):
    """At lr 0 the ratio is 1, so the policy loss -L^CLIP is -mean(advantages) over the valid
    steps: normalised ones have mean 0. A single valid sample has no spread: its advantage stays 3
    (dividing by its NaN std would end the run)."""
    net = small_net()
    obs = torch.randn((4, 1, 4), generator=torch.Generator().manual_seed(0))
    actions = torch.zeros((4, 1), dtype=torch.long)
    with torch.no_grad():
        logits, values = net(obs)
    zeros = torch.zeros(4, 1)
    logprobs = torch.distributions.Categorical(logits=logits).log_prob(actions)
    rollout = ppo.Rollout(obs=obs, actions=actions, logprobs=logprobs, rewards=zeros, values=values, dones=zeros,
                          valid=torch.tensor(valid).view(4, 1), last_value=torch.zeros(1), ended_returns=zeros,
                          ended_lengths=zeros)
    advantages = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    stats = run_update(net, rollout, advantages, values + advantages, normalize_advantages=True)
    assert stats["policy_loss"] == pytest.approx(expected_policy_loss, abs=1e-6) and ppo.nonfinite(stats, net) == []


def test_every_epoch_visits_every_valid_step_once_in_a_fresh_order_and_never_an_autoreset_step():
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)
    seen = seen_steps(net)
    stats = run_update(net, rollout, advantages, returns, update_epochs=3)
    assert [len(minibatch) for minibatch in seen] == [4] * 9 and stats["epochs"] == 3  # 12 valid steps / 4, 3 times
    epochs = [sum(seen[i:i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(epoch) == index.tolist() for epoch in epochs)  # the 4 autoreset steps never seen
    assert len({tuple(epoch) for epoch in epochs} | {tuple(index.tolist())}) == 4  # shuffled anew


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom:UserWarning")  # the variance of no sample: NaN, as it should be
def test_a_rollout_of_only_autoreset_steps_takes_no_step():
    net = small_net()
    rollout, advantages, returns, _ = hand_made_rollout(net)
    rollout.valid.zero_()
    before = [p.clone() for p in net.parameters()]
    stats = run_update(net, rollout, advantages, returns, lr=1.0, update_epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert (stats["minibatches"], stats["policy_loss"], stats["loss"]) == (0, 0.0, 0.0)


class NoStep(torch.optim.SGD):
    """An optimizer that computes nothing and never moves the parameters."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        pass


def test_a_non_finite_loss_in_any_minibatch_is_reported_not_only_in_the_last():
    def run(advantages):
        net = small_net()
        seen = seen_steps(net)
        stats = run_update(net, rollout, advantages, returns, optimizer=NoStep)
        return ppo.nonfinite(stats, net), seen

    rollout, advantages, returns, index = hand_made_rollout(small_net())
    assert run(advantages)[0] == []
    _, seen = run(advantages)
    poisoned = seen[0][0]  # a step of the first minibatch
    advantages.view(-1)[poisoned] = float("nan")
    nonfinite, seen = run(advantages)
    assert poisoned not in seen[-1] and nonfinite == ["loss", "gradient norm"]


def test_non_finite_parameters_are_reported_too():
    net = small_net()
    stats = dict(loss=0.5, grad_norm=1.0)
    assert ppo.nonfinite(stats, net) == []
    with torch.no_grad():
        net.value_head.bias.fill_(float("inf"))
    assert ppo.nonfinite(stats, net) == ["parameters"]
    assert ppo.nonfinite(dict(loss=float("nan"), grad_norm=float("inf")), small_net()) == ["loss", "gradient norm"]


def rows_of(seen, index):
    """The positions in RATIOS (the order of the valid steps) of the storage indices seen."""
    position = {step: i for i, step in enumerate(index.tolist())}
    return [position[step] for step in seen if step in position]


def test_kl_early_stop_lets_a_kl_at_the_target_through():
    """target_kl stops the update once a minibatch's KL *exceeds* it: with pi == pi_old exactly
    (a zeroed policy head gives every action log 1/2), KL 0 at target 0 still steps once. The logged
    KL is the mean of both minibatches': 0 for the first, and the second's worked out here from the
    stepped net."""
    net = small_net()
    with torch.no_grad():
        net.policy_head.weight.zero_()
        net.policy_head.bias.zero_()
    rollout, advantages, returns, index = hand_made_rollout(net)
    rollout.logprobs.fill_(-math.log(2))
    seen = seen_steps(net)
    stats = run_update(net, rollout, advantages, returns, lr=1e-2, optimizer=torch.optim.Adam, update_epochs=2,
                       target_kl=0.0)
    assert (stats["minibatches"], stats["epochs"], len(seen)) == (1, 0, 2)
    second = index[rows_of(seen[1], index)]
    with torch.no_grad():
        p = torch.softmax(net(rollout.obs.flatten(0, 1)[second])[0], -1).double().numpy()
    r = p[np.arange(len(second)), rollout.actions.flatten()[second].numpy()] / 0.5
    expected = (0.0 + np.mean(r - 1 - np.log(r))) / 2
    assert len(second) > 0 and stats["approx_kl"] == pytest.approx(expected, rel=1e-4) and stats["approx_kl"] > 0


def test_target_kl_stops_at_the_first_minibatch_whose_kl_exceeds_it_on_both_sides_of_each_kl():
    """With the weights held (SGD at lr 0) each minibatch's KL is its RATIOS' mean of r - 1 - log r.
    Just below a minibatch's KL the update stops there, just above it goes on. Planted: the
    threshold or the KL scaled by 10 or 0.1."""
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)
    seen = seen_steps(net)
    run_update(net, rollout, advantages, returns, update_epochs=2)
    r = np.array(RATIOS)
    kls = [np.mean(r[rows] - 1 - np.log(r[rows])) for rows in (rows_of(m, index) for m in seen)]
    assert len(kls) == 6 and len(set(kls)) > 4
    for target in sorted({k * f for k in kls for f in (1 - 1e-3, 1 + 1e-3)}):
        stepped = next((i for i, kl in enumerate(kls) if kl > target), len(kls))
        stats = run_update(net, rollout, advantages, returns, update_epochs=2, target_kl=target)
        assert (stats["minibatches"], stats["epochs"]) == (stepped, stepped // 3), target


def test_the_update_reports_eq_9s_total_loss_and_the_gradient_norm_before_clipping():
    """loss = -L^CLIP + c1 L^VF - c2 H of the same means; grad_norm the global norm of the gradient
    the step met (SGD at lr 0 leaves it in .grad), before --max-grad-norm clipped it. Planted: the
    logged loss or norm scaled, zeroed or negated."""
    net = small_net()
    rollout, advantages, returns, _ = hand_made_rollout(net)
    settings = dict(value_coef=0.7, entropy_coef=0.05, value_clip_eps=0.2)
    stats = run_update(net, rollout, advantages, returns, **settings)
    assert stats["loss"] == pytest.approx(stats["policy_loss"] + 0.7 * stats["value_loss"] - 0.05 * stats["entropy"],
                                          rel=1e-5)

    def norm_in_grad():
        return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()])).item()

    stats = run_update(net, rollout, advantages, returns, minibatch_size=16, **settings)  # one step
    unclipped = norm_in_grad()
    assert stats["grad_norm"] == pytest.approx(unclipped, rel=1e-5) and unclipped > 1e-2
    stats = run_update(net, rollout, advantages, returns, minibatch_size=16, max_grad_norm=1e-3, **settings)
    assert norm_in_grad() == pytest.approx(1e-3, rel=1e-4) and stats["grad_norm"] == pytest.approx(unclipped, rel=1e-5)


def test_a_kl_stop_before_the_first_step_leaves_the_weights_and_logs_only_its_kl():
    net = small_net()
    rollout, advantages, returns, index = hand_made_rollout(net)  # RATIOS: pi is already far from pi_old
    before = [p.clone() for p in net.parameters()]
    seen = seen_steps(net)
    stats = run_update(net, rollout, advantages, returns, lr=1.0, update_epochs=2, target_kl=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert (stats["minibatches"], stats["epochs"], ppo.nonfinite(stats, net), len(seen)) == (0, 0, [], 1)
    assert [stats[k] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction")] == [0.0] * 4
    r = np.array(RATIOS)[rows_of(seen[0], index)]
    assert stats["approx_kl"] == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-5)  # the KL that stopped it
    R, old_values = returns.flatten()[index].numpy(), rollout.values.flatten()[index].numpy()
    assert stats["explained_variance"] == pytest.approx(1 - np.var(R - old_values) / np.var(R), rel=1e-5)


def test_normalised_advantages_make_a_solved_policys_small_advantages_as_big_a_step_as_learning():
    """The long-run mechanism: once solved, the advantages shrink ~30x (README, "The long run").
    Normalised, the update cannot tell: its step is as large as while learning. Raw (the
    default), one SGD step shrinks with them, exactly 30x."""
    _, _, [rollout] = collect(num_envs=4, num_steps=16)
    advantages, returns = ppo.compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value, 0.99, 0.95)

    def policy_step(scale, normalize):
        net = small_net(0)
        start = net.policy_head.weight.detach().clone()
        run_update(net, rollout, advantages * scale, returns, lr=0.1,  # SGD: a step proportional to the gradient
                   minibatch_size=64, value_coef=0.0, normalize_advantages=normalize)
        return net.policy_head.weight.detach() - start

    learning, solved = policy_step(1.0, True), policy_step(1 / 30, True)
    assert learning.abs().max() > 1e-4 and torch.allclose(solved, learning, atol=1e-6)
    learning, solved = policy_step(1.0, False), policy_step(1 / 30, False)
    assert learning.abs().max() > 1e-4 and torch.allclose(solved, learning / 30, rtol=1e-4, atol=1e-8)


def test_update_runs_k_epochs_of_minibatches_that_cover_every_valid_step():
    _, _, [rollout] = collect(num_envs=4, num_steps=32)
    valid = int(rollout.valid.sum())
    assert valid < 128  # some autoreset steps
    net = small_net()
    batch_sizes = []
    net.register_forward_hook(lambda module, args, out: batch_sizes.append(len(args[0])))
    _, stats = update(rollout, net=net, minibatch_size=16)
    per_epoch = [16] * (valid // 16) + ([valid % 16] if valid % 16 else [])
    assert batch_sizes == per_epoch * 4 and stats["epochs"] == 4 and stats["minibatches"] == 4 * len(per_epoch)
    assert type(stats["epochs"]) is int and type(stats["minibatches"]) is int  # counts: metrics.csv writes 4, not 4.0


def test_gae_and_the_update_ignore_the_autoreset_steps_rewards_and_values():
    _, _, [rollout] = collect(num_envs=4, num_steps=64)
    invalid = rollout.valid == 0
    assert invalid.any()
    poisoned = ppo.Rollout(**vars(rollout))
    poisoned.rewards = rollout.rewards.masked_fill(invalid, 1e6)
    poisoned.values = rollout.values.masked_fill(invalid, -1e6)
    poisoned.logprobs = rollout.logprobs.masked_fill(invalid, float("nan"))
    clean_net, _ = update(rollout)
    poisoned_net, _ = update(poisoned)
    for a, b in zip(clean_net.parameters(), poisoned_net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("poison", ["finite", "nan"])
def test_the_autoreset_steps_have_no_effect_whatever_they_hold(normalize, poison):
    """Their obs, actions (in range), old logprobs, old values, advantages and returns set to other
    finite values, or to NaN: the weights after an update (Adam, clipped values) are identical."""
    def run(rollout, advantages, returns):
        net = small_net()
        stats = run_update(net, rollout, advantages, returns, lr=1e-2, optimizer=torch.optim.Adam, update_epochs=2,
                           value_clip_eps=0.2, entropy_coef=0.01, max_grad_norm=0.5, normalize_advantages=normalize)
        return list(net.parameters()), stats

    rollout, advantages, returns, _ = hand_made_rollout(small_net())
    clean_weights, clean_stats = run(rollout, advantages, returns)
    invalid = rollout.valid == 0
    generator = torch.Generator().manual_seed(1)

    def poisoned(x):
        values = torch.full_like(x, float("nan")) if poison == "nan" else torch.randn(x.shape, generator=generator) * 1e3
        return torch.where(invalid.view(8, 2, *[1] * (x.dim() - 2)), values, x)

    dirty = ppo.Rollout(**vars(rollout) | dict(
        obs=poisoned(rollout.obs), logprobs=poisoned(rollout.logprobs), values=poisoned(rollout.values),
        actions=torch.where(invalid, 1 - rollout.actions, rollout.actions)))
    dirty_weights, dirty_stats = run(dirty, poisoned(advantages), poisoned(returns))
    assert all(torch.equal(a, b) for a, b in zip(clean_weights, dirty_weights))
    assert dirty_stats == clean_stats and all(math.isfinite(v) for v in clean_stats.values())


def reference_update(net, optimizer, rollout, advantages, returns, update_epochs, minibatch_size, clip_eps,
                     value_clip_eps, value_coef, entropy_coef, max_grad_norm):
    """PPO's update written the plain way (CleanRL's shape): the valid steps' indices, a fresh
    randperm of them each epoch cut into minibatches, eq. (9) from torch.distributions, the
    gradient clipped by hand. Draws the same permutations as ppo_update from torch's RNG."""
    index = rollout.valid.flatten().nonzero().squeeze(1)
    b_obs, b_actions = rollout.obs.flatten(0, 1)[index], rollout.actions.flatten()[index]
    b_logprobs, b_values = rollout.logprobs.flatten()[index], rollout.values.flatten()[index]
    b_advantages, b_returns = advantages.flatten()[index], returns.flatten()[index]
    for _ in range(update_epochs):
        order = torch.randperm(len(index))
        for start in range(0, len(index), minibatch_size):
            mb = order[start:start + minibatch_size]
            logits, values = net(b_obs[mb])
            dist = torch.distributions.Categorical(logits=logits)
            ratio = torch.exp(dist.log_prob(b_actions[mb]) - b_logprobs[mb])
            adv = b_advantages[mb]
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv).mean()
            clipped = b_values[mb] + (values - b_values[mb]).clamp(-value_clip_eps, value_clip_eps)
            v_loss = 0.5 * torch.max((values - b_returns[mb]) ** 2, (clipped - b_returns[mb]) ** 2).mean()
            loss = policy_loss + value_coef * v_loss - entropy_coef * dist.entropy().mean()
            optimizer.zero_grad()
            loss.backward()
            clip_gradient_norm(net, max_grad_norm)
            optimizer.step()


def clip_gradient_norm(net, max_norm):
    grads = [p.grad for p in net.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for g in grads:
        g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


@pytest.mark.parametrize("minibatch_size", [4, 5])
def test_the_update_equals_a_reference_update_written_the_plain_way_on_the_same_minibatches(minibatch_size):
    """Adam, clipped values, an entropy bonus, the gradient clip, 3 epochs, autoreset steps in the
    rollout, and minibatches of 4 (3 an epoch) or 5 (5, 5, 2): the same weights after."""
    rollout, advantages, returns, _ = hand_made_rollout(small_net())
    nets = [small_net(), small_net()]
    settings = dict(update_epochs=3, minibatch_size=minibatch_size, clip_eps=0.2, value_clip_eps=0.2,
                    value_coef=0.5, entropy_coef=0.01, max_grad_norm=0.5)
    run_update(nets[0], rollout, advantages, returns, lr=1e-2, optimizer=torch.optim.Adam, seed=3, **settings)
    torch.manual_seed(3)
    reference_update(nets[1], torch.optim.Adam(nets[1].parameters(), lr=1e-2), rollout, advantages, returns, **settings)
    moved = max((a - b).abs().max() for a, b in zip(nets[1].parameters(), small_net().parameters()))
    assert moved > 1e-2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*(n.parameters() for n in nets)))


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor on the host or size their result by the data (a boolean
    mask's indexing, nonzero, ...): on a GPU each waits for the device, and a CUDA graph cannot
    hold them."""

    DATA_SIZED = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "_unique2",
                  "unique_consecutive", "is_nonzero", "equal", "repeat_interleave", "argwhere"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in self.DATA_SIZED or masks:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_a_rollout_of_the_torch_backend_neither_reads_the_host_nor_sizes_by_the_data():
    """The torch backend's rollout (the forward pass, Categorical's sampling, TorchCartPole's step,
    the buffer writes): no op that a GPU would wait on. The recorder can fail: the update, which
    drops the autoreset steps by a boolean index, is seen."""
    net = small_net()
    collector = ppo.Collector(ppo.TorchCartPole(4), 16, 0, torch.device("cpu"))
    with HostReads() as reads:
        rollout = collector.collect(net, 0.99)
    assert reads.seen == [] and rollout.dones.sum() > 0 and (rollout.valid == 0).any()
    with HostReads() as reads:
        update(rollout, net=net, update_epochs=1)
    assert "nonzero" in reads.seen and "_local_scalar_dense" in reads.seen


def test_minibatch_stats_are_detached_so_that_keeping_them_keeps_no_graph():
    """The update keeps every minibatch's stats until its end: with their graphs, each would hold its
    minibatch's activations. Planted: the detach dropped."""
    net, inputs = small_net(), rollout_tensors()
    loss, stats = ppo.minibatch_loss(net, *inputs, clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5, entropy_coef=0.01)
    assert loss.requires_grad and stats.keys() == {"policy_loss", "value_loss", "entropy", "loss", "approx_kl",
                                                   "clip_fraction"}
    assert not any(value.requires_grad or value.grad_fn is not None for value in stats.values())


def test_a_sample_at_the_clip_boundary_is_not_counted_as_clipped():
    """The clip fraction counts |r - 1| > eps, strictly: pi == pi_old is never clipped, even at eps 0."""
    net = small_net()
    obs = torch.randn((6, 4), generator=torch.Generator().manual_seed(0))
    actions = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        old_logprobs = torch.distributions.Categorical(logits=net(obs)[0]).log_prob(actions)
    zeros = torch.zeros(6)
    for clip_eps, fraction in ((0.0, 0.0), (0.2, 0.0)):
        _, stats = ppo.minibatch_loss(net, obs, actions, old_logprobs, zeros, zeros, zeros, clip_eps=clip_eps,
                                      value_clip_eps=None, value_coef=0.5, entropy_coef=0.0)
        assert stats["clip_fraction"].item() == fraction
    _, stats = ppo.minibatch_loss(net, obs, actions, old_logprobs - 0.5, zeros, zeros, zeros, clip_eps=0.2,
                                  value_clip_eps=None, value_coef=0.5, entropy_coef=0.0)
    assert stats["clip_fraction"].item() == 1.0  # r = e^0.5: every sample past 1 + eps


def test_ppo_update_clips_the_gradient_norm_before_the_step():
    _, _, [rollout] = collect(num_envs=4, num_steps=32)
    norms = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.param_groups[0]["params"]])))
            return super().step(closure)

    net = small_net()
    update(rollout, net=net, optimizer=RecordingSGD, lr=1e-3, max_grad_norm=1e-3)
    assert norms and all(norm <= 1e-3 * (1 + 1e-4) for norm in norms)
    norms.clear()
    net = small_net()
    update(rollout, net=net, optimizer=RecordingSGD, lr=1e-3, max_grad_norm=None)
    assert max(norms) > 1e-2  # unclipped, the same update's gradients are far larger


# ==== Copying a piece out =========================================================================

def needs(name: str) -> set[str]:
    """The pieces `name`'s docstring says a copy needs: "... Needs: A, B." -> {A, B}."""
    match = re.search(r"Needs: ([\w, ]+)\.", " ".join(getattr(ppo, name).__doc__.split()))
    return set(match.group(1).split(", ")) if match else set()


def pasted(name: str):
    """ppo_cartpole's `name` and every piece its docstring's Needs line names (and theirs), exec'd in a
    fresh namespace after the script's own imports, as if pasted into a new file. None under mutmut,
    whose copy of the script wraps every function in its own machinery."""
    source = Path(ppo.__file__).read_text()
    if "mutmut" in source:
        return None
    names, todo = set(), [name]
    while todo:
        piece = todo.pop()
        if piece not in names:
            names.add(piece)
            todo += needs(piece)
    tree = ast.parse(source)
    imports = [ast.get_source_segment(source, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and getattr(node, "module", None) != "__future__"]
    nodes = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    lines = source.splitlines()
    chunks = imports + ["\n".join(lines[nodes[n].lineno - 1 - len(nodes[n].decorator_list):nodes[n].end_lineno])
                        for n in sorted(names, key=lambda n: nodes[n].lineno)]  # in the script's order
    namespace = {"__name__": "pasted"}  # no `from __future__ import annotations`: a copy runs without it
    exec(compile("\n\n".join(chunks), "pasted.py", "exec"), namespace)
    return types.SimpleNamespace(**{n: namespace[n] for n in names})


def same(a, b) -> bool:
    """Equal results: tensors bit for bit, and containers of them."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def exercises():
    """name -> a call of that piece, given the module it comes from: the pasted copy or ppo_cartpole."""
    generator = torch.Generator().manual_seed(0)
    rewards, values, dones = torch.rand((3, 8, 2), generator=generator)
    gae_inputs = (rewards, values, (dones > 0.7).float(), torch.rand(2, generator=generator), 0.9, 0.8)
    x, y, z = torch.randn((3, 6), generator=generator)
    obs = torch.randn((5, 4), generator=generator)

    def network(m):
        torch.manual_seed(0)
        return list(m.ActorCritic(4, 2)(obs))

    def collect(m):
        collector = m.Collector(ppo.TorchCartPole(3), 40, 0, torch.device("cpu"))
        net = small_net(0)
        torch.manual_seed(0)
        return dict(vars(collector.collect(net, 0.99)))

    def minibatch(m):
        net, (obs_, actions, logprobs, old_values, advantages, returns) = small_net(0), rollout_tensors()
        loss, stats = m.minibatch_loss(net, obs_, actions, logprobs, old_values, advantages, returns,
                                       clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5, entropy_coef=0.01)
        loss.backward()
        return [loss, stats, [p.grad for p in net.parameters()]]

    def update(m):
        net = small_net(0)
        rollout, advantages, returns, _ = hand_made_rollout(net)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        torch.manual_seed(0)
        stats = m.ppo_update(net, optimizer, m.Rollout(**vars(rollout)), advantages, returns, update_epochs=2,
                             minibatch_size=5, clip_eps=0.2, value_clip_eps=0.2, entropy_coef=0.01, value_coef=0.5,
                             max_grad_norm=0.5, normalize_advantages=True)
        return [stats, list(net.parameters())]

    return {
        "compute_gae": lambda m: m.compute_gae(*gae_inputs),
        "clipped_surrogate_loss": lambda m: m.clipped_surrogate_loss(x.exp(), y, 0.2),
        "value_loss": lambda m: [m.value_loss(x, y, z, 0.2), m.value_loss(x, y, z, None)],
        "approx_kl": lambda m: m.approx_kl(x - y),
        "explained_variance": lambda m: m.explained_variance(x, y),
        "layer_init": lambda m: (torch.manual_seed(0), m.layer_init(torch.nn.Linear(3, 2), 2.0).weight)[1],
        "ActorCritic": network,
        "Rollout": lambda m: vars(m.Rollout(**vars(hand_made_rollout(small_net(0))[0]))), "Collector": collect,
        "lr_at": lambda m: m.lr_at(3, 10, 1e-3, True),
        "entropy_coef_at": lambda m: m.entropy_coef_at(3, 10, 0.02, 0.001),
        "minibatch_loss": minibatch,
        "ppo_update": update,
    }


def rollout_tensors():
    """A minibatch's inputs from the hand-made rollout's valid steps: obs [M, D], then actions, log pi_old,
    V_old, advantages and returns [M]."""
    rollout, advantages, returns, index = hand_made_rollout(small_net(0))
    return (rollout.obs.flatten(0, 1)[index], *(x.flatten()[index] for x in (
        rollout.actions, rollout.logprobs, rollout.values, advantages, returns)))


@pytest.mark.parametrize("name", sorted(exercises()))
def test_each_piece_runs_pasted_into_a_fresh_file_with_what_its_docstring_names(name):
    piece = pasted(name)
    if piece is None:
        pytest.skip("mutmut's copy of the script")
    call = exercises()[name]
    assert same(call(piece), call(ppo))


def test_the_algorithm_above_the_banner_names_nothing_defined_below_it():
    """A reader who stops at the banner has read all of PPO: no code above it (docstrings may point
    down) uses a name that only the machinery below defines."""
    source = Path(ppo.__file__).read_text()
    if "mutmut" in source:
        pytest.skip("mutmut's copy of the script")
    cut = source.rindex("\n# ####", 0, source.index("PPO ends above"))  # the banner's first line
    above, below = ast.parse(source[:cut]), ast.parse(source[cut:])
    defined = lambda tree: {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    used = {node.id for node in ast.walk(above) if isinstance(node, ast.Name)}
    assert {"RunLog", "make_envs", "train", "TorchCartPole"} <= defined(below) - defined(above)
    assert used & (defined(below) - defined(above)) == set()
    assert {"Collector", "ppo_update", "ppo_iterations"} <= defined(above)


def test_every_piece_of_the_algorithm_is_exercised_pasted_alone():
    source = Path(ppo.__file__).read_text().split("PPO ends above")[0]
    if "mutmut" in source:
        pytest.skip("mutmut's copy of the script")
    pieces = [node.name for node in ast.parse(source + "\n").body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
              and node.name not in ("option", "Config", "ppo_iterations")]
    assert needs("ppo_update") == {"Rollout", "minibatch_loss", "explained_variance"}  # the line the paste test reads
    assert sorted(pieces) == sorted(exercises())


# ==== The training loop ===========================================================================

QUICK = ["--buffer-size", "256", "--num-envs", "4", "--minibatch-size", "32", "--update-epochs", "2",
         "--eval-episodes", "2"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_rows(out):
    """metrics.csv and episodes.csv of a run folder, without their wall-clock columns."""
    clock = ("seconds", "steps_per_second")
    return [[{k: v for k, v in row.items() if k not in clock} for row in read_csv(out / name)]
            for name in ("metrics.csv", "episodes.csv")]


def test_two_iteration_run_writes_every_artifact(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "2", "--out-dir", str(out)]) == 0
    for name in ("best.pt", "final.pt", "metrics.csv", "episodes.csv", "summary.json", "training.png", "agent.gif"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("solved_at_step", "solved_at_seconds", "best_ema_return", "eval_return_mean", "env_steps",
                "seconds", "config", "versions", "torch_threads", "device"):
        assert key in summary
    assert summary["env_steps"] == 512 and summary["config"]["buffer_size"] == 256
    assert len(read_csv(out / "metrics.csv")) == 2
    episodes = read_csv(out / "episodes.csv")
    assert len(episodes) == summary["episodes"] > 0
    assert all(0 < int(e["env_step"]) <= 512 for e in episodes)
    ppo.load_agent(out / "best.pt")


def test_same_seed_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):
        ppo.main(QUICK + ["--episodes", "3", "--no-plot", "--no-gif", "--out-dir", str(tmp_path / name)])
    assert run_rows(tmp_path / "a") == run_rows(tmp_path / "b")


def test_the_loop_sets_the_scheduled_lr_on_the_optimizer_each_iteration(tmp_path, monkeypatch):
    real_update, seen = ppo.ppo_update, []

    def recording_update(net, optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups] + [float(kwargs["entropy_coef"])])
        return real_update(net, optimizer, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    ppo.main(QUICK + ["--episodes", "4", "--lr", "0.01", "--entropy-coef", "0.02", "--entropy-floor", "0.006",
                      "--no-plot", "--no-gif", "--out-dir", str(tmp_path / "run")])
    entropy_coefs = [0.02, 0.015, 0.01, 0.006]  # what the update reads, from the tensor filled in place
    assert seen == [[pytest.approx(0.01 * (1 - i / 4)), pytest.approx(coef)] for i, coef in enumerate(entropy_coefs)]
    metrics = read_csv(tmp_path / "run" / "metrics.csv")  # and metrics.csv logs both schedules
    assert [float(row["lr"]) for row in metrics] == pytest.approx([0.01, 0.0075, 0.005, 0.0025])
    assert [float(row["entropy_coef"]) for row in metrics] == pytest.approx([0.02, 0.015, 0.01, 0.006])


def test_the_loop_passes_each_setting_to_its_own_argument(tmp_path, monkeypatch):
    """Planted: two settings of one type swapped on their way to the update or the collector (a
    clip of 0.15 and a value weight of 0.7 both train)."""
    real_update, real_collect, seen = ppo.ppo_update, ppo.Collector.collect, {}

    def recording_update(*args, **kwargs):
        seen.update({k: v for k, v in kwargs.items() if k != "entropy_coef"})
        return real_update(*args, **kwargs)

    def recording_collect(self, net, gamma):
        seen["gamma"] = gamma
        return real_collect(self, net, gamma)

    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    monkeypatch.setattr(ppo.Collector, "collect", recording_collect)
    flags = dict(update_epochs=3, minibatch_size=64, clip_eps=0.15, value_clip_eps=0.3, value_coef=0.7,
                 max_grad_norm=0.9, target_kl=50.0, gamma=0.97)
    argv = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    ppo.main(QUICK + argv + ["--episodes", "1", "--normalize-advantages", "--confirm-episodes", "0", "--no-plot",
                             "--no-gif", "--out-dir", str(tmp_path / "run")])
    assert seen == flags | {"normalize_advantages": True}


def test_the_loop_hands_the_update_gaes_advantages_and_returns_in_their_places(monkeypatch):
    """Planted: advantages and returns swapped on their way to ppo_update (both [T, N] tensors)."""
    real_gae, real_update, made, given = ppo.compute_gae, ppo.ppo_update, [], []

    def recording_gae(*args):
        made.append(real_gae(*args))
        return made[-1]

    def recording_update(net, optimizer, rollout, advantages, returns, **settings):
        given.append((advantages, returns))
        return real_update(net, optimizer, rollout, advantages, returns, **settings)

    monkeypatch.setattr(ppo, "compute_gae", recording_gae)
    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    config = ppo.Config(num_envs=4, buffer_size=64, minibatch_size=32, num_iterations=2)
    envs = ppo.make_envs("CartPole-v1", 4, torch.device("cpu"))
    net = small_net()
    list(ppo.ppo_iterations(config, envs, net, torch.optim.Adam(net.parameters(), lr=config.lr)))
    envs.close()
    assert len(given) == 2 and all(a is m[0] and r is m[1] for (a, r), m in zip(given, made))


@pytest.mark.parametrize("settings", [{}, dict(betas=(0.5, 0.9), eps=1e-3)])  # {}: both at their defaults
def test_adam_takes_the_steps_torch_optims_adam_takes(settings):
    nets = [small_net(seed=1), small_net(seed=1)]
    ours = ppo.Adam(nets[0].parameters(), lr=1e-2, **settings)
    theirs = torch.optim.Adam(nets[1].parameters(), lr=1e-2, foreach=False, **settings)
    obs = torch.randn(40, 16, 4, generator=torch.Generator().manual_seed(0))
    for step, x in enumerate(obs):
        for net, optimizer in zip(nets, (ours, theirs)):
            if step:  # the first step at the lr it was built with; then set between steps, as the loop does
                optimizer.param_groups[0]["lr"] = 1e-2 / (1 + step)
            optimizer.zero_grad()
            logits, values = net(x)
            (logits.logsumexp(-1) + values ** 2).mean().backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max((a - small_net(seed=1).state_dict()[k]).abs().max() for k, a in nets[0].state_dict().items()) > 0.01


def test_adams_zero_grad_clears_every_gradient():
    net = small_net()
    optimizer = ppo.Adam(net.parameters(), lr=1e-3)
    sum(t.sum() for t in net(torch.ones(2, 4))).backward()
    optimizer.zero_grad()
    assert [p.grad for p in net.parameters()] == [None] * len(list(net.parameters()))


def test_the_loop_runs_gae_on_each_rollouts_own_rewards_values_and_dones(monkeypatch):
    real_gae, calls = ppo.compute_gae, []

    def recording_gae(*args):
        calls.append(args)
        return real_gae(*args)

    monkeypatch.setattr(ppo, "compute_gae", recording_gae)
    config = ppo.Config(num_envs=4, buffer_size=64, minibatch_size=32, num_iterations=2, gamma=0.97, gae_lambda=0.9)
    envs = ppo.make_envs("CartPole-v1", 4, torch.device("cpu"))
    net = small_net()
    rollouts = [rollout for rollout, _ in ppo.ppo_iterations(config, envs, net, ppo.Adam(net.parameters(), lr=1e-3))]
    assert len(calls) == 2
    for args, rollout in zip(calls, rollouts):
        assert [a is b for a, b in zip(args, (rollout.rewards, rollout.values, rollout.dones, rollout.last_value))] \
            == [True] * 4 and args[4:] == (0.97, 0.9)
    envs.close()


def test_the_summary_splits_the_run_time_into_collecting_and_updating(tmp_path):
    out = tmp_path / "run"
    ppo.main(QUICK + ["--episodes", "3", "--confirm-episodes", "0", "--no-plot", "--no-gif", "--out-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    collect, update = summary["collect_seconds"], summary["update_seconds"]
    assert 0 < collect and 0 < update and collect + update < summary["seconds"] < 60
    assert summary["collect_steps_per_second"] == pytest.approx(summary["env_steps"] / collect)


def test_train_resolves_a_config_as_parse_args_does(tmp_path):
    out = str(tmp_path / "run")
    direct = ppo.train(ppo.Config(num_iterations=1, num_envs=4, buffer_size=256), ppo.RunConfig(
        confirm_episodes=0, eval_episodes=1, plot=False, gif=False, out_dir=out))["config"]
    from_flags = parsed(["--episodes", "1", "--num-envs", "4", "--buffer-size", "256", "--confirm-episodes", "0",
                         "--eval-episodes", "1", "--no-plot", "--no-gif", "--out-dir", str(tmp_path / "other")])
    assert direct == vars(from_flags) | {"out_dir": out}
    assert (direct["minibatch_size"], direct["target_return"], direct["env_backend"]) == (256, 475.0, "gymnasium")


def test_stop_when_solved_stops_at_the_solve_without_confirmation(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "50", "--target-return", "12", "--stop-when-solved", "--confirm-episodes",
                             "0", "--no-plot", "--no-gif", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solved_at_step"] is not None and summary["iterations"] == summary["solved_at_iteration"] + 1


@pytest.mark.parametrize("interrupt, signal_name, status", [(KeyboardInterrupt(), "SIGINT", 130),
                                                            (ppo.Interrupted("SIGTERM"), "SIGTERM", 143)])
def test_ctrl_c_or_sigterm_keeps_metrics_best_and_final_and_exits_128_plus_the_signal(
        tmp_path, monkeypatch, capsys, interrupt, signal_name, status):
    """The clean-up plays no greedy episodes: checks and evaluation can take long (--confirm-episodes
    and --eval-episodes up to 10,000), and a user who sends a signal wants the run to end now."""
    real_update, real_evaluate, calls = ppo.ppo_update, ppo.evaluate, []

    def interrupted_update(*args, **kwargs):  # main's SIGTERM handler raises Interrupted("SIGTERM")
        calls.append("update")
        if calls.count("update") == 3:
            raise interrupt
        return real_update(*args, **kwargs)

    def evaluate(*args):
        calls.append("evaluate")
        return real_evaluate(*args)

    monkeypatch.setattr(ppo, "ppo_update", interrupted_update)
    monkeypatch.setattr(ppo, "evaluate", evaluate)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "10", "--no-gif", "--out-dir", str(out)]) == status
    assert f"{signal_name}: writing final.pt, metrics, plot and summary" in capsys.readouterr().err
    assert calls[-1] == "update" and "evaluate" in calls  # best.pt was checked while training, not after
    assert len(read_csv(out / "metrics.csv")) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["signal"] == signal_name and "interrupted" not in summary
    assert summary["eval_return_mean"] is None and summary["eval_episodes"] == 0
    for name in ("best.pt", "final.pt", "training.png"):
        assert (out / name).exists()


def test_the_progress_bar_shows_the_run_as_it_goes(tmp_path, capsys):
    ppo.main(QUICK + ["--episodes", "3", "--confirm-episodes", "0", "--no-plot", "--no-gif", "--out-dir",
                      str(tmp_path / "run")])
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # the bar's final state
    assert re.match(r"PPO: 100%.* 3/3 .*it/s, steps=768, ret=[\d.]+, ema=\d+, mean100=\d+, sps=\d+\]$", last), last


def test_the_progress_bar_writes_integers_as_integers_however_long():
    bar = tqdm.tqdm(total=1, file=io.StringIO())
    log = types.SimpleNamespace(env_steps=2_000_000, tracker=ppo.ReturnTracker(0.1, 475), rows={"episodes": []}, seconds={},
                                start=time.perf_counter() - 1.0, write=lambda name, rows: None)
    ppo.RunLog.metrics(log, 0, {}, episodes=0)
    bar.set_postfix(log.progress)
    assert "steps=2000000," in str(bar) and re.search(r"sps=\d{6,7}\b", str(bar)), str(bar)


def test_the_run_seeds_torch_once_so_what_came_before_it_changes_nothing(tmp_path):
    """Sampling and shuffling draw from torch's RNG, seeded by train as CleanRL seeds it: draws made
    before the run leave it as it was; another --seed gives another run."""
    argv = QUICK + ["--episodes", "3", "--confirm-episodes", "0", "--no-plot", "--no-gif", "--out-dir"]
    ppo.main(argv + [str(tmp_path / "first")])
    torch.rand(1000)
    ppo.main(argv + [str(tmp_path / "second")])
    ppo.main(argv + [str(tmp_path / "other"), "--seed", "2"])
    assert run_rows(tmp_path / "first") == run_rows(tmp_path / "second") != run_rows(tmp_path / "other")


@pytest.mark.parametrize("backend, mode, kind", [("torch", "auto", ppo.TorchCartPole),
                                                 ("gymnasium", "sync", gym.vector.SyncVectorEnv),
                                                 ("gymnasium", "vector_entry_point", CartPoleVectorEnv)])
def test_train_steps_the_backend_and_vectorisation_it_is_given(tmp_path, monkeypatch, backend, mode, kind):
    stepped, real_make_envs = [], ppo.make_envs

    def recording_make_envs(*args):
        envs = real_make_envs(*args)
        stepped.append(getattr(envs, "env", envs))  # NumpyToTorch wraps a gymnasium vector env
        return envs

    monkeypatch.setattr(ppo, "make_envs", recording_make_envs)
    ppo.main(QUICK + ["--episodes", "1", "--env-backend", backend, "--vectorization-mode", mode, "--confirm-episodes",
                      "0", "--eval-episodes", "1", "--no-plot", "--no-gif", "--out-dir", str(tmp_path / "run")])
    assert len(stepped) == 1 and type(stepped[0]) is kind


def test_each_update_flag_reaches_the_update(tmp_path):
    """A flag that changes nothing is a bug: each of these must change the run's losses."""
    argv = QUICK + ["--episodes", "2", "--confirm-episodes", "0", "--no-plot", "--no-gif", "--out-dir"]
    ppo.main(argv + [str(tmp_path / "default")])
    default, _ = run_rows(tmp_path / "default")
    for flags in (["--value-clip-eps", "0.01"], ["--normalize-advantages"], ["--max-grad-norm", "1e-6"],
                  ["--target-kl", "1e-9"]):
        ppo.main(argv + [str(tmp_path / flags[0]), *flags])
        metrics, _ = run_rows(tmp_path / flags[0])
        assert [row["value_loss"] for row in metrics] != [row["value_loss"] for row in default], flags
    assert [int(row["minibatches"]) for row in metrics] == [1, 1]  # --target-kl 1e-9: one step, then KL > 1e-9


def test_divergence_stops_the_run_and_keeps_the_last_finite_best_pt(tmp_path, monkeypatch, capsys):
    real_update, calls = ppo.ppo_update, []

    def poisoned_update(net, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                net.value_head.weight.fill_(float("nan"))  # what a too-large step would leave
        return real_update(net, *args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", poisoned_update)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "20", "--no-gif", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "diverged at iteration 3: the loss and gradient norm and parameters" in err
    lr = ppo.Config().lr * (1 - 3 / 20)  # iteration 3 of 20, annealed
    assert f"stopping. Try a lower --lr (now {lr:.3g})." in err  # clipping is on (0.5): not suggested again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["divergence"].startswith("iteration 3") and summary["iterations"] == 4 and len(read_csv(out / "metrics.csv")) == 4
    net, _ = ppo.load_agent(out / "best.pt")
    assert all(p.isfinite().all() for p in net.parameters())
    assert not (out / "final.pt").exists() and (out / "training.png").exists()
    assert read_csv(out / "metrics.csv")[-1]["best_saved"] == "0"  # the NaN policy was not saved


def huge_reward_cartpole(**kwargs):
    """CartPole paying 1e30 a step: an unscaled quantity, finite in float32, whose squares are not."""
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv
    return gym.wrappers.TransformReward(CartPoleEnv(**kwargs), lambda reward: reward * 1e30)


def test_rewards_too_large_for_float32_are_named_as_the_cause_not_the_lr(tmp_path, capsys, recwarn):
    gym.register("HugeRewardCartPole-v0", entry_point=huge_reward_cartpole, max_episode_steps=500,
                 reward_threshold=475)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--env-id", "HugeRewardCartPole-v0", "--episodes", "5", "--no-gif", "--out-dir",
                             str(out)]) == 1
    err = capsys.readouterr().err
    assert "diverged at iteration 0" in err and "scale them (gymnasium.wrappers.NormalizeReward" in err
    assert "--lr" not in err and "Traceback" not in err
    assert (out / "training.png").exists() and not [w for w in recwarn if "log-scaled" in str(w.message)]


def test_divergence_advice_names_no_setting_already_in_force():
    rollout = ppo.Rollout(**{k: torch.ones(4, 2) for k in ("obs", "actions", "logprobs", "rewards", "values", "dones",
                                                            "valid", "ended_returns", "ended_lengths")},
                          last_value=torch.zeros(2))
    assert ppo.divergence_advice(rollout, 0.99, 0.003, 0.5) == "Try a lower --lr (now 0.003)."
    assert ppo.divergence_advice(rollout, 0.99, 0.003, 0.0) == \
        "Try a lower --lr (now 0.003) or gradient clipping (--max-grad-norm 0.5)."
    limit = math.sqrt(ppo.FLOAT32_MAX)  # a return's square at float32's largest
    for gamma, horizon in ((0.99, 100), (1.0, 4)):  # gamma 1: the rollout's T steps
        rollout.rewards.fill_(limit / horizon * 1.01)
        assert ppo.divergence_advice(rollout, gamma, 0.003, 0.5).startswith("The rewards reach")
        rollout.rewards.fill_(-limit / horizon * 0.99)
        assert ppo.divergence_advice(rollout, gamma, 0.003, 0.5).startswith("Try a lower --lr")


# ==== CartPole in torch ===========================================================================

def test_torch_envs_reset_to_initial_states_drawn_from_their_own_generator_at_each_step():
    """Each step draws a full [N, 4] batch of initial states, in the env's dtype, from the env's
    generator (seeded by the collector's one reset); an env that resets at that step starts from
    its row. The collector draws nothing for the env."""
    envs = ppo.TorchCartPole(4, dtype=torch.float64)
    collector = ppo.Collector(envs, 64, 0, torch.device("cpu"))
    twin = torch.Generator().manual_seed(0)  # the env's generator after reset(seed=0)
    torch.empty(4, 4, dtype=torch.float64).uniform_(-0.05, 0.05, generator=twin)  # reset's own draw
    resets = 0
    for _ in range(2):
        rollout = collector.collect(small_net(), 0.99)
        expected = torch.empty(64, 4, 4, dtype=torch.float64).uniform_(-0.05, 0.05, generator=twin)  # [T, N, 4]
        next_obs = torch.cat([rollout.obs[1:], collector.next_obs.unsqueeze(0)])  # [T, N, 4]: after step t
        reset = rollout.valid == 0  # step t only reset the env
        assert torch.equal(next_obs[reset], expected[reset].float())
        resets += int(reset.sum())
    assert resets > 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cartpole_observations_are_float32_copies_that_later_steps_leave_alone(dtype):
    envs = ppo.TorchCartPole(3, dtype=dtype)
    first, _ = envs.reset(seed=0)
    second = envs.step(torch.tensor([0, 1, 1]))[0]
    saved = first.clone(), second.clone()
    envs.step(torch.tensor([1, 0, 1]))
    assert first.dtype == second.dtype == torch.float32
    assert torch.equal(first, saved[0]) and torch.equal(second, saved[1]) and not torch.equal(first, second)


def twin_envs(num_envs, seed=0):
    """gymnasium's CartPoleVectorEnv and a float64 TorchCartPole starting from its states."""
    gym_envs = CartPoleVectorEnv(num_envs=num_envs)
    gym_envs.reset(seed=seed)
    torch_envs = ppo.TorchCartPole(num_envs, dtype=torch.float64)
    torch_envs.reset(seed=seed)
    torch_envs.state = torch.tensor(gym_envs.state.T.copy())  # gymnasium stores [4, N]
    return gym_envs, torch_envs


@pytest.mark.parametrize("action", [0, 1])
def test_torch_cartpole_step_matches_gymnasium_to_1e12(action):
    rng = np.random.default_rng(action)
    gym_envs, torch_envs = twin_envs(2000)
    states = rng.uniform([-2.4, -3.0, -0.21, -3.0], [2.4, 3.0, 0.21, 3.0], size=(2000, 4))
    gym_envs.state = states.T.copy()
    torch_envs.state = torch.tensor(states)
    obs, reward, terminated, truncated, _ = gym_envs.step(np.full(2000, action))
    t_obs, t_reward, t_terminated, t_truncated, _ = torch_envs.step(torch.full((2000,), action))
    assert np.abs(torch_envs.state.numpy() - gym_envs.state.T).max() < 1e-12
    assert 0 < terminated.sum() < 2000  # both outcomes exercised
    assert (t_terminated.numpy() == terminated).all() and (t_truncated.numpy() == truncated).all()
    assert (t_reward.numpy() == reward).all() and t_obs.dtype == torch.float32
    assert np.allclose(t_obs.numpy(), obs)


def test_torch_cartpole_has_gymnasiums_spaces_and_a_state_before_any_reset():
    envs, gym_envs = ppo.TorchCartPole(8, dtype=torch.float64), CartPoleVectorEnv(num_envs=8)
    assert envs.single_observation_space == gym_envs.single_observation_space
    assert envs.single_action_space == gym_envs.single_action_space
    assert envs.state.shape == (8, 4) and envs.state.dtype == torch.float64
    assert (envs.state.abs() <= 0.05).all()
    envs.reset(seed=0)
    assert envs.state.dtype == torch.float64  # the initial states too, not only the steps


@pytest.mark.parametrize("index, threshold", [(0, 2.4), (2, 12 * 2 * math.pi / 360)])
def test_torch_cartpole_thresholds_are_strict_and_exact_in_float64(index, threshold):
    """At rest (velocities 0) one Euler step leaves x and theta as they are: exactly at the
    threshold the episode goes on, one float64 step beyond it ends, as in gymnasium."""
    gym_envs, torch_envs = twin_envs(2)
    states = np.zeros((2, 4))
    states[:, index] = [threshold, np.nextafter(threshold, 3.0)]
    gym_envs.state = states.T.copy()
    torch_envs.state = torch.tensor(states)
    _, _, terminated, _, _ = gym_envs.step(np.zeros(2, dtype=np.int64))
    _, _, t_terminated, _, _ = torch_envs.step(torch.zeros(2, dtype=torch.long))
    assert terminated.tolist() == t_terminated.tolist() == [False, True]


def test_torch_cartpole_short_random_episodes_match_to_the_end():
    rng = np.random.default_rng(0)
    gym_envs, torch_envs = twin_envs(64, seed=5)
    ended = np.zeros(64, dtype=bool)
    for _ in range(200):
        actions = rng.integers(0, 2, 64)
        _, reward, terminated, truncated, _ = gym_envs.step(actions)
        _, t_reward, t_terminated, t_truncated, _ = torch_envs.step(torch.as_tensor(actions))
        live = ~ended  # after its end each env resets from its own random stream: not compared
        assert np.abs(torch_envs.state.numpy()[live] - gym_envs.state.T[live]).max(initial=0) < 1e-9
        assert (t_terminated.numpy()[live] == terminated[live]).all()
        assert (t_reward.numpy()[live] == reward[live]).all() and not truncated[live].any()
        ended |= terminated
        if ended.all():
            break
    assert ended.all()  # every episode played to its terminating step


def test_torch_cartpole_truncates_at_500_with_both_flags_when_the_pole_also_falls():
    gym_envs, torch_envs = twin_envs(2)
    balanced, falling = np.zeros(4), np.array([0.0, 0.0, 0.2094, 2.0])  # falling: over 12 degrees next step
    for step in range(1, 501):
        states = np.stack([balanced, falling if step == 500 else balanced])
        gym_envs.state, torch_envs.state = states.T.copy(), torch.tensor(states)
        _, _, terminated, truncated, _ = gym_envs.step(np.array([0, 1]))
        _, _, t_terminated, t_truncated, _ = torch_envs.step(torch.tensor([0, 1]))
        assert (t_terminated.numpy() == terminated).all() and (t_truncated.numpy() == truncated).all()
        assert truncated.any() == (step == 500)
    assert truncated.tolist() == [True, True] and terminated.tolist() == [False, True]


def test_torch_cartpole_autoresets_on_the_next_step():
    envs = ppo.TorchCartPole(3, max_episode_steps=4)
    envs.reset(seed=0)
    out = [envs.step(torch.tensor([0, 1, 0])) for _ in range(5)]
    assert [o[1].tolist() for o in out] == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert out[3][3].all() and not out[4][2].any() and not out[4][3].any()
    assert (out[4][0].abs() < 0.05).all() and envs.steps.tolist() == [0, 0, 0]  # fresh states, count restarted


def test_torch_cartpole_reset_cancels_an_autoreset_that_was_due():
    """After an episode ended, reset() starts fresh episodes: the next step is a real one (reward 1),
    not the autoreset step (reward 0). Planted: reset leaving the pending-autoreset flags set."""
    envs = ppo.TorchCartPole(2, max_episode_steps=1)
    envs.reset(seed=0)
    assert envs.step(torch.tensor([0, 1]))[3].all()  # both truncated: an autoreset is due
    envs.reset(seed=1)
    assert envs.step(torch.tensor([0, 1]))[1].tolist() == [1.0, 1.0]


def test_torch_cartpole_seeding_is_reproducible():
    first = [ppo.TorchCartPole(8).reset(seed=s)[0] for s in (3, 3, 4)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert (first[0].abs() < 0.05).all()


# ==== The command line ============================================================================

def parsed(argv):
    """parse_args's Config and RunConfig, their fields in one namespace."""
    config, run = ppo.parse_args(argv)
    return types.SimpleNamespace(**dataclasses.asdict(config), **dataclasses.asdict(run))


def test_posts_settings_are_the_posts_hyper_parameters():
    c = parsed(ppo.POST_SETTINGS.split())
    assert (c.vectorization_mode, c.num_envs, c.buffer_size, c.minibatch_size, c.update_epochs, c.lr) == \
        ("sync", 8, 2048, 64, 4, 1e-4)
    assert (c.gamma, c.gae_lambda, c.entropy_coef, c.entropy_floor, c.value_coef, c.clip_eps) == \
        (0.99, 0.95, 0.02, 0.001, 0.5, 0.2)
    assert c.value_clip_eps == 0.2 and not c.anneal_lr and c.max_grad_norm == 0
    assert c.normalize_advantages  # the post normalises; our default does not


def test_torch_backend_takes_its_preset_for_flags_not_given():
    c = parsed(["--env-backend", "torch", "--num-envs", "64"])
    assert c.env_backend == "torch" and c.num_envs == 64
    for key in ("buffer_size", "minibatch_size"):
        assert getattr(c, key) == ppo.BACKEND_SIZES["torch"][key]
    assert parsed(["--env-backend", "torch", "--num-envs", "32"]).num_envs == 32  # given = kept, even
    # when it equals the gymnasium size
    assert parsed([]).env_backend == "gymnasium"  # CPU: gymnasium's native vector env is faster


def test_auto_backend_is_torch_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parsed([]).env_backend == "torch"
    assert parsed(["--device", "cpu"]).env_backend == "gymnasium"
    assert parsed(["--env-id", "Acrobot-v1"]).env_backend == "gymnasium"
    post = parsed(ppo.POST_SETTINGS.split())  # make train-post on a GPU machine
    assert post.env_backend == "gymnasium" and post.num_envs == 8 and post.buffer_size == 2048


BAD_INPUT = [  # each a user's mistake: one flag out of its range, or an env PPO here cannot train
    (["--lr", "0"], "--lr"), (["--lr", "-1e-3"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "1e39"], "--lr"),
    (["--lr", "fast"], "--lr"), (["--episodes", "0"], "--episodes"), (["--iterations", "-3"], "--episodes"),
    (["--episodes", str(10**20)], "--episodes"), (["--num-envs", "0"], "--num-envs"),
    (["--num-envs", str(10**8), "--buffer-size", str(10**8)], "--num-envs"),
    (["--update-epochs", "0"], "--update-epochs"), (["--update-epochs", "101"], "--update-epochs"),
    (["--minibatch-size", "0"], "--minibatch-size"), (["--minibatch-size", "4096"], "--minibatch-size"),
    (["--minibatch-size", "2048"], "--minibatch-size"),  # more than a rollout's 1024 samples
    (["--buffer-size", "524288", "--minibatch-size", "524288"], "--minibatch-size"),
    (["--buffer-size", "2050"], "--buffer-size"), (["--buffer-size", "0"], "--buffer-size"),
    (["--buffer-size", str(2**40), "--minibatch-size", "64"], "--buffer-size"),
    (["--num-envs", "4", "--buffer-size", "4", "--minibatch-size", "4"], "--buffer-size"),  # T = 1
    (["--clip-eps", "0"], "--clip-eps"), (["--clip-eps", "1"], "--clip-eps"),
    (["--gamma", "1.01"], "--gamma"), (["--gamma", "-0.1"], "--gamma"), (["--gae-lambda", "2"], "--gae-lambda"),
    (["--entropy-coef", "-0.1"], "--entropy-coef"), (["--entropy-coef", "-inf"], "--entropy-coef"),
    (["--entropy-floor", "-1"], "--entropy-floor"), (["--value-coef", "-0.5"], "--value-coef"),
    (["--value-coef", "inf"], "--value-coef"), (["--value-clip-eps", "0"], "--value-clip-eps"),
    (["--target-kl", "0"], "--target-kl"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--max-grad-norm", "nan"], "--max-grad-norm"), (["--target-return", "nan"], "--target-return"),
    (["--ema-alpha", "0"], "--ema-alpha"), (["--eval-episodes", "0"], "--eval-episodes"),
    (["--eval-episodes", str(10**9)], "--eval-episodes"), (["--confirm-episodes", "10001"], "--confirm-episodes"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**40)], "--seed"),
    (["--threads", "0"], "--threads"), (["--threads", "100000"], "--threads"),
    (["--device", "tpu"], "--device"), (["--device", "cuda"], "--device"),  # the fixture hides any CUDA
    (["--env-id", "NoSuchEnv-v0"], "--env-id"),
    (["--env-id", "Pendulum-v1", "--target-return", "0"], "--env-id"),  # continuous actions
    (["--env-id", "Blackjack-v1", "--target-return", "0"], "--env-id"),  # tuple observation
    (["--env-id", "FrozenLake-v1"], "--env-id"),  # discrete observation
    (["--env-id", "Acrobot-v1", "--vectorization-mode", "vector_entry_point"], "--vectorization-mode"),
    (["--env-backend", "torch", "--env-id", "Acrobot-v1"], "--env-backend"),
    (["--env-backend", "torch", "--vectorization-mode", "sync"], "--vectorization-mode"),
]


def refusal(argv, capsys) -> str:
    """main's answer to a bad argv: exit status 2 before any training, one `error:` line and no
    traceback on stderr. Returns that line."""
    try:
        status = ppo.main(argv)
    except SystemExit as exc:  # argparse's own errors (a value of the wrong type, an unknown choice)
        status = exc.code
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(error_lines) == 1 and "Traceback" not in err, err
    return error_lines[0]


@pytest.mark.parametrize("argv, flag", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_error_line_naming_the_flag_and_leaves_nothing(argv, flag, capsys, tmp_path):
    assert flag in refusal(argv + ["--out-dir", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()


class Corridor(gym.Env):
    """One's own env: walk right along 4 cells to the exit (reward 1); observation (position, 1)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        self.position = max(0, self.position + (1 if action == 1 else -1))
        done = self.position == 3
        return np.array([self.position / 3, 1.0], np.float32), float(done), done, False, {}


def test_ones_own_env_trains_by_module_and_id_as_gym_make_takes_it(tmp_path, monkeypatch):
    # my_envs registers Corridor-v0 when imported: gym.make("my_envs:Corridor-v0") imports it, gym.spec does not
    (tmp_path / "my_envs.py").write_text(f"import gymnasium as gym\ngym.register('Corridor-v0', entry_point="
                                         f"'{__name__}:Corridor', max_episode_steps=20, reward_threshold=0.9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_envs", raising=False)  # imported afresh, as in a new process
    monkeypatch.delitem(gym.registry, "Corridor-v0", raising=False)
    config, run = ppo.parse_args(QUICK + ["--env-id", "my_envs:Corridor-v0", "--episodes", "3", "--no-gif",
                                          "--no-plot", "--out-dir", str(tmp_path / "run")])
    assert run.target_return == 0.9  # the env's own reward_threshold, read through its spec
    summary = ppo.train(config, run)
    assert summary["iterations"] == 3 and summary["episodes"] > 0 and summary["config"]["env_id"] == "my_envs:Corridor-v0"
    net, _ = ppo.load_agent(tmp_path / "run" / "final.pt")
    assert (net.obs_dim, net.act_dim) == (2, 2)


def test_env_without_reward_threshold_needs_target_return(capsys):
    gym.register("NoThresholdCartPole-v0", entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=50)
    assert "--target-return" in refusal(["--env-id", "NoThresholdCartPole-v0"], capsys)
    assert parsed(["--env-id", "NoThresholdCartPole-v0", "--target-return", "40"]).target_return == 40


def test_auto_device_is_the_cpu_without_cuda():  # the fixture hides any CUDA
    assert ppo.resolve_device("auto") == torch.device("cpu")


def test_out_dir_that_is_a_file_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    for out_dir in ("taken", "taken/run"):
        assert "--out-dir" in refusal(["--out-dir", str(tmp_path / out_dir)], capsys)


def test_out_dir_with_an_earlier_run_is_refused_so_nothing_is_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"the only copy of a good policy")
    assert "--out-dir" in refusal(["--out-dir", str(tmp_path / "run")], capsys)
    assert (tmp_path / "run" / "best.pt").read_bytes() == b"the only copy of a good policy"
    ppo.parse_args(["--out-dir", str(tmp_path / "run"), "--eval", str(tmp_path / "run" / "best.pt")])  # eval: fine


def test_a_run_folder_is_claimed_once_and_the_default_one_is_always_fresh(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert parsed(["--seed", "7"]).out_dir is None  # the default: made fresh by the run itself
    first = ppo.claim_run_folder(str(tmp_path / "given"), "CartPole-v1", 7)
    with pytest.raises(ppo.UsageError, match="--out-dir: must be a folder without an earlier run"):
        ppo.claim_run_folder(str(tmp_path / "given"), "CartPole-v1", 7)  # the same folder, a second time
    assert first == tmp_path / "given" and "--out-dir" in refusal(["--out-dir", str(first)], capsys)
    monkeypatch.setattr(ppo, "default_out_dir", lambda env_id, seed: "runs/CartPole-v1__seed7__same-second")
    fresh = [ppo.claim_run_folder(None, "CartPole-v1", 7) for _ in range(3)]
    assert [str(path) for path in fresh] == ["runs/CartPole-v1__seed7__same-second",
                                            "runs/CartPole-v1__seed7__same-second-2",
                                            "runs/CartPole-v1__seed7__same-second-3"]
    summary = ppo.train(*ppo.parse_args(QUICK + ["--episodes", "1", "--confirm-episodes", "0", "--no-plot", "--no-gif"]))
    assert summary["out_dir"] == summary["config"]["out_dir"] == "runs/CartPole-v1__seed7__same-second-4"


def test_of_two_runs_that_both_passed_the_checks_the_second_to_claim_the_folder_writes_nothing(tmp_path, monkeypatch):
    """The race the checks cannot see: both runs looked while the folder was still empty."""
    argv = QUICK + ["--episodes", "2", "--confirm-episodes", "0", "--no-plot", "--no-gif", "--out-dir", str(tmp_path)]
    first, second = ppo.parse_args(argv), ppo.parse_args(argv)
    ppo.train(*first)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr(ppo, "require_no_earlier_run", lambda path: None)  # its look came before the first's claim
    with pytest.raises(ppo.UsageError, match="is another run's"):
        ppo.train(*second)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files and "metrics.csv" in files


def test_train_from_python_never_overwrites_an_earlier_run(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"the only copy of a good policy")  # a run from before claim files
    with pytest.raises(ppo.UsageError, match="has best.pt"):
        ppo.train(ppo.Config(num_iterations=1), ppo.RunConfig(out_dir=str(tmp_path), plot=False, gif=False))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt"]
    assert (tmp_path / "best.pt").read_bytes() == b"the only copy of a good policy"


@pytest.mark.shell
def test_two_runs_started_at_once_into_one_folder_one_is_refused_and_the_other_keeps_its_files(tmp_path):
    argv = [sys.executable, str(Path(ppo.__file__)), *QUICK, "--episodes", "6", "--confirm-episodes", "0",
            "--no-plot", "--no-gif", "--out-dir", str(tmp_path / "run")]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((proc.wait(timeout=120), proc.stderr.read()) for proc in procs)
    assert [status for status, _ in results] == [0, 2]
    refused = [line for line in results[1][1].splitlines() if "error:" in line]
    assert len(refused) == 1 and "--out-dir" in refused[0] and "Traceback" not in results[1][1]
    assert [int(row["iteration"]) for row in read_csv(tmp_path / "run" / "metrics.csv")] == list(range(6))


def test_an_out_dir_that_cannot_be_created_is_refused_and_nothing_is_left(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    too_long = tmp_path / "made" / "sub" / ("x" * 300)  # its parents can be made, the name cannot
    for out_dir in (tmp_path / "file" / "a" / "b", Path("/proc/ppo-cartpole-test/run"), too_long):
        assert "--out-dir" in refusal(["--out-dir", str(out_dir)], capsys)
        assert not out_dir.exists()
    assert not (tmp_path / "made").exists()  # the folders made on the way are removed again


def check_consistent(config):
    """What every parsed Config must satisfy, whatever the argv: a cheap independent check."""
    for field in dataclasses.fields(ppo.Config):
        value = getattr(config, field.name)
        if isinstance(value, float):
            assert math.isfinite(value), field.name
    assert config.num_envs > 0 and config.buffer_size % config.num_envs == 0
    assert 0 < config.minibatch_size <= config.buffer_size
    assert 0 < config.num_iterations <= 10**9
    assert 0 < config.lr and 0 <= config.gamma <= 1 and 0 <= config.gae_lambda <= 1 and 0 < config.clip_eps < 1
    assert 0 <= config.seed < 2**31 and 0 < config.threads and config.env_backend in ("gymnasium", "torch")
    assert config.eval is not None or (config.target_return is not None and Path(config.out_dir or "runs").is_dir())


def test_fuzzed_argument_lists_parse_or_are_refused_naming_a_flag(capsys):
    rng = np.random.default_rng(12345)  # seeded: a failure names its argv and reproduces
    flags = sorted(help_flags() - {"--help"})
    switches = {flag for flag in flags if flag.startswith("--no-") or "--no-" + flag[2:] in flags}
    values = ["0", "1", "-1", "2", "64", "1024", "0.5", "1e-3", "1e30", "1e400", "-1e-9", "nan", "inf", "-inf",
              "", "text", "3.7", str(2**31), str(2**64), "auto", "cpu", "torch", "sync", "CartPole-v1", "run"]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(300):
        argv = []
        for flag in rng.choice(flags, size=rng.integers(0, 5)):
            argv += [flag] if flag in switches else [flag, rng.choice(values)]
        try:
            check_consistent(parsed([str(x) for x in argv]))
            outcomes["parsed"] += 1
        except ppo.UsageError as exc:
            assert str(exc).startswith("argument --") and "\n" not in str(exc), (argv, exc)
            outcomes["refused"] += 1
        except SystemExit as exc:  # argparse's own: its error line on stderr
            err = capsys.readouterr().err
            assert exc.code == 2 and len([line for line in err.splitlines() if "error:" in line]) == 1, (argv, err)
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 20  # both outcomes exercised


# ==== Files: atomic writes and checkpoints ========================================================

def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "best.pt"
    ppo.atomic_write(path, lambda f: f.write(b"old and whole"))

    def write_half_then_fail(f):
        f.write(b"half of a new ")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        ppo.atomic_write(path, write_half_then_fail)
    assert path.read_bytes() == b"old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


def test_a_failed_write_stays_the_error_when_the_temp_files_removal_is_refused_too(tmp_path, monkeypatch):
    """On a file system gone read-only the clean-up's unlink raises EROFS: the write's own error,
    naming its file, is what the run ends with, not the clean-up's."""
    def refused(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    def full_disk(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(ppo.WriteError, match=f"could not write {re.escape(str(tmp_path / 'best.pt'))}: No space"):
        ppo.atomic_write(tmp_path / "best.pt", full_disk)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    net = small_net(5)
    config = {"env_id": "CartPole-v1", "lr": 3e-4, "target_kl": None, "clip_value": True, "seed": 1}
    ppo.save_checkpoint(tmp_path / "a.pt", net, config)
    loaded, loaded_config = ppo.load_agent(tmp_path / "a.pt")
    obs = torch.randn(7, 4)
    assert torch.equal(loaded(obs)[0], net(obs)[0]) and loaded_config == config
    torch.load(tmp_path / "a.pt", weights_only=True)  # raises if anything but plain types got in


def test_load_agent_rejects_missing_corrupt_and_mismatched_files(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    wrong = small_net(obs_dim=6, act_dim=3)
    ppo.save_checkpoint(tmp_path / "wrong.pt", wrong, {"env_id": "CartPole-v1"})
    checkpoint = torch.load(tmp_path / "wrong.pt", weights_only=True)
    checkpoint["model"] = {"obs_dim": 4, "act_dim": 2, "hidden": 64}
    torch.save(checkpoint, tmp_path / "mismatched.pt")
    for name, words in (("missing.pt", "no such file"), ("corrupt.pt", "not a readable"),
                        ("tensor.pt", "keys missing"), ("mismatched.pt", "do not fit")):
        with pytest.raises(ppo.UsageError, match=words):
            ppo.load_agent(tmp_path / name)


@pytest.mark.parametrize("name", ["missing.pt", "corrupt.pt", "other_env.pt"])
def test_eval_of_a_bad_checkpoint_is_a_clean_error(tmp_path, capsys, name):
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    ppo.save_checkpoint(tmp_path / "other_env.pt", small_net(obs_dim=6, act_dim=3), {"env_id": "CartPole-v1"})
    assert "error: argument --eval:" in refusal(["--eval", str(tmp_path / name)], capsys)


# ==== Tracking: returns, best.pt, the run log =====================================================

def controller(gains):
    """An ActorCritic whose greedy action is 1 (push right) iff gains . obs > 0: a hand-made policy."""
    net = small_net()
    with torch.no_grad():
        for layer in (net.trunk[0], net.trunk[2], net.policy_head):
            layer.weight.zero_()
            layer.bias.zero_()
        net.trunk[0].weight[0], net.trunk[0].weight[1] = torch.tensor(gains), -torch.tensor(gains)  # +/- parts
        net.trunk[2].weight[0, 0] = net.trunk[2].weight[1, 1] = 1.0
        net.policy_head.weight[1, :2] = torch.tensor([1.0, -1.0])  # logit_1 - logit_0 = 2 gains . obs
        net.policy_head.weight[0, :2] = torch.tensor([-1.0, 1.0])
    return net


def test_best_policy_saves_a_candidate_only_if_it_plays_at_least_as_well(tmp_path):
    # Greedy returns of these hand-made policies over the 20 episodes of seed 3: 46.55, 210.75, 500.
    weak, fair, good = controller([0, 0, 1, 0]), controller([0, 0, 0, 1]), controller([0.1, 0.5, 1, 1])
    best = ppo.BestPolicy(tmp_path / "best.pt", "CartPole-v1", 20, seed=3, config={"env_id": "CartPole-v1"})

    def saved_is(net):
        loaded, _ = ppo.load_agent(tmp_path / "best.pt")
        return torch.equal(loaded(torch.ones(1, 4))[0], net(torch.ones(1, 4))[0])

    assert best.consider(weak, ema=20) and best.confirmed == pytest.approx(46.55) and saved_is(weak)
    assert not best.consider(fair, ema=30)  # a new EMA best, but below the saved policy's 46.55: no check
    assert best.consider(fair, ema=60) and best.confirmed == pytest.approx(210.75) and saved_is(fair)
    assert not best.consider(weak, ema=300) and saved_is(fair)  # checked: plays 46.55 < 210.75
    assert not best.consider(good, ema=250)  # not a new EMA best
    assert best.consider(good, ema=250, always=True) and best.confirmed == 500 and saved_is(good)
    seconds = best.seconds
    assert not best.consider(weak, ema=500) and best.seconds == seconds  # played the maximum: no more checks
    assert not best.consider(weak, ema=600) and saved_is(good)
    as_good = controller([0.1, 0.5, 1, 1])
    with torch.no_grad():
        as_good.value_head.bias.fill_(7.0)  # the same greedy policy, told apart by its critic
    assert best.consider(as_good, ema=0, always=True)  # a tie is "at least as well": saved
    loaded, config = ppo.load_agent(tmp_path / "best.pt")
    assert loaded.value_head.bias.item() == 7.0 and config == {"env_id": "CartPole-v1"}


def test_best_policy_counts_the_time_of_every_greedy_check(tmp_path, monkeypatch):
    real_evaluate, durations = ppo.evaluate, []

    def timed_evaluate(*args):
        t0 = time.perf_counter()
        returns = real_evaluate(*args)
        durations.append(time.perf_counter() - t0)
        return returns

    monkeypatch.setattr(ppo, "evaluate", timed_evaluate)
    best = ppo.BestPolicy(tmp_path / "best.pt", "CartPole-v1", 20, seed=3, config={})
    for ema, gains in [(20, [0, 0, 1, 0]), (60, [0, 0, 0, 1]), (300, [0, 0, 1, 0])]:  # all three checked
        best.consider(controller(gains), ema=ema)
    assert len(durations) == 3 and sum(durations) <= best.seconds <= sum(durations) + 0.05


def test_best_policy_without_confirmation_is_the_posts_ema_rule(tmp_path):
    weak, good = controller([0, 0, 1, 0]), controller([0.1, 0.5, 1, 1])
    best = ppo.BestPolicy(tmp_path / "best.pt", "CartPole-v1", 0, seed=3, config={})
    assert best.consider(good, ema=100)
    assert not best.consider(weak, ema=50)  # the EMA fell: no save, whatever the weights
    assert best.consider(weak, ema=101)  # a new EMA best is saved unchecked, weak or not
    assert not best.consider(good, ema=101)  # the post's `smoothed_reward > best_reward`: a tie is no new best
    assert not best.consider(good, ema=101, always=True)  # at the end of a run too: a tie is no new best
    assert not best.consider(good, ema=90, always=True)  # the end-of-run check keeps the EMA's best
    assert best.seconds == 0 and best.best_ema == 101  # the highest EMA seen, not the last
    fresh = ppo.BestPolicy(tmp_path / "fresh.pt", "CartPole-v1", 0, seed=3, config={})
    assert fresh.consider(good, ema=None, always=True)  # ... unless nothing was saved at all


def test_without_confirmation_best_pt_is_the_ema_best_not_the_final_weights(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "12", "--lr", "3e-3", "--confirm-episodes", "0", "--no-plot", "--no-gif",
                             "--out-dir", str(out)]) == 0
    ema = [float(row["ema_return"]) for row in read_csv(out / "metrics.csv")]
    assert np.argmax(ema) < len(ema) - 1  # the EMA peaked before the end in this run (seed 1, lr 3e-3)...
    best, final = (torch.load(out / name, weights_only=True)["state_dict"] for name in ("best.pt", "final.pt"))
    assert any(not torch.equal(best[k], final[k]) for k in best)  # ...so best.pt is not final.pt


def scripted_checks(monkeypatch, out):
    """best.pt's greedy checks replaced by a script: 5.0 until the run is solved (its 100th episode, at
    --target-return 10) and for the first 2 checks after, then 10.0, the target. Returns the list of
    the iterations each check came in (the rows metrics.csv held then)."""
    real_evaluate, checks = ppo.evaluate, []

    def evaluate(net, env_id, episodes, seed):
        if seed != 1 + ppo.CONFIRM_SEED_OFFSET:  # the final evaluation
            return real_evaluate(net, env_id, episodes, seed)
        solved = len(read_csv(out / "episodes.csv")) >= 100
        after = sum(solved_then for _, solved_then in checks)
        checks.append((len(read_csv(out / "metrics.csv")), solved))
        return np.full(episodes, 10.0 if solved and after >= 2 else 5.0)

    monkeypatch.setattr(ppo, "evaluate", evaluate)
    return checks


def new_ema_bests(metrics, above):
    """The iterations whose EMA is a new best, higher than every earlier one, and higher than `above`."""
    emas = [float(row["ema_return"]) for row in metrics]
    return [i for i, ema in enumerate(emas) if ema > max(emas[:i], default=-math.inf) and ema > above]


@pytest.mark.parametrize("stop", [True, False])
def test_once_solved_every_iteration_is_checked_until_best_pt_plays_the_target(tmp_path, monkeypatch, stop):
    """Before the solve, and after best.pt plays the target, only a new best of the EMA above the
    saved score is checked; between the two, every iteration is. With --stop-when-solved the run
    ends at the check that plays the target (a score equal to it plays it)."""
    out = tmp_path / "run"
    checks = scripted_checks(monkeypatch, out)
    argv = QUICK + ["--episodes", "30", "--lr", "1e-30", "--target-return", "10", "--no-plot", "--no-gif",
                    "--out-dir", str(out)]  # lr ~0: the random policy's EMA rises and falls
    assert ppo.main(argv + ["--stop-when-solved"] * stop) == 0
    metrics, summary = read_csv(out / "metrics.csv"), json.loads((out / "summary.json").read_text())
    solved = summary["solved_at_iteration"]
    iterations = [iteration for iteration, _ in checks if iteration < len(metrics)]  # not the end-of-run check
    before, after = [i for i in iterations if i < solved], [i for i in iterations if i > solved + 2]
    assert before == [0] + new_ema_bests(metrics[:solved], above=5.0)[1:] and len(before) < solved
    assert [i for i in iterations if solved <= i <= solved + 2] == [solved, solved + 1, solved + 2]
    assert summary["best_confirmed_return"] == 10.0
    if stop:
        assert len(metrics) == solved + 3 and summary["iterations"] == solved + 3
    else:
        assert len(metrics) == 30 and after == [i for i in new_ema_bests(metrics, above=10.0) if i > solved + 2]
        assert len(after) < 30 - (solved + 3)  # some iterations after it went unchecked
    saved = [int(row["best_saved"]) for row in metrics]
    assert [i for i, flag in enumerate(saved) if flag] == iterations  # every check saved: 5 >= 5, 10 >= 10
    confirmed = [float(row["best_confirmed_return"]) for row in metrics]
    assert confirmed == [5.0] * (solved + 2) + [10.0] * (len(metrics) - solved - 2)


def test_each_metrics_row_counts_its_iterations_episodes(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "5", "--confirm-episodes", "0", "--no-plot", "--no-gif",
                             "--out-dir", str(out)]) == 0
    metrics, episodes = read_csv(out / "metrics.csv"), read_csv(out / "episodes.csv")
    assert [int(row["iteration"]) for row in metrics] == list(range(5))
    ends = [0] + [int(row["env_steps"]) for row in metrics]
    counts = [sum(start < int(row["env_step"]) <= end for row in episodes) for start, end in zip(ends, ends[1:])]
    assert [int(row["episodes"]) for row in metrics] == counts and sum(counts) == len(episodes) > 0


def test_return_tracker_matches_a_plain_computation():
    rng = np.random.default_rng(0)
    returns = np.concatenate([rng.uniform(0, 300, 120), np.full(150, 500.0)])
    tracker = ppo.ReturnTracker(ema_alpha=0.1, target_return=475, window=100)
    ema, solved_at = None, None
    for i, r in enumerate(returns):
        tracker.add(r, env_step=10 * i)
        ema = r if ema is None else 0.1 * r + 0.9 * ema
        window = returns[max(0, i - 99): i + 1]
        if solved_at is None and len(window) == 100 and window.mean() >= 475:
            solved_at = 10 * i
        assert tracker.ema == pytest.approx(ema)
        assert tracker.mean_recent == pytest.approx(window.mean())
        assert tracker.success_rate == pytest.approx((window >= 475).mean())
    assert tracker.solved_at_step == solved_at is not None


def test_few_episodes_in_one_iteration_keep_the_last_window_rule():
    tracker = ppo.ReturnTracker(0.5, target_return=475, window=3)
    tracker.add_iteration(np.array([475.0, 475.0]), np.array([1, 2]))  # 2 < window: judged one by one
    after_each = tracker.add_iteration(np.array([475.0, 100.0]), np.array([3, 4]))
    assert tracker.solved_at_step == 3  # the third episode completes a window at 475
    assert [round(mean, 2) for _, mean, _ in after_each] == [475, round(1050 / 3, 2)]
    assert after_each[-1][0] == 0.5 * 100 + 0.5 * 475 and after_each[-1][2] == pytest.approx(2 / 3)


def test_solved_needs_a_full_window_of_100_by_default():
    tracker = ppo.ReturnTracker(0.1, target_return=475)  # CartPole-v1's rule: 475 over 100 episodes
    for i in range(99):
        tracker.add(500.0, env_step=i)
    assert tracker.solved_at_step is None
    tracker.add(500.0, env_step=99)
    assert tracker.solved_at_step == 99


def test_exactly_a_window_of_episodes_in_one_iteration_is_judged_by_their_mean():
    tracker = ppo.ReturnTracker(0.1, target_return=475, window=100)
    tracker.add_iteration(np.full(99, 500.0), np.arange(99))  # 99 at 500: one short of a window
    # The next iteration's first episode would complete a last-100 window at 500; its mean is 14.9.
    tracker.add_iteration(np.array([500.0] + [10.0] * 99), np.arange(100) + 100)
    assert tracker.solved_at_step is None
    tracker.add_iteration(np.full(100, 475.0), np.arange(100) + 200)  # a mean exactly at the target
    assert tracker.solved_at_step == 299


def test_many_episodes_in_one_iteration_are_judged_by_their_mean():
    tracker = ppo.ReturnTracker(0.1, target_return=475, window=100)
    # 150 episodes end together: the 90 survivors at 500, sorted last, make "the last 100" read
    # (10 * 400 + 90 * 500) / 100 = 490, solved by the last-100 rule; the mean of all 150,
    # (60 * 400 + 90 * 500) / 150 = 460, is not.
    returns = np.array([400.0] * 60 + [500.0] * 90)
    tracker.add_iteration(returns, np.full(150, 10))
    assert tracker.mean_recent == 490 and tracker.solved_at_step is None
    tracker.add_iteration(np.full(150, 480.0), np.arange(150) + 20)
    assert tracker.solved_at_step == 169


# ==== Greedy play: evaluation and the GIF =========================================================

def test_gif_is_a_small_valid_animation_of_a_greedy_episode(tmp_path):
    net = small_net()
    total = ppo.render_gif(net, "CartPole-v1", tmp_path / "agent.gif", seed=3)
    with Image.open(tmp_path / "agent.gif") as image:
        assert image.format == "GIF" and image.is_animated and image.size == (300, 200)
        # every 2nd frame plus the last; Pillow may merge identical neighbours
        assert 2 <= image.n_frames <= math.ceil(total / 2) + 1
    assert (tmp_path / "agent.gif").stat().st_size < 3_000_000
    assert 1 <= total <= 500


def test_evaluate_counts_the_first_episode_of_each_env_once():
    net = small_net()
    with torch.no_grad():
        net.policy_head.bias.copy_(torch.tensor([5.0, -5.0]))  # always push left: short episodes
    returns = ppo.evaluate(net, "CartPole-v1", 6, seed=11)
    # Independent count: the same envs stepped with action 0 until each first ends.
    envs = gym.make_vec("CartPole-v1", num_envs=6)
    envs.reset(seed=11)
    lengths, alive = np.zeros(6), np.ones(6, dtype=bool)
    while alive.any():
        _, _, terminated, truncated, _ = envs.step(np.zeros(6, dtype=np.int64))
        lengths += alive
        alive &= ~(terminated | truncated)
    assert returns.tolist() == lengths.tolist()
    assert (returns < 20).all()


# ==== Plot ========================================================================================

def dashboard_rows(num_episodes: int = 49, num_iterations: int = 5):
    """Rows as RunLog writes them: one per episode and one per iteration."""
    episodes = [dict(env_step=10 * i, **{"return": i}, ema_return=i, mean100_return=i, success_rate=0.0)
                for i in range(1, num_episodes + 1)]
    keys = ["policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "lr", "entropy_coef"]
    metrics = [dict(env_steps=100 * (i + 1), explained_variance=1 - i, best_saved=int(i in (1, 3)),
                    best_confirmed_return=-math.inf if i < 1 else 10.0 * i,
                    **{k: (i + 1) * 0.1 for k in keys}) for i in range(num_iterations)]
    return episodes, metrics


def test_dashboard_has_a_panel_for_each_diagnostic_and_schedule(tmp_path):
    episodes, metrics = dashboard_rows()
    fig = ppo.plot_training(episodes, metrics, 475, tmp_path / "training.png", solved_at_step=250, kl_target=0.01)
    with Image.open(tmp_path / "training.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    for wanted in ("policy loss", "value loss", "entropy of the policy", "approx KL", "clip fraction",
                   "explained variance", "learning rate", "entropy coefficient"):
        assert sum(wanted in title for title in titles) == 1, wanted  # each on an axis of its own
    returns = fig.axes[0]
    labels = [line.get_label() for line in returns.get_lines()]
    assert {"EMA", "mean of last 100", "target 475", "solved", "best.pt saved (2x)"} <= set(labels)
    saves = next(line for line in returns.get_lines() if line.get_label().startswith("best.pt"))
    assert list(saves.get_xdata()) == [200, 400]  # the iterations whose best_saved is 1
    assert any("success rate" in ax.get_ylabel() for ax in fig.axes)  # the twin axis of the returns
    kl_axis = next(ax for ax in fig.axes if "approx KL" in ax.get_title(loc="left"))
    assert any(line.get_label() == "target 0.01" for line in kl_axis.get_lines())


def test_the_learning_phase_gets_its_own_returns_panel_only_when_the_run_went_on_after_it():
    episodes, metrics = dashboard_rows()  # 5 iterations, up to env step 500
    for solved_at_step, panels in [(100, 2), (200, 1), (None, 1)]:  # 3 x 200 is past the run's end
        fig = ppo.plot_training(episodes, metrics, 475, None, solved_at_step=solved_at_step)
        returns_axes = [ax for ax in fig.axes if ax.get_ylabel() == "return"]
        ends = [300, 500] if panels == 2 else [500]  # 3 x the solve, then the whole run
        assert [ax.get_xlim()[1] for ax in returns_axes] == pytest.approx([1.02 * end for end in ends])
        lr_axis = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("learning rate"))
        assert lr_axis.get_ylim() == pytest.approx((0, 1.05 * 0.5))  # from 0 to the largest lr, 0.5


def test_the_diagnostics_show_the_learning_phase_on_log_steps_when_the_run_went_on_after_it():
    episodes, metrics = dashboard_rows(num_iterations=400)  # up to env step 40,000
    for solved_at_step, scale in [(1000, "log"), (20_000, "linear"), (None, "linear")]:
        fig = ppo.plot_training(episodes, metrics, 475, None, solved_at_step=solved_at_step)
        diagnostics = [ax for ax in fig.axes if ax.get_title(loc="left") and ax.get_ylabel() != "return"]
        assert len(diagnostics) == 8 and {ax.get_xscale() for ax in diagnostics} == {scale}
        if scale == "log":  # the learning phase, shaded, up to 3 x the solve; the whole run after it
            span = diagnostics[0].patches[0]  # a Rectangle (a Polygon in matplotlib < 3.9)
            xs = [span.get_x(), span.get_x() + span.get_width()] if hasattr(span, "get_width") else \
                [x for x, _ in span.get_xy()]
            assert (min(xs), max(xs)) == (100, 3000)
            assert diagnostics[0].get_xlim() == pytest.approx((100, 1.05 * 40_000))


def test_rolling_mean_takes_a_window_per_index():
    x = np.arange(10.0)
    windows = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    expected = [x[max(0, i + 1 - w):i + 1].mean() for i, w in enumerate(windows)]
    assert ppo.rolling_mean(x, windows).tolist() == pytest.approx(expected)


def test_dashboard_clips_explained_variance_and_says_so():
    episodes, metrics = dashboard_rows()  # explained variance 1, 0, -1, -2, -3
    fig = ppo.plot_training(episodes, metrics, 475, None)
    ev_axis = next(ax for ax in fig.axes if "explained variance" in ax.get_title(loc="left"))
    assert min(ev_axis.get_lines()[0].get_ydata()) == ppo.EV_FLOOR
    assert ev_axis.get_ylim()[0] > -1.5
    assert any("2 iteration(s) below -1 (lowest -3)" in text.get_text() for text in ev_axis.texts)


def test_rolling_mean_matches_a_plain_loop_and_skips_nans():
    x = np.array([1.0, 2.0, np.nan, 4.0, 8.0, 16.0])
    window = 3
    expected = []
    for i in range(len(x)):
        recent = [v for v in x[max(0, i + 1 - window):i + 1] if not np.isnan(v)]
        expected.append(sum(recent) / len(recent))
    assert ppo.rolling_mean(x, window).tolist() == pytest.approx(expected)
    assert np.isnan(ppo.rolling_mean(np.array([np.nan, 1.0]), 1)[0])


def test_a_long_runs_diagnostics_get_a_trend_line():
    episodes, metrics = dashboard_rows(num_iterations=400)
    fig = ppo.plot_training(episodes, metrics, 475, None)
    clip_axis = next(ax for ax in fig.axes if "clip fraction" in ax.get_title(loc="left"))
    assert [line.get_label() for line in clip_axis.get_lines()][-1] == "mean of 4 iterations"
    fig = ppo.plot_training(episodes, metrics, 475, None, solved_at_step=1000)  # log steps
    clip_axis = next(ax for ax in fig.axes if "clip fraction" in ax.get_title(loc="left"))
    trend = next(line for line in clip_axis.get_lines() if line.get_label() == "mean of the last 10% of iterations")
    values = [(i + 1) * 0.1 for i in range(400)]
    assert trend.get_ydata()[199] == pytest.approx(np.mean(values[180:200]))  # at iteration 200: the last 20


def test_dashboard_thins_the_episode_dots_of_a_long_run():
    episodes, metrics = dashboard_rows(num_episodes=3 * ppo.PLOT_MAX_POINTS + 5)
    fig = ppo.plot_training(episodes, metrics, 475, None)
    dots = fig.axes[0].get_lines()[0]
    assert len(dots.get_xdata()) <= ppo.PLOT_MAX_POINTS and "every 4th" in dots.get_label()


def test_dashboard_reads_csv_rows_as_written():
    """metrics.csv gives back text, "0" included: it must not count as a best.pt save."""
    episodes, metrics = dashboard_rows()
    as_text = [{k: str(v) for k, v in row.items()} for row in metrics]
    fig = ppo.plot_training(episodes, as_text, 475, None)
    assert "best.pt saved (2x)" in [line.get_label() for line in fig.axes[0].get_lines()]


# ==== The run: why it did not learn ===============================================================

def metrics_rows(n=60, **columns):
    """n metrics.csv rows of a run learning as the defaults do (its figures over the later half:
    docs/failures.md), each column a number for every row or a list, one per row; `columns` override."""
    figures = dict(entropy=0.5, approx_kl=0.005, value_loss=2.0, policy_loss=-1.0, explained_variance=0.8,
                   entropy_coef=0.0) | columns
    return [dict(iteration=i, **{key: value[i] if isinstance(value, list) else value for key, value in figures.items()})
            for i in range(n)]


def test_a_rule_reads_the_later_half_of_the_run_at_most_its_last_50_iterations():
    assert ppo.later_half(list(range(10))) == list(range(5, 10))
    assert ppo.later_half(list(range(99))) == list(range(49, 99))
    assert ppo.later_half(list(range(300))) == list(range(250, 300))


def test_a_column_mean_reads_csv_text_and_leaves_out_nan():
    rows = [dict(explained_variance=x) for x in ("0.5", "nan", 1.0)]  # NaN: an explained variance of constant returns
    assert ppo.mean_of(rows, "explained_variance") == 0.75
    assert math.isnan(ppo.mean_of(rows[1:2], "explained_variance"))


def test_a_healthy_run_gets_no_diagnosis():
    assert ppo.diagnose(metrics_rows()) == []
    assert [rule(metrics_rows()) for rule in ppo.DIAGNOSES] == [None] * 5


def test_policy_collapsed_when_approx_kl_once_passed_1_and_the_entropy_is_below_0_1():
    def rows(peak=8.7, entropy=0.05):  # the update that collapsed it: iteration 3
        return metrics_rows(approx_kl=[0.01] * 3 + [peak] + [0.0] * 56, entropy=entropy)
    message = ppo.policy_collapsed(rows())
    assert message.startswith("approx KL reached 8.7 at iteration 3 (healthy runs: below 0.3) and the entropy "
                              "averaged 0.05 over the last 30 iterations") and message.endswith("try a lower --lr")
    assert ppo.policy_collapsed(rows(peak=2.0)) is not None
    assert ppo.policy_collapsed(rows(peak=0.5)) is None  # no update went that far
    assert ppo.policy_collapsed(rows(entropy=0.2)) is None  # it went far, but the policy still explores


def test_policy_collapsed_when_approx_kl_once_passed_1_and_the_critic_then_predicts_one_value_everywhere():
    def rows(peak=26.4, explained=0.0, late_row=None):  # --lr 1 --seed 1: iteration 0 killed every hidden unit
        explained = [0.01] + [explained] * 59 if late_row is None else [0.0] * 59 + [late_row]
        return metrics_rows(approx_kl=[peak] + [0.01] * 59, entropy=0.66, explained_variance=explained)
    message = ppo.policy_collapsed(rows())
    assert message.startswith("approx KL reached 26.4 at iteration 0 (healthy runs: below 0.3) and explained variance "
                              "stayed within 0.05 of 0 in each of the last 30 iterations")
    assert "hidden units are (nearly) all off" in message and message.endswith("try a lower --lr")
    assert ppo.policy_collapsed(rows(explained=0.007)) is not None  # Acrobot, --lr 1 --seed 3: not quite constant
    assert ppo.policy_collapsed(rows(explained=-0.049)) is not None
    assert ppo.policy_collapsed(rows(explained=0.06)) is None  # a critic that sees the state, if barely
    assert ppo.policy_collapsed(rows(explained=0.05)) is None  # "within 0.05": below it, not at it
    assert ppo.policy_collapsed(rows(explained=-0.05)) is None
    assert ppo.policy_collapsed(rows(late_row=0.3)) is None  # one iteration where it saw the state
    assert ppo.policy_collapsed(rows(peak=0.9)) is None  # no update went that far: a critic stuck at 0 is not this


def test_policy_frozen_when_approx_kl_falls_below_1e_6():
    message = ppo.policy_frozen(metrics_rows(approx_kl=5e-7))
    assert message.startswith("approx KL averaged 5e-07 over the last 30 iterations")
    assert message.endswith("try a higher --lr")
    assert ppo.policy_frozen(metrics_rows(approx_kl=2e-6)) is None


def test_entropy_bonus_dominates_when_the_entropy_stays_95_percent_of_its_start_with_a_bonus_and_little_kl():
    def rows(late_share=0.96, entropy_coef=20.0, approx_kl=5e-4):  # row 0 holds the start; the rest, share of it
        return metrics_rows(entropy=[0.7] + [0.7 * late_share] * 59, entropy_coef=entropy_coef, approx_kl=approx_kl)
    message = ppo.entropy_bonus_dominates(rows())
    assert message.startswith("entropy averaged 0.672 over the last 30 iterations, 96% of its start, and approx "
                              "KL 5e-04") and "bonus (20)" in message and message.endswith("--entropy-floor")
    assert ppo.entropy_bonus_dominates(rows(late_share=0.94)) is None
    assert ppo.entropy_bonus_dominates(rows(entropy_coef=0.0)) is None  # no bonus: not its doing
    assert ppo.entropy_bonus_dominates(rows(entropy_coef=0.5)) is not None  # any bonus that holds it there
    assert ppo.entropy_bonus_dominates(rows(approx_kl=2e-3)) is None  # the policy moves: it does commit


def test_horizon_too_short_when_the_value_loss_falls_below_0_05():
    message = ppo.horizon_too_short(metrics_rows(value_loss=0.03))
    assert message.startswith("value loss averaged 0.03 over the last 30 iterations")
    assert message.endswith("try a --gamma closer to 1 (its horizon: 1 / (1 - gamma) steps)")
    assert ppo.horizon_too_short(metrics_rows(value_loss=0.07)) is None


def test_critic_not_learning_when_explained_variance_averages_below_0_and_stays_within_0_5_of_it():
    message = ppo.critic_not_learning(metrics_rows(explained_variance=-0.05))
    assert message.startswith("explained variance averaged -0.05 and stayed within 0.5 of 0 in each of the last 30 "
                              "iterations") and message.endswith("check --value-coef (0 trains no critic)")
    assert ppo.critic_not_learning(metrics_rows(explained_variance=0.05)) is None
    # a mean below 0 from iterations near 0: -0.3 in the later half's first, +0.2 in its last
    assert ppo.critic_not_learning(metrics_rows(explained_variance=[-0.3] * 31 + [-0.01] * 28 + [0.2]))
    # a critic being trained, catching up with its targets (Acrobot's start): it overshoots, past 0.5 of 0
    catching_up = metrics_rows(explained_variance=[-0.2, -0.6] * 30)
    assert ppo.mean_of(ppo.later_half(catching_up), "explained_variance") < 0
    assert ppo.critic_not_learning(catching_up) is None
    assert ppo.critic_not_learning(metrics_rows(explained_variance=[-0.2] * 59 + [0.5])) is None  # at 0.5: not within
    assert ppo.critic_not_learning(metrics_rows(explained_variance=[-0.2] * 59 + [0.49])) is not None


def test_a_figure_exactly_at_a_threshold_is_judged_as_docs_failures_md_writes_it():
    """approx KL > 1, entropy < 0.1, approx KL < 1e-6, value loss < 0.05, explained variance < 0, and
    for the bonus approx KL < 1e-3 but entropy >= 95% of its start."""
    def one(**columns):  # the later half of a single row is that row
        return metrics_rows(1, **columns)
    assert ppo.policy_collapsed(one(approx_kl=1.0, entropy=0.05)) is None
    assert ppo.policy_collapsed(one(approx_kl=8.7, entropy=0.1)) is None
    assert ppo.policy_frozen(one(approx_kl=1e-6)) is None
    assert ppo.entropy_bonus_dominates(one(entropy_coef=20.0, approx_kl=1e-3)) is None
    assert ppo.entropy_bonus_dominates(metrics_rows(2, entropy=[1.0, 0.95], entropy_coef=20.0, approx_kl=1e-4))
    assert ppo.horizon_too_short(one(value_loss=0.05)) is None
    assert ppo.critic_not_learning(one(explained_variance=0.0)) is None


def test_diagnose_names_the_first_rule_that_holds_from_10_iterations_on():
    collapsed = metrics_rows(10, approx_kl=[8.7] + [0.0] * 9, entropy=5e-4, explained_variance=-0.3)  # all three hold
    assert ppo.policy_frozen(collapsed) and ppo.critic_not_learning(collapsed)  # the collapse explains both
    assert ppo.diagnose(collapsed) == [ppo.policy_collapsed(collapsed)]
    frozen = metrics_rows(approx_kl=1e-8, explained_variance=-0.5)
    assert ppo.diagnose(frozen) == [ppo.policy_frozen(frozen)]
    critic = metrics_rows(explained_variance=-0.3)
    assert ppo.diagnose(critic) == [ppo.critic_not_learning(critic)]
    assert ppo.diagnose(collapsed[:9]) == []  # too soon to tell a cause from a slow start


RULE_THAT_ALWAYS_HOLDS = [lambda rows: f"a rule held on {len(rows)} iterations"]


@pytest.mark.parametrize("ending", ["ended as configured", "solved", "Ctrl-C", "memory ran out", "divergence",
                                    "clean-up step failed"])
def test_only_a_run_that_ended_as_configured_without_solving_says_why(tmp_path, monkeypatch, capsys, ending):
    """A signal, an error (memory running out is one), a divergence and a failed clean-up step have
    their own message; the diagnosis is not added to them, nor to a run that solved."""
    monkeypatch.setattr(ppo, "DIAGNOSES", RULE_THAT_ALWAYS_HOLDS)
    calls, faults = [], {"Ctrl-C": KeyboardInterrupt(), "memory ran out": MemoryError()}

    def update(*args, **kwargs):  # the update is not under test: a learning run's stats, at once
        calls.append(1)
        if len(calls) == 11 and ending in faults:
            raise faults[ending]
        diverged = len(calls) == 11 and ending == "divergence"
        return dict(policy_loss=-1.0, value_loss=2.0, entropy=0.5, loss=math.nan if diverged else 1.0,
                    clip_fraction=0.1, grad_norm=1.0, approx_kl=0.005, explained_variance=0.8, epochs=2, minibatches=16)

    monkeypatch.setattr(ppo, "ppo_update", update)
    if ending == "clean-up step failed":
        monkeypatch.setattr(ppo, "plot_training", lambda *args: 1 / 0)  # after summary.json: it is rewritten
    flags = ["--target-return", "10"] if ending == "solved" else []  # a random policy's returns: ~20
    out = tmp_path / "run"
    ppo.main(QUICK + ["--episodes", "12", "--confirm-episodes", "0", "--eval-episodes", "1", "--no-gif", *flags,
                      "--out-dir", str(out)] + (["--no-plot"] if ending != "clean-up step failed" else []))
    summary, stdout = json.loads((out / "summary.json").read_text()), capsys.readouterr().out
    if ending == "ended as configured":
        assert summary["diagnosis"] == ["a rule held on 12 iterations"] and summary["exit_status"] == 0
        assert stdout.splitlines()[-1] == "why: a rule held on 12 iterations"
    else:
        assert summary["diagnosis"] == [] and "why:" not in stdout
        assert summary["iterations"] >= 10  # enough for a rule to have been asked
        assert (summary["solved_at_step"] is not None) == (ending == "solved")


def test_a_run_with_an_lr_far_too_high_says_its_policy_collapsed(tmp_path, capsys):
    out = tmp_path / "run"
    assert ppo.main(["--lr", "1", "--seed", "2", "--episodes", "10", "--confirm-episodes", "0", "--eval-episodes", "1",
                     "--no-plot", "--no-gif", "--out-dir", str(out)]) == 0
    summary, stdout = json.loads((out / "summary.json").read_text()), capsys.readouterr().out
    (line,) = summary["diagnosis"]
    assert line == ppo.policy_collapsed(read_csv(out / "metrics.csv")) and stdout.splitlines()[-1] == f"why: {line}"
    assert re.match(r"approx KL reached [\d.]+ at iteration 0 .* entropy averaged [\d.e-]+ over the last 5 "
                    r"iterations", line)


# ==== Main ========================================================================================

class FullDisk:
    """The run folder's disk fills up at the `at`-th append to episodes.csv, which gets half its bytes
    written before ENOSPC; from then on every write into the folder fails, as on a full disk."""

    def __init__(self, monkeypatch, out, at):
        self.out, self.at, self.appends, self.full = Path(out), at, 0, False
        real_write, real_open = os.write, open

        def write(fd, data):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not path.startswith(str(self.out)):
                return real_write(fd, data)
            if path.endswith("episodes.csv") and not self.full:
                self.appends += 1
                if self.appends == self.at:
                    self.full = True
                    real_write(fd, bytes(data)[:len(data) // 2])  # a partial row reaches the disk
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        class Full(io.RawIOBase):  # a file opened for writing once the disk is full
            def writable(self):
                return True

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def open_(path, mode="r", *args, **kwargs):
            if self.full and "w" in mode and str(path).startswith(str(self.out)):
                real_open(path, mode, *args, **kwargs).close()  # the file is made; nothing fits in it
                return Full()
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(ppo, "open", open_, raising=False)


def test_a_full_disk_ends_the_run_in_one_line_and_what_was_written_stays_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    disk = FullDisk(monkeypatch, out, at=4)
    status = ppo.main(QUICK + ["--episodes", "20", "--confirm-episodes", "0", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert disk.full and status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: iteration 3: could not write {out / 'episodes.csv'}: "
                                            "No space left on device")
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("skipped")] == \
        ["skipped final.pt", "skipped summary.json", "skipped training.png"]  # one line each, then the error
    episodes, metrics = read_csv(out / "episodes.csv"), read_csv(out / "metrics.csv")
    assert len(metrics) == 3 and all(None not in row.values() and len(row) == 7 for row in episodes)
    assert int(episodes[-1]["env_step"]) <= 3 * 256  # whole rows of the first 3 iterations, none of the 4th
    ppo.load_agent(out / "best.pt")  # saved before the disk filled, and whole
    assert not [path for path in out.iterdir() if path.name.endswith(".tmp")]


class BrokenCartPole(gym.Wrapper):
    """CartPole with a bug of its user's: from its 150th step, `fault` (a NaN observation, a NaN
    reward, or an exception)."""

    def __init__(self, fault="nan observation"):
        super().__init__(gym.make("CartPole-v1").unwrapped)
        self.fault, self.steps = fault, 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return (np.full_like(obs, np.inf) if self.fault == "inf at reset" else obs), info

    def close(self):
        super().close()
        if self.fault == "raise" and self.steps >= 150:
            raise RuntimeError("and its close broke too")  # the first error must still be the one shown

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps >= 150:
            if self.fault == "raise":
                raise RuntimeError("the user's env broke")
            if self.fault == "nan reward":
                reward = float("nan")
            else:
                obs = np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize("fault, what", [("nan observation", "observation"), ("nan reward", "reward")])
def test_an_env_that_returns_nan_is_named_not_taken_for_divergence(tmp_path, capsys, fault, what):
    gym.register(f"Broken-{what}-v0", entry_point=f"{__name__}:BrokenCartPole", kwargs=dict(fault=fault),
                 max_episode_steps=500, reward_threshold=475)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--env-id", f"Broken-{what}-v0", "--episodes", "20", "--confirm-episodes", "0",
                             "--no-gif", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    values = r"\[nan, nan, nan, nan\]" if what == "observation" else r"\[nan\]"  # (envs step apart: autoresets)
    assert re.fullmatch(rf"error: iteration 2: Broken-{what}-v0: [1-4] of 4 envs returned a non-finite {what} "
                        rf"\(env [0-3]: {values}\)", err.strip().splitlines()[-1]), err
    assert "--lr" not in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"].startswith("iteration 2: ") and summary["iterations"] == 2 and summary["divergence"] is None
    for name in ("best.pt", "final.pt", "training.png", "metrics.csv"):
        assert (out / name).exists(), name


@pytest.mark.filterwarnings("ignore:.*not within the observation space")  # the env's bug, which gymnasium sees too
def test_an_env_that_starts_non_finite_is_named_before_the_first_iteration(tmp_path, capsys):
    gym.register("Broken-reset-v0", entry_point=f"{__name__}:BrokenCartPole", kwargs=dict(fault="inf at reset"),
                 max_episode_steps=500, reward_threshold=475)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--env-id", "Broken-reset-v0", "--no-gif", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteEnv at iteration 0: writing" in err and err.strip().splitlines()[-1] == (
        "error: iteration 0: Broken-reset-v0: 4 of 4 envs returned a non-finite observation (env 0: [inf, inf, inf, inf])")
    assert json.loads((out / "summary.json").read_text())["iterations"] == 0 and (out / "final.pt").exists()


def test_a_vector_env_without_a_spec_is_named_as_the_env():
    envs = ppo.NumpyToTorch(gym.vector.SyncVectorEnv([lambda: BrokenCartPole("nan reward")]), torch.device("cpu"))
    envs.reset(seed=0)
    with pytest.raises(ppo.NonFiniteEnv, match=r"^the env: 1 of 1 envs returned a non-finite reward \(env 0: \[nan\]\)$"):
        for _ in range(500):
            envs.step(torch.zeros(1, dtype=torch.long))


def test_an_env_that_raises_keeps_the_files_then_shows_its_own_error(tmp_path, capsys):
    gym.register("Broken-raise-v0", entry_point=f"{__name__}:BrokenCartPole", kwargs=dict(fault="raise"),
                 max_episode_steps=500, reward_threshold=475)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the user's env broke"):  # main lets it through: Python's traceback
        ppo.main(QUICK + ["--env-id", "Broken-raise-v0", "--episodes", "20", "--no-gif", "--out-dir", str(out)])
    assert "RuntimeError at iteration 2: writing final.pt" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] == "iteration 2: RuntimeError: the user's env broke"
    assert len(read_csv(out / "metrics.csv")) == 2
    for name in ("best.pt", "final.pt", "training.png"):
        assert (out / name).exists(), name


CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. "
           "Error code 12 (Cannot allocate memory)")  # torch 2.13's words on the CPU
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"
SIZES = "lower what sizes the run: --num-envs 4, --buffer-size 256, --minibatch-size 32, --confirm-episodes 50, " \
        "--eval-episodes 2"


@pytest.mark.parametrize("exc, asked", [(RuntimeError(CPU_OOM), " (asked for 8.00 GiB)"),
                                        (torch.OutOfMemoryError(CUDA_OOM), " (asked for 2.00 GiB)"),
                                        (MemoryError("Unable to allocate 7.45 MiB for an array"), " (asked for 7.45 MiB)"),
                                        (RuntimeError(CPU_OOM.replace("8589934592", "16777216")), " (asked for 16.0 MiB)"),
                                        (RuntimeError(CPU_OOM.replace("8589934592", str(2**30 - 2**20))), " (asked for 1023.0 MiB)"),
                                        (RuntimeError(CPU_OOM.replace("8589934592", str(2**30))), " (asked for 1.00 GiB)"),
                                        (MemoryError(), "")])
def test_memory_running_out_is_told_in_one_line_with_the_size_flags(exc, asked):
    config, run = ppo.parse_args(QUICK)
    assert str(ppo.out_of_memory(exc, config, run)) == f"memory ran out{asked}; {SIZES}"


@pytest.mark.parametrize("exc", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("allocate 3 bytes"),
                                 OSError(errno.ENOMEM, "Cannot allocate memory")])
def test_other_errors_are_not_taken_for_memory_running_out(exc):
    assert ppo.out_of_memory(exc, *ppo.parse_args(QUICK)) is None


def fail_on_call(monkeypatch, owner, name, call, exc):
    """owner.name raises exc on its `call`-th call, as an allocation that fails there would."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("where, owner, name, exc, asked", [
    ("update", ppo, "ppo_update", RuntimeError(CPU_OOM), " (asked for 8.00 GiB)"),
    ("rollout", ppo.Collector, "step", torch.OutOfMemoryError(CUDA_OOM), " (asked for 2.00 GiB)")])
def test_memory_running_out_in_the_loop_ends_in_one_line_with_the_files_whole(
        tmp_path, monkeypatch, capsys, where, owner, name, exc, asked):
    fail_on_call(monkeypatch, owner, name, 4 if where == "update" else 3 * 64 + 5, exc)  # (64 steps a rollout)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "20", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: iteration 3: memory ran out{asked}; {SIZES}"
    assert "Traceback" not in err and "skipped" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] == f"iteration 3: memory ran out{asked}; {SIZES}" and summary["exit_status"] == 1
    assert len(read_csv(out / "metrics.csv")) == 3
    ppo.load_agent(out / "best.pt"), ppo.load_agent(out / "final.pt")
    Image.open(out / "training.png").verify()


@pytest.mark.parametrize("exc, line", [
    (MemoryError("Unable to allocate 7.45 MiB for an array"), f"memory ran out (asked for 7.45 MiB); {SIZES}"),
    (ValueError("a bug in the plot"), "ValueError: a bug in the plot")])
def test_a_clean_up_step_that_fails_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capsys, exc, line):
    """The plot fails after summary.json is written: the GIF is still made, summary.json is rewritten."""
    fail_on_call(monkeypatch, ppo, "plot_training", 1, exc)
    out = tmp_path / "run"
    assert ppo.main(QUICK + ["--episodes", "3", "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped training.png: {line}" in err.splitlines()
    assert err.strip().splitlines()[-1] == f"error: iteration 3: {line}" and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] == f"iteration 3: {line}" and summary["exit_status"] == 1
    assert not (out / "training.png").exists()
    Image.open(out / "agent.gif").verify()


@pytest.mark.shell
def test_a_run_from_the_shell_never_imports_torch_dynamo(tmp_path):
    # What the script's own Adam is for: torch.optim's first use imports torch._dynamo (~1.5 s).
    check = ("import atexit, runpy, sys; atexit.register(lambda: print('dynamo', 'torch._dynamo' in sys.modules)); "
             f"sys.argv = ['ppo_cartpole.py', *{QUICK!r}, '--episodes', '2', '--out-dir', {str(tmp_path / 'run')!r}]; "
             f"runpy.run_path({str(Path(ppo.__file__))!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "dynamo False", proc.stderr
    assert (tmp_path / "run" / "training.png").exists() and (tmp_path / "run" / "agent.gif").exists()


@pytest.mark.shell
def test_a_huge_lr_diverges_cleanly_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(ppo.__file__)), *QUICK, "--lr", "1e6", "--episodes", "30",
                           "--no-gif", "--no-plot", "--out-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 1 and "diverged at iteration" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["divergence"].startswith("iteration")


def as_from_a_terminal():
    """Each signal a run catches at its default, as a terminal's job has them: a shell's background
    job inherits SIGINT ignored, and one under nohup (a CI runner's, say) SIGHUP."""
    for name in ["SIGINT", *ppo.ENDING_SIGNALS]:
        signal.signal(signal.Signals[name], signal.SIG_DFL)


def start_run(out, *extra, **popen):
    """A child process training in `out` until told to stop, once it has logged 3 iterations."""
    popen = dict(stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=as_from_a_terminal) | popen
    proc = subprocess.Popen([sys.executable, str(Path(ppo.__file__)), *QUICK, "--episodes", "100000",
                             "--out-dir", str(out), *extra], **popen)
    wait_for_rows(out, proc, rows=3)
    return proc


def wait_for_rows(out, proc, rows):
    while not (out / "metrics.csv").exists() or len(read_csv(out / "metrics.csv")) < rows:
        time.sleep(0.05)
        assert proc.poll() is None


@pytest.mark.shell
@pytest.mark.parametrize("name", ["SIGINT", *ppo.ENDING_SIGNALS])
def test_each_ending_signal_is_handled_like_ctrl_c_and_exits_128_plus_its_number(tmp_path, name):
    number, out, plot = signal.Signals[name], tmp_path / "run", name == "SIGTERM"  # the plot checked once
    proc = start_run(out, "--no-gif", *([] if plot else ["--no-plot"]))
    proc.send_signal(number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + number and "Traceback" not in err
    assert f"{name}: writing final.pt, metrics, plot and summary" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["signal"] == name and summary["exit_status"] == 128 + number
    for file in ["best.pt", "final.pt", "metrics.csv", *(["training.png"] if plot else [])]:
        assert (out / file).exists(), file


@pytest.mark.shell
def test_with_the_terminal_gone_a_signal_still_writes_the_files(tmp_path):
    """A terminal that closed fails every write (EIO); a pipe nobody reads fails them too (EPIPE)."""
    out = tmp_path / "run"
    proc = start_run(out, "--no-gif", "--no-plot", stdout=subprocess.PIPE)
    proc.stdout.close(), proc.stderr.close()
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    summary = json.loads((out / "summary.json").read_text())
    assert summary["signal"] == "SIGHUP" and summary["error"] is None
    ppo.load_agent(out / "final.pt")


@pytest.mark.shell
@pytest.mark.parametrize("closed", [(1, 2), (0, 1, 2), "/dev/full"])
def test_a_run_started_with_its_stdio_closed_trains_and_writes_every_file(tmp_path, closed):
    """A process manager's or a cron line's `>&- 2>&-`: Python starts with sys.stdout and sys.stderr
    None, and the next file opened would take fd 1 or 2. The run goes on, silent, and writes it all;
    so does one whose messages go to a full device."""
    out = tmp_path / "run"
    argv = [sys.executable, str(Path(ppo.__file__)), *QUICK, "--episodes", "2", "--confirm-episodes", "0",
            "--no-gif", "--out-dir", str(out)]
    if closed == "/dev/full":
        with open(closed, "w") as full:
            status = subprocess.run(argv, stdout=full, stderr=full, timeout=120).returncode
    else:
        status = subprocess.run(argv, preexec_fn=lambda: [os.close(fd) for fd in closed], timeout=120).returncode
    assert status == 0
    assert {"summary.json", "final.pt", "best.pt", "metrics.csv", "episodes.csv", "training.png"} <= \
        {path.name for path in out.iterdir()}
    assert json.loads((out / "summary.json").read_text())["exit_status"] == 0
    assert (out / "metrics.csv").read_text().startswith("iteration,")  # the CSV, not a message, at its start


@pytest.mark.shell
def test_a_sighup_inherited_as_ignored_stays_ignored(tmp_path):
    """nohup ignores SIGHUP for the command it starts: the run goes on after the terminal closes."""
    out = tmp_path / "run"
    proc = start_run(out, "--no-gif", "--no-plot", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    wait_for_rows(out, proc, rows=len(read_csv(out / "metrics.csv")) + 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "SIGHUP" not in err


def test_ending_signals_are_caught_unless_inherited_as_ignored(monkeypatch):
    previous = {name: signal.getsignal(signal.Signals[name]) for name in ppo.ENDING_SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        monkeypatch.setitem(ppo.ENDING_SIGNALS, "SIGNOTHERE", "a signal this platform lacks: skipped")
        replaced = ppo.catch_ending_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.SIGHUP not in replaced
        for name in ["SIGTERM", "SIGUSR1", "SIGUSR2"]:
            assert signal.getsignal(signal.Signals[name]) is ppo.raise_interrupted, name
            assert replaced[signal.Signals[name]] == previous[name]
        with pytest.raises(ppo.Interrupted, match="SIGUSR2"):
            signal.raise_signal(signal.SIGUSR2)
    finally:
        for name, handler in previous.items():
            signal.signal(signal.Signals[name], handler)



def test_best_effort_output_drops_what_a_gone_terminal_cannot_take_and_goes_quiet():
    read, write = os.pipe()
    os.close(read)  # nobody reads: a write fails with EPIPE, as one to a closed terminal fails with EIO
    with os.fdopen(write, "w") as stream:
        out = ppo.BestEffort(stream)
        assert out.write("a message\n") == len("a message\n")  # no error
        assert os.readlink(f"/proc/self/fd/{write}") == os.devnull  # so Python's flush at exit cannot fail
        out.write("the next\n"), out.flush()
        assert out.fileno() == write  # anything else is the stream's own
    working = io.StringIO()
    ppo.BestEffort(working).write("kept\n")
    assert working.getvalue() == "kept\n"

    class GoneWithoutFile(io.StringIO):  # a failing stream that has no file to point elsewhere
        def write(self, text):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    assert ppo.BestEffort(GoneWithoutFile()).write("dropped\n") == len("dropped\n")
    assert ppo.BestEffort(None).write("nowhere\n") == len("nowhere\n")  # a stream closed at start

@pytest.mark.shell
def test_a_second_signal_during_clean_up_leaves_no_partial_file(tmp_path):
    proc = start_run(tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:
        if "writing final.pt" in line:  # the clean-up has begun
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err
    names = [p.name for p in (tmp_path / "run").iterdir()]
    assert not [name for name in names if name.endswith(".tmp")]  # no temp file left
    for name in names:  # and every file that is there is whole
        if name.endswith(".pt"):
            ppo.load_agent(tmp_path / "run" / name)
        elif name == "summary.json":
            json.loads((tmp_path / "run" / name).read_text())
        elif name.endswith((".png", ".gif")):
            Image.open(tmp_path / "run" / name).verify()


@pytest.mark.shell
def test_bad_input_from_the_shell_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "ppo_cartpole.py", "--minibatch-size", "99999"],
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    assert proc.returncode == 2
    assert "error: argument --minibatch-size" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_flag_evaluates_and_writes_a_gif_without_training(tmp_path, capsys):
    ppo.save_checkpoint(tmp_path / "best.pt", small_net(), {"env_id": "CartPole-v1"})
    assert ppo.main(["--eval", str(tmp_path / "best.pt"), "--eval-episodes", "3"]) == 0
    assert "mean" in capsys.readouterr().out
    assert (tmp_path / "eval_best.gif").exists() and not (tmp_path / "metrics.csv").exists()


# ==== The documents ===============================================================================

def test_readme_flag_table_and_help_name_the_same_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_flags = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out.split("options:")[1]))
    help_flags = {flag for flag in help_flags if not flag.startswith("--no-")} - {"--help"}
    readme = (Path(__file__).parent / "README.md").read_text()
    table = readme.split("## Flags")[1].split("\n## ")[0]
    table_flags = {flag for row in table.splitlines() if row.startswith("| `--")
                   for flag in re.findall(r"`(--[a-z][a-z-]+)", row.split("|")[1])}
    table_flags = {flag for flag in table_flags if not flag.startswith("--no-")}
    assert table_flags == help_flags


DOCUMENTS = ["README.md", "README.zh-CN.md", *sorted(str(p.relative_to(Path(__file__).parent))
                                                  for p in (Path(__file__).parent / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_flag_and_file_a_document_names_exists(document):
    """Both READMEs and every docs page: each `make` target, each flag given to ppo_cartpole.py,
    each script and picture they name is really there."""
    root = Path(__file__).parent
    text = (root / document).read_text()
    targets = set(re.findall(r"^([a-z-]+):", (root / "Makefile").read_text(), re.MULTILINE))
    assert set(re.findall(r"make ([a-z][a-z-]*)", text)) <= targets
    flags = help_flags()
    for line in re.findall(r"ppo_cartpole\.py[^\n`|]*", text):
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line))
        assert named <= flags, (line, named - flags)
    for path in set(re.findall(r"((?:bench|assets|docs)/[\w./-]+\.(?:py|png|gif|md))", text)):
        assert (root / path).exists() or (root / Path(document).parent / path).exists(), path
    if document == "README.zh-CN.md":
        assert "README.zh-CN.md" in (root / "README.md").read_text().split("\n## ")[0]  # linked from the top


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_and_heading_anchor_a_document_names_exists(document):
    root = Path(__file__).parent
    text = (root / document).read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue  # no network in CI
        path, _, anchor = link.partition("#")
        target = (root / document).parent / path if path else root / document
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", target.read_text(), flags=re.DOTALL),
                                  re.MULTILINE)
            assert anchor in {github_anchor(heading) for heading in headings}, link


def quantities(text: str) -> list[float]:
    """The numbers a text states, as quantities: 267k, 26.7 万 and 267,000 are all 267000."""
    scale = {"": 1, "k": 1e3, "M": 1e6, "万": 1e4}
    return [round(float(digits.replace(",", "")) * scale[latin or chinese], 6)
            for digits, latin, chinese in re.findall(r"(\d+(?:[.,]\d+)*)(?:(k|M)\b|\s?(万))?", text)]


def test_quantities_read_both_languages_units_alike():
    assert quantities("267k env steps, 2.05M, 1,544 mutants, eq. (7)") == [267000, 2050000, 1544, 7]
    assert quantities("26.7 万环境步、205 万、1,544 个变异体、式 (7)") == [267000, 2050000, 1544, 7]
    assert quantities("3e-3, 0.2, 2.8 倍") == [3, 3, 0.2, 2.8]


def test_the_two_readmes_tables_carry_the_same_numbers():
    """The Chinese README has the English one's tables, translated: every quantity in them agrees
    (26.7 万 in Chinese is 267k in English)."""
    root = Path(__file__).parent

    def table_numbers(text):
        rows = [line for line in text.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
        return [quantities(re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)", "", row)) for row in rows]

    english, chinese = (table_numbers((root / name).read_text()) for name in ("README.md", "README.zh-CN.md"))
    assert len(english) > 40 and english == chinese


# ==== Learning (slow: make test-slow) =============================================================

@pytest.mark.slow
def test_defaults_solve_cartpole_and_best_pt_plays_475(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(["--stop-when-solved", "--episodes", "400", "--no-gif", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solved_at_step"] is not None
    net, _ = ppo.load_agent(out / "best.pt")
    assert ppo.evaluate(net, "CartPole-v1", 20, seed=12345).mean() >= 475


@pytest.mark.slow
def test_torch_backend_on_the_cpu_solves_gymnasiums_cartpole(tmp_path):
    out = tmp_path / "run"
    assert ppo.main(["--env-backend", "torch", "--device", "cpu", "--num-envs", "64", "--buffer-size", "2048",
                     "--minibatch-size", "512", "--stop-when-solved", "--episodes", "400", "--no-gif", "--no-plot",
                     "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solved_at_step"] is not None and summary["config"]["env_backend"] == "torch"
    net, _ = ppo.load_agent(out / "best.pt")
    assert ppo.evaluate(net, "CartPole-v1", 20, seed=12345).mean() >= 475  # gymnasium's own env


@pytest.mark.slow
def test_the_defaults_reach_a_second_envs_threshold_and_best_pt_plays_it(tmp_path):
    """Acrobot-v1: no native vector env, a negative reward threshold (-100), 3 actions, 6 inputs."""
    out = tmp_path / "run"
    assert ppo.main(["--env-id", "Acrobot-v1", "--seed", "2", "--stop-when-solved", "--episodes", "300", "--no-gif",
                     "--no-plot", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solved_at_step"] is not None and summary["config"]["target_return"] == -100
    net, _ = ppo.load_agent(out / "best.pt")
    assert (net.obs_dim, net.act_dim) == (6, 3)
    assert ppo.evaluate(net, "Acrobot-v1", 20, seed=12345).mean() >= -100


# --- the notebook and the READMEs' first screens ---

READMES = ["README.md", "README.zh-CN.md"]
CJK = re.compile(r"[\u4e00-\u9fff]")


def code_lines(source: str) -> list[str]:
    """A cell's code without its comments and blank lines: the comments differ by language."""
    lines = (re.sub(r"\s+#\s.*$", "", line).rstrip() for line in source.splitlines())
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def readme_notebook_section(text: str) -> str:
    """A README's notebook section: its heading names Colab."""
    return next(section for section in text.split("\n## ")[1:] if "Colab" in section.splitlines()[0])


def readme_notebook_cells(text: str) -> list[str]:
    """The ```python blocks of a README's notebook section."""
    return re.findall(r"```python\n(.*?)```", readme_notebook_section(text), re.DOTALL)


def markdown_tables(text: str) -> list[tuple[int, list[list[str]]]]:
    """Each table outside code blocks: (the line number of its last row, its body rows as cells)."""
    text = re.sub(r"```.*?```", lambda block: "\n" * block.group().count("\n"), text, flags=re.DOTALL)
    tables, rows = [], []
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            tables.append((number - 1, rows[2:]))  # the header and its rule left out
            rows = []
    return tables


def test_the_notebook_file_holds_the_readmes_cells_without_outputs():
    """ppo_cartpole.ipynb (json, as nbformat is no run-time need): the READMEs' three cells, code line
    for code line, each after a note in Chinese, then English; the first checks the two files it
    needs are beside it before it installs; nothing executed is stored."""
    root = Path(__file__).parent
    notebook = json.loads((root / "ppo_cartpole.ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = notebook["cells"]
    assert [cell["cell_type"] for cell in cells] == ["markdown", "code"] * 3
    code = [code_lines("".join(cell["source"])) for cell in cells if cell["cell_type"] == "code"]
    for name in READMES:
        assert [code_lines(cell) for cell in readme_notebook_cells((root / name).read_text())] == code, name
    assert code[0][-1].startswith("%pip install") and "ppo_cartpole.py" in code[0][1] and "requirements.txt" in code[0][1]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells if cell["cell_type"] == "code")
    for name in READMES:  # the Colab route, told alike: the first screen, the notebook section, the notebook
        text = (root / name).read_text()
        for told in ("\n".join(text.splitlines()[:60]), readme_notebook_section(text)):
            assert "`/content`" in told and "`!git clone <" in told, name
    assert "`/content`" in "".join(cells[0]["source"]) and "`!git clone <" in "".join(cells[0]["source"])
    assert "/content" in code[0][-2] and "!git clone" in code[0][-2]  # the error message, when they are missing
    for cell in cells[::2]:
        prose = re.sub(r"```.*?```|^---$", "", "".join(cell["source"]), flags=re.DOTALL | re.MULTILINE)
        chinese = [bool(CJK.search(paragraph)) for paragraph in prose.split("\n\n") if paragraph.strip()]
        assert chinese[0] and not chinese[-1] and chinese == sorted(chinese, reverse=True), cell["id"]


def test_both_readmes_open_with_the_same_ten_concepts_each_linked_to_the_code_map():
    """The first table of each README, within its first 60 lines (the first screen), maps ten of the
    post's concepts to the code: the same names in the same rows in both languages, the header linking
    to the section whose table (the full code map) holds those names, each row naming its part of it.
    The flags a row names (the ideas of the post that are off by default say which flag turns them on)
    are flags of the script."""
    root = Path(__file__).parent
    code_columns = []
    for name in READMES:
        text = (root / name).read_text()
        last_line, excerpt = markdown_tables(text)[0]
        assert last_line <= 60 and len(excerpt) == 10, name
        names = [re.findall(r"`([^`]+)`", row[1]) for row in excerpt]
        assert all(names) and all(row[2].strip() for row in excerpt), name
        sections = {github_anchor(section.splitlines()[0]): section for section in text.split("\n## ")[1:]}
        header = text.splitlines()[last_line - len(excerpt) - 2]
        (anchor,) = re.findall(r"\]\(#([^)]+)\)", header)
        code_map = markdown_tables(sections[anchor])[0][1]
        for row, row_names in zip(excerpt, names):
            code = {name for name in row_names if not name.startswith("--")}
            flags = {name.split()[0] for name in row_names if name.startswith("--")}
            assert code and code <= {code for row in code_map for code in re.findall(r"`([^`]+)`", row[1])}, row
            assert flags <= help_flags(), row
        code_columns.append(names)
    assert code_columns[0] == code_columns[1]
    flags_named = {name.split()[0] for row in code_columns[0] for name in row if name.startswith("--")}
    assert {"--value-clip-eps", "--entropy-coef", "--entropy-floor", "--target-kl"} <= flags_named
