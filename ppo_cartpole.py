"""PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") for gymnasium's CartPole-v1.

Above the banner, PPO in the order it runs; below it, the machinery of a run (envs, flags, files, plots).
Shapes: T steps per env per rollout, N envs, B samples of a rollout, M of a minibatch, A actions, D obs size.
Usage:
    python ppo_cartpole.py --stop-when-solved              # train with the defaults until solved
    python ppo_cartpole.py --episodes 2000 --device cuda   # on a GPU: CartPole stepped in torch
    python ppo_cartpole.py --eval runs/<run>/best.pt
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import importlib
import io
import json
import math
import os
import platform
import signal
import sys
import time
import typing
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical
from tqdm import tqdm

# ==== Config ======================================================================================
def option(default, help: str, **flag):
    """A config field and its flag: help, argparse keywords, `allowed` (an interval, checked)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class Config:
    """PPO's settings, each a flag of the same name (num_envs: --num-envs); README, "Flags": why ours differ."""

    env_id: str = option("CartPole-v1", "gymnasium env id: Discrete actions, a flat Box observation")
    seed: int = option(1, "seeds the network, the envs, sampling and shuffling", allowed="[0, 2e9]")
    # Sizes: a rollout is buffer_size = N envs x T steps; each epoch cuts it into minibatches.
    num_envs: int = option(32, "N parallel envs", allowed="[1, 65536]")
    buffer_size: int = option(1024, "steps per rollout over all envs: T = buffer-size / num-envs >= 2",
                              allowed="[2, 2097152]")
    minibatch_size: int = option(256, "samples per gradient step; an epoch's last has the rest", allowed="[1, 262144]")
    num_iterations: int = option(2000, "rollout+update iterations (the post calls one an 'episode')",
                                 aliases=("--episodes", "--iterations"), metavar="N", allowed="[1, 1e9]")
    update_epochs: int = option(4, "K passes over each rollout", allowed="[1, 100]")
    lr: float = option(3e-3, "Adam learning rate", allowed="(0, 1e30]")
    anneal_lr: bool = option(True, "decay the learning rate linearly to 0 over the run")
    gamma: float = option(0.995, "discount: a horizon of 1 / (1 - gamma) = 200 steps", allowed="[0, 1]")
    gae_lambda: float = option(0.8, "GAE lambda", allowed="[0, 1]")
    normalize_advantages: bool = option(False, "scale each rollout's advantages to mean 0, std 1")
    # Losses
    clip_eps: float = option(0.2, "epsilon of the clipped surrogate L^CLIP", allowed="(0, 1)")
    value_clip_eps: float | None = option(None, "clip each value update to +-this around V_old (default: off)",
                                          allowed="(0, inf)")
    value_coef: float = option(0.5, "weight of the value loss", allowed="[0, inf)")
    entropy_coef: float = option(0.0, "entropy bonus, annealed linearly to --entropy-floor", allowed="[0, inf)")
    entropy_floor: float = option(0.0, "the lowest the annealed entropy bonus goes", allowed="[0, inf)")
    max_grad_norm: float = option(0.5, "clip the gradient's global norm to this (0 = off)", allowed="[0, inf)")
    target_kl: float | None = option(None, "end an update once a minibatch's approx KL exceeds this (default: off)",
                                     allowed="(0, inf)")


# ==== Model =======================================================================================
def layer_init(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias, as the PPO paper's baselines code."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """The post's network: a shared 64-64 ReLU trunk, a policy head and a value head. Needs: layer_init."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64):
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, hidden
        self.trunk = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden), math.sqrt(2)), nn.ReLU(),
            layer_init(nn.Linear(hidden, hidden), math.sqrt(2)), nn.ReLU())
        self.policy_head = layer_init(nn.Linear(hidden, act_dim), 0.01)  # a near-uniform first policy
        self.value_head = layer_init(nn.Linear(hidden, 1), 1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [..., D] -> (logits [..., A], values [...]): the contract every `net` below meets."""
        features = self.trunk(obs)
        return self.policy_head(features), self.value_head(features).squeeze(-1)


# ==== Rollout =====================================================================================
@dataclass
class Rollout:
    """One rollout, [T, N] (time, env): GAE runs along time, per env (the post's flat list mixed them)."""

    obs: torch.Tensor  # [T, N, D]
    actions: torch.Tensor
    logprobs: torch.Tensor  # log pi_old(a|s)
    rewards: torch.Tensor  # + gamma * V(final obs) where a time limit alone ended the episode
    values: torch.Tensor  # V_old(s)
    dones: torch.Tensor  # 1.0 iff the episode ended *at* step t (terminated or truncated)
    valid: torch.Tensor  # 0.0 on the autoreset steps, which only reset an env: not experience
    last_value: torch.Tensor  # [N] V(obs after the last step), the last step's bootstrap
    ended_returns: torch.Tensor  # return and length of the episode that ended at t, where dones = 1
    ended_lengths: torch.Tensor


class Collector:
    """Steps N envs for T steps with the current policy, pi_old, into a [T, N] Rollout (its own buffers,
    rewritten by the next `collect`). The envs run on across rollouts: the post reset them each time, so
    no episode outlasted T. envs: torch in and out, next-step autoreset (the step after an episode ends
    only resets that env: `valid` 0); same-step autoreset (gymnasium < 1.0) is refused. Needs: Rollout."""

    AUTORESET_ERROR = "Collector needs next-step autoreset, got {}: use gymnasium >= 1.0 and its default, NEXT_STEP"

    def __init__(self, envs, num_steps: int, seed: int, device: torch.device):
        mode = getattr(envs, "metadata", {}).get("autoreset_mode")
        mode = getattr(mode, "value", mode)
        if mode not in (None, "NextStep") or (mode is None and int(gym.__version__.split(".")[0]) < 1):
            raise ValueError(self.AUTORESET_ERROR.format(
                mode or f"gymnasium {gym.__version__}, which resets on the same step"))
        self.envs = envs
        T, N, obs_shape = num_steps, envs.num_envs, envs.single_observation_space.shape
        zeros = functools.partial(torch.zeros, device=device)
        self.rollout = Rollout(obs=zeros(T, N, *obs_shape), actions=zeros(T, N, dtype=torch.long),
                               logprobs=zeros(T, N), rewards=zeros(T, N), values=zeros(T, N), dones=zeros(T, N),
                               valid=zeros(T, N), last_value=zeros(N), ended_returns=zeros(T, N),
                               ended_lengths=zeros(T, N))
        self.truncated_only = zeros(T, N)
        self.next_obs = envs.reset(seed=seed)[0].to(device, torch.float32, copy=True)
        self.prev_done, self.episode_return, self.episode_length = zeros(N), zeros(N), zeros(N)

    def collect(self, net: nn.Module, gamma: float) -> Rollout:
        """T steps with `net`, obs [..., D] -> (logits [..., A], values [...]), as pi_old."""
        r = self.rollout
        with torch.inference_mode():
            for t in range(len(r.rewards)):
                self.step(net, t)
            r.last_value.copy_(net(self.next_obs)[1])
            # Next-step autoreset: V(final obs) is the next row's value. A time limit is not failure: bootstrap.
            next_values = torch.cat([r.values[1:], r.last_value.unsqueeze(0)])  # [T, N]
            r.rewards += gamma * next_values * self.truncated_only
        return r

    def step(self, net: nn.Module, t: int) -> None:
        """Row t of the rollout: act on next_obs, step the envs; the carried state changes in place."""
        r = self.rollout
        logits, values = net(self.next_obs)
        policy = Categorical(logits=logits, validate_args=False)
        actions = policy.sample()
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        if "final_obs" in info or "final_observation" in info:
            raise ValueError(self.AUTORESET_ERROR.format("a final observation in info (same-step autoreset)"))
        done = (terminated | truncated).float()
        r.obs[t], r.actions[t], r.logprobs[t], r.values[t] = self.next_obs, actions, policy.log_prob(actions), values
        r.rewards[t], r.dones[t] = rewards, done
        r.valid[t] = 1.0 - self.prev_done
        # At step 500 CartPole can report both flags: then it is a termination, no bootstrap.
        self.truncated_only[t] = (truncated & ~terminated).float()
        self.episode_return += rewards
        self.episode_length += r.valid[t]
        r.ended_returns[t], r.ended_lengths[t] = self.episode_return, self.episode_length
        self.episode_return *= 1.0 - done
        self.episode_length *= 1.0 - done
        self.prev_done.copy_(done)
        self.next_obs.copy_(next_obs)


# ==== Advantages: GAE (Schulman et al. 2016; PPO paper eq. 11-12) =================================
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
                last_value: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, dones [T, N], last_value [N] -> (advantages, returns = advantages + values) [T, N].
    dones[t] = 1 iff the episode ended *at* t (CleanRL's: *before* t; mixing them shifts every cut by a
    step). A truncation's bootstrap, gamma * V(final obs), must already be in rewards (Collector adds
    it). last_value bootstraps each env from its own value (the post averaged one over all envs)."""
    advantages = torch.zeros_like(rewards)
    gae, next_value = torch.zeros_like(last_value), last_value
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]  # TD error, eq. (12)
        gae = delta + gamma * lam * not_done * gae  # eq. (11), as a recursion
        advantages[t] = gae
        next_value = values[t]
    return advantages, advantages + values


# ==== Losses ======================================================================================
def clipped_surrogate_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """-L^CLIP, eq. (7), of ratios r = pi / pi_old and advantages [M]. The min is a pessimistic bound:
    past 1 + eps (A > 0) or 1 - eps (A < 0) a sample gains nothing and gets no gradient."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped).mean()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_eps: float | None) -> torch.Tensor:
    """L^VF = 0.5 mean((V - R)^2) over [M]; with clip_eps, the baselines' pessimistic clip of V around V_old."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped.mean()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.max(unclipped, (values_clipped - returns) ** 2).mean()


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) from log r [M] on samples of pi_old: mean((r - 1) - log r), unbiased and never
    negative (Schulman, "Approximating KL Divergence", 2020)."""
    return (torch.exp(log_ratio) - 1 - log_ratio).mean()


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) of [B]: 1 perfect, <= 0 no better than a constant, NaN if constant."""
    var_target = target.var(correction=0)
    return torch.where(var_target == 0, math.nan, 1 - (target - predicted).var(correction=0) / var_target)


# ==== PPO update ==================================================================================
def lr_at(iteration: int, num_iterations: int, lr: float, anneal: bool) -> float:
    """Linear decay from lr towards 0 when annealing, else constant."""
    return lr * (1 - iteration / num_iterations) if anneal else lr


def entropy_coef_at(iteration: int, num_iterations: int, initial: float, floor: float) -> float:
    """The post's annealing: explore early, exploit late."""
    return max(floor, initial * (1 - iteration / num_iterations))


def minibatch_loss(net: nn.Module, obs: torch.Tensor, actions: torch.Tensor, old_logprobs: torch.Tensor,
                   old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, *, clip_eps: float,
                   value_clip_eps: float | None, value_coef: float, entropy_coef: float) -> tuple[torch.Tensor, dict]:
    """Eq. (9), negated to minimise: loss = -L^CLIP + c1 L^VF - c2 H, on obs [M, D] and the rest [M].
    Returns (loss, detached stats). Needs: clipped_surrogate_loss, value_loss, approx_kl."""
    logits, values = net(obs)
    policy = Categorical(logits=logits, validate_args=False)
    log_ratio = policy.log_prob(actions) - old_logprobs
    ratio = torch.exp(log_ratio)
    policy_loss = clipped_surrogate_loss(ratio, advantages, clip_eps)
    v_loss = value_loss(values, old_values, returns, value_clip_eps)
    entropy = policy.entropy().mean()
    loss = policy_loss + value_coef * v_loss - entropy_coef * entropy
    with torch.no_grad():
        stats = dict(policy_loss=policy_loss, value_loss=v_loss, entropy=entropy, loss=loss,
                     approx_kl=approx_kl(log_ratio), clip_fraction=((ratio - 1).abs() > clip_eps).float().mean())
    return loss, {name: value.detach() for name, value in stats.items()}


def ppo_update(net: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, advantages: torch.Tensor,
               returns: torch.Tensor, *, update_epochs: int, minibatch_size: int, clip_eps: float,
               value_clip_eps: float | None, value_coef: float, entropy_coef: float, max_grad_norm: float = 0.0,
               target_kl: float | None = None, normalize_advantages: bool = False) -> dict:
    """Algorithm 1's update: K epochs of shuffled minibatches (torch's RNG; the last may be smaller), actor and
    critic together, on advantages and returns [T, N] from compute_gae. max_grad_norm 0: no clip. target_kl: stop
    before the step of the first minibatch whose KL exceeds it (SB3 stops at 1.5 x its target_kl). Returns floats:
    the means over the minibatches stepped (approx_kl's with the stopped one), explained_variance of V_old, epochs
    completed, minibatches stepped. Needs: Rollout, minibatch_loss, explained_variance."""
    kept = rollout.valid.flatten().nonzero().squeeze(1)  # the autoreset steps are not experience: dropped here
    b_obs = rollout.obs.flatten(0, 1)[kept]  # [T, N, D] -> [B, D]
    b_actions, b_logprobs, b_values, b_advantages, b_returns = (
        x.flatten()[kept] for x in (rollout.actions, rollout.logprobs, rollout.values, advantages, returns))
    if normalize_advantages and len(b_advantages) > 1:
        b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)

    stepped, stopped, epochs = [], [], 0
    for _ in range(update_epochs):
        order = torch.randperm(len(b_obs), device=b_obs.device)
        for start in range(0, len(b_obs), minibatch_size):
            indices = order[start:start + minibatch_size]
            loss, stats = minibatch_loss(
                net, b_obs[indices], b_actions[indices], b_logprobs[indices], b_values[indices], b_advantages[indices],
                b_returns[indices], clip_eps=clip_eps, value_clip_eps=value_clip_eps, value_coef=value_coef,
                entropy_coef=entropy_coef)
            if target_kl is not None and stats["approx_kl"] > target_kl:
                stopped.append(stats)  # this step would take pi too far from pi_old: end the update here
                break
            optimizer.zero_grad()
            loss.backward()
            stats["grad_norm"] = nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm or math.inf)
            optimizer.step()
            stepped.append(stats)
        if stopped:
            break
        epochs += 1

    def mean(rows: list[dict], key: str) -> float:
        return torch.stack([row[key] for row in rows]).mean().item() if rows else 0.0
    means = {key: mean(stepped, key) for key in ("policy_loss", "value_loss", "entropy", "loss", "clip_fraction",
                                                 "grad_norm")}
    return dict(means, approx_kl=mean(stepped + stopped, "approx_kl"),
                explained_variance=explained_variance(b_values, b_returns).item(), epochs=epochs,
                minibatches=len(stepped))


# ==== The loop: collect, advantages, update =======================================================
def ppo_iterations(config: Config, envs, net: nn.Module, optimizer: torch.optim.Optimizer):
    """Algorithm 1: yields (rollout, ppo_update's stats + lr, entropy_coef, collect_ and update_seconds)
    per iteration; the caller seeds torch, makes the optimizer over net's parameters (torch.optim.Adam, or
    train's `Adam`; its lr is set here), logs, saves, stops. Needs: Config, Collector, compute_gae, ppo_update."""
    collector = Collector(envs, config.buffer_size // config.num_envs, config.seed, next(net.parameters()).device)
    for iteration in range(config.num_iterations):
        optimizer.param_groups[0]["lr"] = lr = lr_at(iteration, config.num_iterations, config.lr, config.anneal_lr)
        entropy_coef = entropy_coef_at(iteration, config.num_iterations, config.entropy_coef, config.entropy_floor)
        start = time.perf_counter()
        # 1. Collect: N envs x T steps with the current policy, pi_old.
        rollout = collector.collect(net, config.gamma)
        collected = time.perf_counter()
        # 2. Advantages: GAE along time, per env.
        advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                                          config.gamma, config.gae_lambda)
        # 3. Update: K epochs of minibatch steps on the clipped surrogate, the value loss and the entropy bonus.
        stats = ppo_update(net, optimizer, rollout, advantages, returns, update_epochs=config.update_epochs,
                           minibatch_size=config.minibatch_size, clip_eps=config.clip_eps,
                           value_clip_eps=config.value_clip_eps, value_coef=config.value_coef,
                           entropy_coef=entropy_coef, max_grad_norm=config.max_grad_norm, target_kl=config.target_kl,
                           normalize_advantages=config.normalize_advantages)
        yield rollout, dict(stats, lr=lr, entropy_coef=entropy_coef, collect_seconds=collected - start,
                            update_seconds=time.perf_counter() - collected)


# ##################################################################################################
#   PPO ends above. What follows is the machinery of a run: the environments (gymnasium's or CartPole
#   in torch), the command line, files and checkpoints, tracking (returns, best.pt, the run log),
#   greedy play, the plot, an Adam without torch.optim's start-up, the run itself (train) and main.
# ##################################################################################################


# ==== Environments: gymnasium's vector envs, or CartPole in torch ================================
class RunStopped(Exception):
    """A run that cannot go on through no fault of PPO's code: main prints one line and exits 1."""


def make_envs(env_id: str, num_envs: int, device: torch.device, backend: str = "gymnasium",
              vectorization_mode: str = "auto", **env_kwargs):
    """N envs with Collector's contract: torch in and out, `reset(seed) -> (obs [N, D], info)`, `step(actions
    [N]) -> (obs, rewards, terminated, truncated [N], info)`, next-step autoreset (the step after an episode
    ends only resets that env: reward 0, both flags False). "gymnasium": gymnasium.make_vec in
    `vectorization_mode` ("auto": the env's own vector env if it has one); "torch": TorchCartPole."""
    if backend == "torch":
        return TorchCartPole(num_envs, device, **env_kwargs)
    mode = None if vectorization_mode == "auto" else vectorization_mode  # None: gymnasium picks as "auto"
    return NumpyToTorch(gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, **env_kwargs), device)


class NonFiniteEnv(RunStopped):
    """An env returned a NaN or infinite observation or reward: the env's bug, not PPO diverging."""


class NumpyToTorch(gym.vector.VectorWrapper):
    """A gymnasium vector env with torch tensors in and out, the one place where numpy meets torch
    (gymnasium.wrappers.vector.NumpyToTorch needs the array-api-compat package). A non-finite
    observation or reward raises NonFiniteEnv here, before it can look like PPO diverging. Copy with
    NonFiniteEnv; imports: gymnasium as gym, numpy as np, torch."""

    def __init__(self, envs: gym.vector.VectorEnv, device: torch.device):
        super().__init__(envs)
        self.device = device

    def _tensor(self, array, what: str | None = None) -> torch.Tensor:
        """An observation or reward (`what`) as float32, checked finite; a flag as it is."""
        if what is not None and not np.isfinite(array).all():
            rows = np.reshape(array, (len(array), -1))  # [N, ...] -> [N, -1]
            bad = np.nonzero(~np.isfinite(rows).all(axis=1))[0]
            raise NonFiniteEnv(f"{self.spec.id if self.spec else 'the env'}: {len(bad)} of {len(rows)} envs returned "
                               f"a non-finite {what} (env {bad[0]}: {rows[bad[0]].tolist()})")
        return torch.as_tensor(array, dtype=None if what is None else torch.float32, device=self.device)

    def reset(self, seed: int | None = None):
        obs, info = self.env.reset(seed=seed)
        return self._tensor(obs, "observation"), info

    def step(self, actions: torch.Tensor):
        obs, rewards, terminated, truncated, info = self.env.step(actions.cpu().numpy())
        return (self._tensor(obs, "observation"), self._tensor(rewards, "reward"), self._tensor(terminated),
                self._tensor(truncated), info)


class TorchCartPole:
    """CartPole-v1 for N envs at once in torch, on any device: gymnasium 1.x's CartPoleVectorEnv.step
    (explicit Euler, strict thresholds, a time limit of 500 that can coincide with termination, next-step
    autoreset); `dtype` float64 matches gymnasium to 1e-12. `state` [N, 4] = (x, x_dot, theta, theta_dot).
    No host reads: each step draws [N, 4] initial states from `generator` and resets by torch.where; the
    carried state (`state`, `steps`, `prev_done`) is updated in place; observations are float32 copies."""

    metadata = {"autoreset_mode": "NextStep"}  # as gymnasium >= 1.1 declares it

    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass, polemass_length = masspole + masscart, masspole * length
    x_threshold, theta_threshold = 2.4, 12 * 2 * math.pi / 360

    def __init__(self, num_envs: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_episode_steps: int = 500):
        self.num_envs, self.device, self.dtype = num_envs, torch.device(device), dtype
        self.max_episode_steps = max_episode_steps
        high = np.array([2 * self.x_threshold, np.inf, 2 * self.theta_threshold, np.inf], dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.forces = torch.tensor([-self.force_mag, self.force_mag], dtype=dtype, device=self.device)  # by action
        self.thresholds = torch.tensor([self.x_threshold, self.theta_threshold], dtype=dtype, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.state = self.draw_initial_states(torch.zeros((num_envs, 4), dtype=dtype, device=self.device))
        self.steps = torch.zeros(num_envs, dtype=torch.int32, device=self.device)
        self.prev_done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    def draw_initial_states(self, out: torch.Tensor) -> torch.Tensor:
        """Fills out [N, 4] with initial states, uniform in [-0.05, 0.05), from self.generator."""
        return out.uniform_(-0.05, 0.05, generator=self.generator)

    def reset(self, seed: int | None = None):
        if seed is not None:  # seeded only here, as gymnasium
            self.generator.manual_seed(seed)
        self.draw_initial_states(self.state)
        self.steps.zero_()
        self.prev_done.zero_()
        return self.state.to(torch.float32, copy=True), {}

    def step(self, actions: torch.Tensor):
        """actions [N] in {0, 1} -> (obs [N, 4], reward [N], terminated [N], truncated [N], {})."""
        initial_states = self.draw_initial_states(torch.empty_like(self.state))  # for the envs that reset now
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = self.forces[actions]  # action 1 pushes right
        costheta, sintheta = torch.cos(theta), torch.sin(theta)
        temp = (force + self.polemass_length * theta_dot.square() * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta.square() / self.total_mass))
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        state = self.state + self.tau * torch.stack([x_dot, xacc, theta_dot, thetaacc], dim=1)  # explicit Euler
        terminated = (state[:, 0::2].abs() > self.thresholds).any(dim=1)  # |x| > 2.4 or |theta| > 12 degrees

        reset = self.prev_done.clone()  # these envs' episodes ended last step: this step only resets them
        self.state.copy_(torch.where(reset.unsqueeze(1), initial_states, state))
        self.steps.copy_(torch.where(reset, 0, self.steps + 1))
        truncated = self.steps >= self.max_episode_steps  # never on a reset step: its count is 0
        terminated = terminated & ~reset
        self.prev_done.copy_(terminated | truncated)
        return self.state.to(torch.float32, copy=True), (~reset).float(), terminated, truncated, {}

    def close(self) -> None:
        pass


# ==== The command line: flags, resolve, validation ================================================
@dataclass(frozen=True)
class RunConfig:
    """The run's settings, around PPO's (Config): the envs' backend, tracking and best.pt, the device,
    files and greedy play. Each a flag of the same name, as Config's; parse_args builds both."""

    env_backend: str = option("auto", "torch: CartPole-v1 in torch on --device; auto: torch on CUDA, else gymnasium",
                              choices=("auto", "gymnasium", "torch"))
    vectorization_mode: str = option("auto", "the env's native vector env (vector_entry_point) or SyncVectorEnv; "
                                     "auto: the first if there is one", choices=("auto", "sync", "vector_entry_point"))
    ema_alpha: float = option(0.1, "weight of the newest episode in the EMA of returns", allowed="(0, 1]")
    target_return: float | None = option(None, "'solved' bar for the mean of the last 100 returns "
                                         "(default: the env's reward_threshold, 475 for CartPole-v1)")
    stop_when_solved: bool = option(False, "end training once solved and best.pt plays the target greedily")
    confirm_episodes: int = option(50, "greedy episodes that confirm a best.pt candidate (0 = the EMA alone)",
                                   allowed="[0, 10000]")
    device: str = option("auto", "auto = cuda if available, else cpu", choices=("auto", "cpu", "cuda"))
    threads: int = option(1, "torch CPU threads, at most this machine's cores")
    out_dir: str | None = option(None, "run folder (default: a fresh runs/<env>__seed<seed>__<time>)")
    plot: bool = option(True, "write training.png")
    gif: bool = option(True, "write agent.gif")
    eval: str | None = option(None, "play this checkpoint greedily, write its GIF, no training", metavar="CHECKPOINT")
    eval_episodes: int = option(10, "greedy episodes of the final evaluation", allowed="[1, 10000]")


def flag_name(field: str) -> str:
    """A config field's flag: num_envs -> --num-envs."""
    return "--" + field.replace("_", "-")


# Each backend's sizes: Config's are the gymnasium backend's; the command line gives the torch backend
# its own for the size flags left out. On a GPU, thousands of TorchCartPoles cost what eight do
# (docs/torch-backend.md).
SIZES = ("num_envs", "buffer_size", "minibatch_size")
BACKEND_SIZES = {"gymnasium": {name: getattr(Config, name) for name in SIZES},
                 "torch": {"num_envs": 1024, "buffer_size": 16384, "minibatch_size": 2048}}


# The blog post's hyper-parameters, as flags: `python ppo_cartpole.py $POST_SETTINGS` trains as it did,
# with its defects fixed.
POST_SETTINGS = ("--vectorization-mode sync --num-envs 8 --buffer-size 2048 --minibatch-size 64 --update-epochs 4 "
                 "--lr 1e-4 --no-anneal-lr --gamma 0.99 --gae-lambda 0.95 --normalize-advantages --entropy-coef 0.02 "
                 "--entropy-floor 0.001 --value-clip-eps 0.2 --max-grad-norm 0")
EVAL_SEED_OFFSET = 10_000  # final evaluation: seeds apart from training's
CONFIRM_SEED_OFFSET = 20_000  # greedy check of best.pt candidates: apart from both (seeds < 2**31)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class UsageError(Exception):
    """The user's mistake, for one flag: main prints it as one `error:` line and exits 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")


def require(ok: bool, flag: str, allowed: str) -> None:
    """Raise a UsageError saying what `flag` must be, unless ok."""
    if not ok:
        raise UsageError(flag, f"must be {allowed}")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def default_out_dir(env_id: str, seed: int) -> str:
    """A fresh folder per run: runs/<env>__seed<seed>__<date-time>."""
    return f"runs/{env_id}__seed{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """gym.spec of any id gym.make takes, "my_module:MyEnv-v0" too: gym.make imports my_module
    first (where MyEnv-v0 is registered), gym.spec doesn't."""
    module, _, name = env_id.rpartition(":")
    if module:
        importlib.import_module(module)
    return gym.spec(name)


def resolve(run: RunConfig, env_id: str) -> RunConfig:
    """The RunConfig a run of env_id uses (a resolved one comes back unchanged): the device; the backend
    (torch on CUDA for CartPole-v1 unless a vectorisation mode is asked for); the env's reward_threshold
    as target_return where None, when training."""
    device = resolve_device(run.device)
    backend = run.env_backend
    if backend == "auto":
        on_device = device.type == "cuda" and env_id == "CartPole-v1" and run.vectorization_mode == "auto"
        backend = "torch" if on_device else "gymnasium"
    resolved = dataclasses.replace(run, device=device.type, env_backend=backend)
    if run.eval is not None:  # --eval reads the env from the checkpoint and writes beside it
        return resolved
    target_return = run.target_return
    if target_return is None:
        target_return = env_spec(env_id).reward_threshold
    return dataclasses.replace(resolved, target_return=None if target_return is None else float(target_return))


def build_parser() -> argparse.ArgumentParser:
    """A flag per field of Config and RunConfig (`num_envs` -> `--num-envs`) with its help and default (a
    size's is None: parse_args fills it in by backend); a bool gets --flag / --no-flag."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options]  (all of them: --help)",  # one line above an error, not all the flags
        description="PPO for gymnasium's CartPole-v1, in one readable file.",
        epilog=f"The blog post's settings, one line to copy:\npython ppo_cartpole.py {POST_SETTINGS}",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog as written, not wrapped
    for config_class in (Config, RunConfig):
        types = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            flag = dict(field.metadata)
            names = [flag_name(field.name), *flag.pop("aliases", ())]
            kind = next(t for t in typing.get_args(types[field.name]) or [types[field.name]] if t is not type(None))
            default = field.default
            if field.name in SIZES:  # None: parse_args fills in the backend's
                default = None
                flag["help"] += " (default: {}; torch backend: {})".format(*(BACKEND_SIZES[b][field.name]
                                                                              for b in ("gymnasium", "torch")))
            elif default is not None:
                flag["help"] += f" (default: {field.default})"
            if "allowed" in flag:
                flag["help"] += f" (allowed: {flag.pop('allowed')})"
            if kind is bool:
                parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **flag)
            else:
                parser.add_argument(*names, type=kind, default=default, **flag)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, RunConfig]:
    """argv -> (Config, RunConfig), resolved and checked, the run folder (or runs/) proved writable;
    the size flags left out are the backend's (BACKEND_SIZES). argparse's own errors (an unknown flag,
    a value of the wrong type) exit 2 there; a value out of range raises UsageError."""
    args = vars(build_parser().parse_args(argv))
    run = RunConfig(**{field.name: args.pop(field.name) for field in dataclasses.fields(RunConfig)})
    require(run.device != "cuda" or torch.cuda.is_available(), "--device",
            "auto or cpu: CUDA is not available on this machine")
    if run.eval is None:  # before resolve, which reads the env's spec (--eval trains nothing)
        check_env(args["env_id"], run)
    run = resolve(run, args["env_id"])
    sizes = BACKEND_SIZES[run.env_backend]
    config = Config(**{name: sizes[name] if value is None and name in SIZES else value for name, value in args.items()})
    check_config(config, run)
    if run.eval is None or run.out_dir is not None:  # (--eval alone writes beside its checkpoint)
        probe = Path(run.out_dir or "runs") / f".write-test-{os.getpid()}"
        made = [folder for folder in probe.parents if not folder.exists()]  # deepest first
        try:  # the proof that the run folder can be made and written to: do it
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as exc:
            for folder in made:  # a refused run leaves nothing behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            require(False, "--out-dir", f"a folder that can be made and written to ({probe.parent}: "
                    f"{exc.strerror or exc})")
    return config, run


def check_env(env_id: str, run: RunConfig) -> None:
    """Make the env once to check what PPO here relies on."""
    try:
        spec = env_spec(env_id)
        env = gym.make(env_id)
    except Exception as exc:  # unknown id, missing dependency: the user's mistake, not a bug
        raise UsageError("--env-id", f"must be an env gymnasium can make: {env_id!r}: {exc}") from None
    action_space, observation_space = env.action_space, env.observation_space
    env.close()
    require(isinstance(action_space, gym.spaces.Discrete), "--env-id",
            f"an env with a Discrete action space ({env_id} has {action_space})")
    require(isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1,
            "--env-id", f"an env with a flat Box observation ({env_id} has {observation_space})")
    require(run.vectorization_mode != "vector_entry_point" or spec.vector_entry_point is not None,
            "--vectorization-mode", f"'sync' or 'auto' for {env_id}, which has no vector_entry_point")
    require(run.target_return is not None or spec.reward_threshold is not None, "--target-return",
            f"given for {env_id}, which has no reward_threshold")


def in_interval(value: float, interval: str) -> bool:
    """Whether value lies in an interval written as in maths: "(0, 1]" excludes 0, includes 1."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = low < value if interval[0] == "(" else low <= value
    return above and (value < high if interval[-1] == ")" else value <= high)


def check_config(c: Config, run: RunConfig) -> None:
    """Every value of a Config and a resolved RunConfig in its range (nan and inf never train; the sizes'
    upper bounds take about 3 GB), and a run folder without an earlier run."""
    for settings in (c, run):
        for field in dataclasses.fields(settings):
            value, allowed = getattr(settings, field.name), field.metadata.get("allowed")
            flag = "/".join([flag_name(field.name), *field.metadata.get("aliases", ())])
            if isinstance(value, float):  # what torch computes in: a finite float32
                require(math.isfinite(value) and abs(value) <= FLOAT32_MAX, flag, f"a finite number, got {value}")
            if allowed and value is not None:
                require(in_interval(value, allowed), flag, f"in {allowed}, got {value}")
    if run.env_backend == "torch":
        require(c.env_id == "CartPole-v1", "--env-backend",
                f"gymnasium or auto for {c.env_id}: the torch backend is CartPole-v1 only")
        require(run.vectorization_mode == "auto", "--vectorization-mode",
                "left out with --env-backend torch, which steps its own vectorised CartPole")
    # T >= 2: a rollout of T = 1 can be all autoreset steps, which leaves nothing to learn from
    require(c.buffer_size >= 2 * c.num_envs and c.buffer_size % c.num_envs == 0, "--buffer-size",
            f"a multiple of --num-envs ({c.num_envs}), 2 steps per env or more, got {c.buffer_size}")
    require(c.minibatch_size <= c.buffer_size, "--minibatch-size",
            f"at most --buffer-size ({c.buffer_size}), got {c.minibatch_size}")
    cores = os.cpu_count() or 1
    require(0 < run.threads <= cores, "--threads", f"in [1, {cores}] (this machine's cores), got {run.threads}")
    if run.eval is None and run.out_dir is not None:  # early, before training; claim_run_folder checks again
        require_no_earlier_run(Path(run.out_dir))


# ==== Files: atomic writes and checkpoints ========================================================
CLAIM_FILE = ".ppo_cartpole-run"  # in every run folder: the run that made it owns it


def require_no_earlier_run(path: Path) -> None:
    """Never overwrite a run: its best.pt may be all the user has of it."""
    taken = [name for name in (CLAIM_FILE, "best.pt", "final.pt", "summary.json", "metrics.csv") if (path / name).exists()]
    require(not taken, "--out-dir", f"a folder without an earlier run ({path} has {', '.join(taken)})")


def claim_run_folder(out_dir: str | None, env_id: str, seed: int) -> Path:
    """The run folder, claimed by one atomic create before anything is written there: a given folder by
    creating its CLAIM_FILE with O_EXCL (of two runs into it, one is refused: UsageError); by default a
    fresh `default_out_dir` by one exclusive mkdir, with -2, -3, ... when another run took the name."""
    if out_dir is None:
        base = default_out_dir(env_id, seed)
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for k in range(1, 1000):
            path = Path(base if k == 1 else f"{base}-{k}")
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                break
    else:
        path = Path(out_dir)
        require_no_earlier_run(path)  # a folder from before claim files, or a Python caller's
        path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise UsageError("--out-dir", f"must be a folder without an earlier run ({path} is another run's: "
                         f"it has {CLAIM_FILE})") from None
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file) on a temp file in path's folder, then os.replace it onto path: a crash or
    Ctrl-C mid-write never leaves a partial file at path, and the temp file is removed. A failed
    write (a full disk) raises WriteError, naming path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer per file: this process
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # (a read-only file system refuses even this): the write's error stands
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(path, exc) from exc
        raise


def append_whole(path: str | os.PathLike, text: str) -> None:
    """Append text to path whole or not at all: a write that fails (a full disk) is cut back off,
    so the file never ends in a partial row; it raises WriteError, naming path."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            size, data = os.fstat(fd).st_size, memoryview(text.encode())
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, size)  # truncating frees space: it works on a full disk
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(path, exc) from exc


def save_checkpoint(path: str | os.PathLike, net: ActorCritic, config: dict) -> None:
    """Write {state_dict, model sizes, config} atomically; config holds only str/int/float/bool/None
    (plain ints, not numpy's: torch.load(weights_only=True) reads them)."""
    checkpoint = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "config": config,
                  "model": {"obs_dim": int(net.obs_dim), "act_dim": int(net.act_dim), "hidden": int(net.hidden)}}
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_agent(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ActorCritic, dict]:
    """Checkpoint -> (net in eval mode, config dict). weights_only=True: loading runs no pickled code.
    A file that is missing, corrupt or not one of this script's raises UsageError (for --eval)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, a folder, corrupt, or pickled code that weights_only refuses
        reason = getattr(exc, "strerror", None)
        raise UsageError("--eval", f"{path}: {reason.lower() if reason else 'not a readable checkpoint'} "
                         f"({type(exc).__name__})") from None
    if not (isinstance(checkpoint, dict) and {"state_dict", "model", "config"} <= checkpoint.keys()):
        raise UsageError("--eval", f"{path}: not a checkpoint of ppo_cartpole.py (keys missing)")
    try:
        net = ActorCritic(**checkpoint["model"])
        net.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as exc:
        raise UsageError("--eval", f"{path}: weights do not fit the model: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval(), checkpoint["config"]


# ==== Tracking: returns, best.pt, the run log ====================================================
class ReturnTracker:
    """Streams true episode returns: their EMA, the last-`window` mean, the success rate, and "solved": the
    first episode at which the last-`window` mean reaches the target. An iteration that ends `window` or
    more episodes is judged by their mean (docs/torch-backend.md says why)."""

    def __init__(self, ema_alpha: float, target_return: float, window: int = 100):
        self.ema_alpha, self.target_return, self.window = ema_alpha, target_return, window
        self.ema: float | None = None  # starts at the first return, not at 0 as the post's did
        self.recent: deque[float] = deque(maxlen=window)
        self.solved_at_step: int | None = None

    def add(self, episode_return: float, env_step: int, check_solved: bool = True) -> None:
        """One episode, in the order they end (ties by env index)."""
        r = float(episode_return)
        self.ema = r if self.ema is None else self.ema_alpha * r + (1 - self.ema_alpha) * self.ema
        self.recent.append(r)
        if check_solved and self.solved_at_step is None and len(self.recent) == self.window \
                and self.mean_recent >= self.target_return:
            self.solved_at_step = env_step

    def add_iteration(self, returns: np.ndarray, end_steps: np.ndarray) -> list[tuple[float, float, float]]:
        """The episodes that ended in one iteration, by end step (ties by env index): [E] each.
        Returns (EMA, mean of recent, success rate) after each."""
        many = len(returns) >= self.window
        after_each = []
        for episode_return, env_step in zip(returns, end_steps):
            self.add(episode_return, int(env_step), check_solved=not many)
            after_each.append((self.ema, self.mean_recent, self.success_rate))
        if many and self.solved_at_step is None and float(np.mean(returns)) >= self.target_return:
            self.solved_at_step = int(end_steps[-1])
        return after_each

    @property
    def mean_recent(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    @property
    def success_rate(self) -> float:
        """Share of the recent episodes at or above the target."""
        return sum(r >= self.target_return for r in self.recent) / len(self.recent) if self.recent else float("nan")


class BestPolicy:
    """Keeps best.pt, the policy to deploy: a new EMA best above the saved policy's score (or any policy,
    `always`) is saved if its score, the mean of `confirm_episodes` greedy episodes on `seed`, is at least
    the saved one's (the EMA mixes several policies; the post saved its peak unchecked). confirm_episodes
    0 is the post's rule: the score is the EMA itself."""

    def __init__(self, path, env_id: str, confirm_episodes: int, seed: int, config: dict):
        self.path, self.env_id, self.confirm_episodes, self.seed, self.config = \
            Path(path), env_id, confirm_episodes, seed, config
        self.best_ema = self.confirmed = -math.inf  # confirmed: the saved policy's score
        self.seconds = 0.0  # spent in greedy checks

    def consider(self, net: ActorCritic, ema: float | None, always: bool = False) -> bool:
        """ema: the EMA of returns now (None before any episode). Returns whether best.pt was written."""
        new_best_ema = ema is not None and ema > self.best_ema
        self.best_ema = ema if new_best_ema else self.best_ema
        if not (always or (new_best_ema and ema > self.confirmed)):
            return False
        if self.confirm_episodes:
            t0 = time.perf_counter()
            score = float(evaluate(net, self.env_id, self.confirm_episodes, self.seed).mean())
            self.seconds += time.perf_counter() - t0
        else:
            score = ema if new_best_ema else -math.inf
        if score < self.confirmed:
            return False
        self.confirmed = score
        save_checkpoint(self.path, net, self.config)
        return True


METRIC_FIELDS = ["iteration", "env_steps", "seconds", "steps_per_second", "lr", "entropy_coef",
                 "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                 "explained_variance", "epochs", "minibatches", "episodes", "last_return",
                 "ema_return", "mean100_return", "success_rate", "best_confirmed_return", "best_saved"]
EPISODE_FIELDS = ["env_step", "seconds", "return", "length", "ema_return", "mean100_return", "success_rate"]


def finished_episodes(rollout: Rollout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The episodes that ended in a rollout: (returns [E], lengths [E], end steps [E]) on the host,
    in one device-to-host copy. Ordered by end step, ties by env index (row-major [T, N]). End
    steps count env steps into the rollout: N per time step."""
    dones, returns, lengths = torch.stack([rollout.dones, rollout.ended_returns, rollout.ended_lengths]).cpu().numpy()
    ended = dones > 0  # [T, N]
    time_index = np.nonzero(ended)[0]
    return returns[ended], lengths[ended].astype(np.int64), (time_index + 1) * dones.shape[1]


class RunLog:
    """episodes.csv and metrics.csv, a row per episode and per iteration, appended as they come (each
    file whole after every iteration); the returns in them (a ReturnTracker); the progress bar's
    numbers and the time spent collecting and updating. run: a resolved RunConfig; `self.run` names
    the run folder."""

    def __init__(self, config: Config, run: RunConfig):
        self.out_dir, self.start = claim_run_folder(run.out_dir, config.env_id, config.seed), time.perf_counter()
        self.config, self.run = config, dataclasses.replace(run, out_dir=str(self.out_dir))
        self.tracker = ReturnTracker(run.ema_alpha, run.target_return)
        self.seconds = {"collect": 0.0, "update": 0.0}
        self.fields = {"episodes": EPISODE_FIELDS, "metrics": METRIC_FIELDS}
        self.rows: dict[str, list[dict]] = {name: [] for name in self.fields}  # as in episodes.csv and metrics.csv
        for name, fields in self.fields.items():  # the header: written as the rows are, by csv.DictWriter
            header = io.StringIO()
            csv.DictWriter(header, fields).writeheader()
            atomic_write(self.out_dir / f"{name}.csv", lambda f: f.write(header.getvalue().encode()))
        self.env_steps, self.progress = 0, {}
        self.solved_at_seconds = self.solved_at_iteration = None
        settings = "torch backend" if run.env_backend == "torch" else f"{run.vectorization_mode} vector env"
        print(f"ppo_cartpole: {config.env_id} x{config.num_envs} on {run.device}, {settings}, "
              f"{config.num_iterations} iterations of {config.buffer_size} steps"
              f"{' at most: stops once solved' if run.stop_when_solved else ''} -> {self.out_dir}", flush=True)

    def write(self, name: str, rows: list[dict]) -> None:
        """Appends the rows to name.csv, whole or not at all, and keeps them."""
        text = io.StringIO()
        csv.DictWriter(text, self.fields[name]).writerows(rows)
        append_whole(self.out_dir / f"{name}.csv", text.getvalue())
        self.rows[name] += rows

    def episodes(self, iteration: int, rollout: Rollout) -> int:
        """The episodes that ended in the rollout, into the tracker and episodes.csv; returns how many."""
        now = time.perf_counter() - self.start
        returns, lengths, end_steps = finished_episodes(rollout)
        end_steps += self.env_steps
        after_each = self.tracker.add_iteration(returns, end_steps)  # (EMA, last-100 mean, success rate) after each
        self.write("episodes", [dict(zip(EPISODE_FIELDS, (end, round(now, 3), episode_return, length, *after)))
                                for episode_return, length, end, after
                                in zip(returns.tolist(), lengths.tolist(), end_steps.tolist(), after_each)])
        self.env_steps += self.config.buffer_size
        if self.tracker.solved_at_step is not None and self.solved_at_seconds is None:
            self.solved_at_seconds, self.solved_at_iteration = now, iteration
        return len(returns)

    def metrics(self, iteration: int, stats: dict, **columns) -> None:
        """The iteration's row of metrics.csv: ppo_iterations' stats, the returns, and `columns`."""
        for part in self.seconds:
            self.seconds[part] += stats.get(f"{part}_seconds", 0.0)
        tracker, episodes, now = self.tracker, self.rows["episodes"], time.perf_counter() - self.start
        row = dict(iteration=iteration, env_steps=self.env_steps, seconds=round(now, 3),
                   steps_per_second=round(self.env_steps / now), **{k: stats[k] for k in METRIC_FIELDS if k in stats},
                   last_return=episodes[-1]["return"] if episodes else None, ema_return=tracker.ema,
                   mean100_return=tracker.mean_recent, success_rate=tracker.success_rate, **columns)
        self.write("metrics", [row])
        last = row["last_return"]  # all text: tqdm writes a number as 2e+6 or 2029568, whichever is shorter
        self.progress = dict(steps=str(self.env_steps), ret="" if last is None else f"{last:g}",
                             ema=f"{tracker.ema or 0:.0f}", mean100=f"{tracker.mean_recent:.0f}",
                             sps=str(row["steps_per_second"]))


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
            "numpy": np.__version__}


# ==== Greedy play: evaluation and the GIF =========================================================
def greedy_actions(net: ActorCritic, obs) -> torch.Tensor:
    """obs [..., D], numpy or torch -> the most likely actions [...] on net's device: the policy as deployed."""
    with torch.inference_mode():
        logits, _ = net(torch.as_tensor(obs, dtype=torch.float32, device=next(net.parameters()).device))
    return logits.argmax(-1)


def evaluate(net: ActorCritic, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Greedy returns [episodes] of `episodes` episodes, one per env of a vector env, run at once;
    pass seeds apart from training's. Next-step autoreset starts a second episode in an env that
    finished early: `finished` masks it out."""
    envs = gym.make_vec(env_id, num_envs=episodes)  # the env's native vector env when it has one
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    finished = np.zeros(episodes, dtype=bool)
    try:
        while not finished.all():
            obs, reward, terminated, truncated, _ = envs.step(greedy_actions(net, obs).cpu().numpy())
            returns += np.where(finished, 0.0, reward)
            finished |= terminated | truncated
    finally:
        envs.close()
    return returns


def render_gif(net: ActorCritic, env_id: str, path, seed: int, frame_skip: int = 2,
               scale: float = 0.5, max_steps: int = 500) -> int:
    """One greedy episode rendered to an animated GIF with Pillow; returns the episode's return.
    Every `frame_skip`-th frame, downscaled by `scale`, keeps the file small and quick to write."""
    from PIL import Image

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders offscreen, no display needed
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames, total = [], 0.0
    try:
        for step in range(max_steps):
            if step % frame_skip == 0:
                frames.append(env.render())
            obs, reward, terminated, truncated, _ = env.step(int(greedy_actions(net, obs)))
            total += float(reward)
            if terminated or truncated:
                break
        frames.append(env.render())
    finally:
        env.close()
    height, width = frames[0].shape[:2]
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    images = [Image.fromarray(frame).resize(size, Image.BILINEAR) for frame in frames]
    frame_ms = round(1000 * frame_skip / env.metadata.get("render_fps", 50))
    atomic_write(path, lambda f: images[0].save(f, format="GIF", save_all=True,
                                                append_images=images[1:], duration=frame_ms, loop=0))
    return int(total)


# ==== Plot ========================================================================================
PLOT_MAX_POINTS = 20_000  # episodes drawn as dots; beyond this, every k-th (a torch run ends ~10^5)
EV_FLOOR = -1.0  # explained variance below this is drawn at it: one bad critic update can read -18
LEARNING_PHASE = 3  # the left returns panel shows the run up to this many times the solve step
# The diagnostic panels: metrics.csv column, title, colour, log scale.
PANELS = [("policy_loss", "policy loss (-L^CLIP, minimised)", "tab:blue", False),
          ("value_loss", "value loss (log)", "tab:red", True),
          ("entropy", "entropy of the policy", "tab:purple", False),
          ("approx_kl", "approx KL(pi_old || pi) (log)", "tab:orange", True),
          ("clip_fraction", "clip fraction", "tab:green", False),
          ("explained_variance", "explained variance of V_old", "tab:gray", False),
          ("best_confirmed_return", "best.pt's score: greedy return (its EMA if --confirm-episodes 0)", "black", False),
          ("lr", "learning rate", "tab:brown", False)]


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last `window` values at each index (fewer at the start), NaNs skipped;
    window: an int, or one per index."""
    finite = np.isfinite(x)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, x, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[end] - sums[start]) / (counts[end] - counts[start])


def plot_training(episodes: list[dict], metrics: list[dict], target_return: float, path: Path | None = None,
                  solved_at_step: int | None = None, kl_target: float | None = None):
    """The dashboard of a run from the rows of episodes.csv and metrics.csv (numbers or their text), as a
    PNG at `path` unless None; returns the matplotlib Figure (no pyplot, no display). On top the returns:
    up to LEARNING_PHASE times the solve step on the left, the whole run on the right (one wide panel if it
    ended sooner); below, a panel per PANELS entry against env steps, with trend lines, on a log axis
    past the learning phase (shaded); kl_target on the KL, the entropy coefficient beside the lr if > 0."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    col = lambda rows, key: np.array([np.nan if row[key] in (None, "") else float(row[key]) for row in rows])  # noqa: E731
    fig = Figure(figsize=(12, 14), layout="constrained")
    grid = fig.add_gridspec(5, 2, height_ratios=(2.2, 1, 1, 1, 1))
    last_step = float(metrics[-1]["env_steps"]) if metrics else 0.0
    learning_end = min(LEARNING_PHASE * solved_at_step, last_step) if solved_at_step else last_step
    ends = (learning_end, last_step) if learning_end < last_step else (last_step,)  # or one wide panel
    tops = [fig.add_subplot(grid[0, column]) for column in (0, 1)] if len(ends) == 2 else [fig.add_subplot(grid[0, :])]
    ax_whole = tops[-1]
    diagnostics = [fig.add_subplot(grid[row, column]) for row in range(1, 5) for column in range(2)]
    for ax in diagnostics[1:]:
        ax.sharex(diagnostics[0])
    axes = tops + diagnostics
    stride = max(1, math.ceil(len(episodes) / PLOT_MAX_POINTS))
    saves = [float(row["env_steps"]) for row in metrics if float(row.get("best_saved") or 0)]
    for ax, end in zip(tops, ends):
        shown = [row for row in episodes[::stride] if float(row["env_step"]) <= end]
        steps = col(shown, "env_step")
        ax.plot(steps, col(shown, "return"), ".", ms=2, alpha=0.3, color="tab:blue",
                label="episode return" + (f" (every {stride}th)" if stride > 1 else ""))
        ax.plot(steps, col(shown, "ema_return"), color="tab:orange", label="EMA")
        ax.plot(steps, col(shown, "mean100_return"), color="tab:red", label="mean of last 100")
        ax.axhline(target_return, color="black", ls="--", lw=1, label=f"target {target_return:g}")
        shown_saves = [step for step in saves if step <= end]
        ax.plot(shown_saves, np.full(len(shown_saves), 0.985), "v", color="black", ms=6,
                transform=ax.get_xaxis_transform(), label=f"best.pt saved ({len(shown_saves)}x)")
        if solved_at_step is not None:
            ax.axvline(solved_at_step, color="black", lw=0.8, alpha=0.5, label="solved")
        ax.set(xlim=(0, 1.02 * end or None), ylabel="return")  # (the margin shows a solve at the very end)
        ax.legend(loc="center right", fontsize=8)
        ax_success = ax.twinx()
        ax_success.plot(steps, col(shown, "success_rate"), color="tab:green", alpha=0.6, lw=1,
                        label=f"success rate (share of last 100 >= {target_return:g})")
        ax_success.set(ylim=(0, 1.05), ylabel="success rate")
        ax_success.legend(loc="lower right", fontsize=8)
    solved = f"solved at {solved_at_step:,} env steps" if solved_at_step else "not solved"
    if len(tops) == 2:
        tops[0].set_title(f"PPO learning: the first {learning_end:,.0f} env steps", loc="left", fontsize=10)
    ax_whole.set_title(f"the whole run: {last_step:,.0f} env steps ({solved})", loc="left", fontsize=10)

    # Past the learning phase, log steps: the learning, a few % of a long run, gets most of each panel's
    # width, and the trend's window grows with the run (the last 10% of its iterations), even on that axis.
    log_steps = len(tops) == 2
    window = max(1, len(metrics) // 100)  # a long run's per-iteration noise, with its trend drawn over it
    windows = np.maximum(1, np.arange(1, len(metrics) + 1) // 10) if log_steps else window
    steps, entropy_coef = col(metrics, "env_steps"), col(metrics, "entropy_coef")
    for ax, (key, title, color, log) in zip(axes[len(tops):], PANELS):
        values = col(metrics, key)
        if key == "explained_variance":
            below = values < EV_FLOOR
            if below.any():
                ax.text(0.3, 0.1, f"clipped: {below.sum()} iteration(s) below {EV_FLOOR:g} (lowest "
                        f"{np.nanmin(values):.3g})", transform=ax.transAxes, fontsize=8,
                        bbox=dict(facecolor="white", lw=0))
            values = np.maximum(values, EV_FLOOR)
            ax.set_ylim(EV_FLOOR - 0.05, 1.05)
        values[~np.isfinite(values)] = np.nan  # best.pt's score is -inf until a policy is saved
        noisy = window > 1 and key not in ("lr", "best_confirmed_return")
        ax.plot(steps, values, color=color, lw=0.8, alpha=0.35 if noisy else 1.0)
        if noisy:
            ax.plot(steps, rolling_mean(values, windows), color=color, lw=1.6,
                    label="mean of the last 10% of iterations" if log_steps else f"mean of {window} iterations")
        if key == "approx_kl" and kl_target is not None:
            ax.axhline(kl_target, color="black", ls="--", lw=1, label=f"target {kl_target:g}")
        if key == "lr":  # from 0, as the linear schedule it is: a short run's lr barely moves
            ax.set_ylim(0, 1.05 * np.nanmax(values, initial=0) or None)
            if np.nanmax(entropy_coef, initial=0) > 0:
                ax.twinx().plot(steps, entropy_coef, color="tab:olive")
                title += ", entropy coefficient (olive, right)"
        if solved_at_step is not None:
            ax.axvline(solved_at_step, color="black", lw=0.8, alpha=0.5)
        if log_steps:  # the top-left panel's span, shaded
            ax.axvspan(steps[0], learning_end, color="tab:blue", alpha=0.06, lw=0)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_yscale("log" if log and np.nanmax(values, initial=0) > 0 else "linear")  # (log of no positive: a warning)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    if log_steps:
        diagnostics[0].set_xscale("log")
        diagnostics[0].set_xlim(steps[0], 1.05 * last_step)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())  # 1.5M, not 1500000
    for ax in axes[-2:]:
        ax.set_xlabel("env steps")
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    return fig


# ==== Adam, without torch.optim's start-up cost ===================================================
class Adam:
    """torch.optim.Adam at its defaults (Kingma & Ba 2015, Algorithm 1), the same update to float rounding
    (a test), for `train`: the first use of torch.optim imports torch._dynamo, about 1.5 s of a 6 s CPU run
    to solve (docs/speed.md). lr: param_groups[0]["lr"], read at each step. Every parameter needs a grad."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.param_groups = [{"lr": lr}]
        self.betas, self.eps, self.steps = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]  # first moment: the mean of the gradient
        self.v = [torch.zeros_like(p) for p in self.params]  # second: of its square

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        (beta1, beta2), lr = self.betas, self.param_groups[0]["lr"]
        self.steps += 1
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g, every tensor in one call
        torch._foreach_mul_(self.v, beta2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - beta2)
        denominator = torch._foreach_sqrt(self.v)  # sqrt(v / (1 - beta2^t)) + eps, as torch.optim
        torch._foreach_div_(denominator, math.sqrt(1 - beta2 ** self.steps))
        torch._foreach_add_(denominator, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denominator, -lr / (1 - beta1 ** self.steps))


# ==== The run: train, the end of a run ===========================================================
EXIT_STATUS = {"done": 0, "stopped early": 1, "user error": 2}  # a signal's: 128 + its number (Ending)

# What a run's memory grows with: the rollout, the minibatch, the greedy episodes run at once.
SIZE_FLAGS = ("num_envs", "buffer_size", "minibatch_size", "confirm_episodes", "eval_episodes")


class OutOfMemory(RunStopped):
    """Memory ran out: torch's allocator (CPU or CUDA), numpy's or Python's MemoryError."""


def out_of_memory(exc: Exception, config: Config, run: RunConfig) -> OutOfMemory | None:
    """exc as one line, if it is memory running out: how much was asked, where its message says, and
    the flags that size the run, with their values. None for any other error."""
    import re

    text = str(exc)
    if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or isinstance(exc, RuntimeError) and "can't allocate memory" in text):
        return None
    asked, amount = "", re.search(r"allocate ([\d.]+) ?(bytes|[KMGT]i?B)", text)
    if amount:  # torch's CPU allocator counts bytes; CUDA's and numpy's say "2.00 GiB"
        number, unit = amount.groups()
        if unit == "bytes":
            mib = int(number) / 2**20
            number, unit = (f"{mib / 1024:.2f}", "GiB") if mib >= 1024 else (f"{mib:.1f}", "MiB")
        asked = f" (asked for {number} {unit})"
    settings = dataclasses.asdict(config) | dataclasses.asdict(run)
    sizes = ", ".join(f"{flag_name(name)} {settings[name]}" for name in SIZE_FLAGS)
    return OutOfMemory(f"memory ran out{asked}; lower what sizes the run: {sizes}")


def describe(exc: Exception) -> str:
    """A run's own stop in its words (RunStopped); anything else with its type."""
    return str(exc) if isinstance(exc, RunStopped) else f"{type(exc).__name__}: {exc}"


@dataclass
class Ending:
    """Why a run ended: the one record that finish_run, summary.json and main's exit status read."""

    signal: str | None = None  # the signal that stopped the loop: SIGINT (Ctrl-C) or one of ENDING_SIGNALS
    divergence: str | None = None  # "iteration 12: the loss went NaN or infinite"
    error: Exception | None = None  # what ended the loop: the env's, a full disk's, memory's, or a bug's
    cleanup_failures: list[Exception] = dataclasses.field(default_factory=list)  # finish_run's steps that failed

    @property
    def cut_short(self) -> bool:
        """Stopped by a signal or an error: the clean-up plays no greedy episodes (long, or the broken env again)."""
        return self.signal is not None or self.error is not None

    @property
    def first_failure(self) -> Exception | None:
        return self.error or next(iter(self.cleanup_failures), None)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (130 Ctrl-C, 143 SIGTERM); 1 if it diverged or anything failed; else 0."""
        if self.signal is not None:
            return 128 + signal.Signals[self.signal]
        return EXIT_STATUS["stopped early"] if self.divergence or self.first_failure else EXIT_STATUS["done"]


# Why a run did not learn: DIAGNOSES, each rule a figure of metrics.csv over the run's later half
# against a threshold, calibrated on CartPole-v1 and Acrobot-v1 by bench/failures.py's gallery
# (docs/failures.md: each failing mode gets its own rule's message; healthy runs cut short get none).
DIAGNOSIS_WINDOW = 50  # a rule reads the later half of the run, at most its last this many iterations


def later_half(rows: list[dict]) -> list[dict]:
    """The rows a rule judges: the run's later half, at most its last DIAGNOSIS_WINDOW. Every run
    starts with a random policy and critic, so its first iterations say nothing of a cause."""
    return rows[len(rows) // 2:][-DIAGNOSIS_WINDOW:]


def mean_of(rows: list[dict], key: str) -> float:
    """The mean of a metrics.csv column over rows (numbers or their text), NaNs left out (an explained
    variance of a constant target); NaN if nothing is left."""
    values = [float(row[key]) for row in rows if not math.isnan(float(row[key]))]
    return sum(values) / len(values) if values else math.nan


def policy_collapsed(rows: list[dict]) -> str | None:
    """The lr far too high: an update moves the network so far that the policy plays one action, or
    that its hidden ReLUs (nearly) all stay off, so the critic predicts about one value for every state
    (explained variance within 0.05 of 0 throughout). Either way it has nothing left to learn from."""
    late, peak = later_half(rows), max(rows, key=lambda row: float(row["approx_kl"]))
    peak_kl, entropy = float(peak["approx_kl"]), mean_of(late, "entropy")
    if peak_kl <= 1:
        return None
    since = f"approx KL reached {peak_kl:.3g} at iteration {peak['iteration']} (healthy runs: below 0.3) and "
    if entropy < 0.1:
        return (f"{since}the entropy averaged {entropy:.1g} over the last {len(late)} iterations (healthy runs: "
                f"0.35 or more until they solve): an update moved the policy so far that it plays one action; "
                f"try a lower --lr")
    if all(abs(float(row["explained_variance"])) < 0.05 for row in late):
        return (f"{since}explained variance stayed within 0.05 of 0 in each of the last {len(late)} iterations "
                f"(healthy runs: beyond it in some): an update moved the network so far that its hidden units are "
                f"(nearly) all off, so the critic predicts about one value for every state and the policy barely "
                f"sees the state; try a lower --lr")


def policy_frozen(rows: list[dict]) -> str | None:
    """The lr far too low: every update leaves the policy where it was."""
    late = later_half(rows)
    kl = mean_of(late, "approx_kl")
    if kl < 1e-6:
        return (f"approx KL averaged {kl:.0e} over the last {len(late)} iterations (healthy "
                f"runs: 0.001 or more): each update barely moves the policy; try a higher --lr")


def entropy_bonus_dominates(rows: list[dict]) -> str | None:
    """An entropy bonus larger than the advantages: it holds the policy near uniform, so it never commits."""
    late = later_half(rows)
    entropy, start, kl = mean_of(late, "entropy"), float(rows[0]["entropy"]), mean_of(late, "approx_kl")
    coef = mean_of(late, "entropy_coef")
    if coef > 0 and entropy >= 0.95 * start and kl < 1e-3:
        return (f"entropy averaged {entropy:.3f} over the last {len(late)} iterations, {entropy / start:.0%} of its "
                f"start, and approx KL {kl:.0e} (healthy runs: 0.001 or more): the entropy bonus "
                f"({coef:g}) outweighs the advantages, so the policy never commits; try a "
                f"lower --entropy-coef and --entropy-floor")


def horizon_too_short(rows: list[dict]) -> str | None:
    """gamma far too low: the returns sum a few steps' rewards, alike in every state, so V has nothing to tell apart."""
    late = later_half(rows)
    value_loss = mean_of(late, "value_loss")
    if value_loss < 0.05:
        return (f"value loss averaged {value_loss:.1g} over the last {len(late)} iterations (healthy "
                f"runs: 0.5 or more until they solve): the returns sum too few rewards to tell a good state from a "
                f"bad one; try a --gamma closer to 1 (its horizon: 1 / (1 - gamma) steps)")


def critic_not_learning(rows: list[dict]) -> str | None:
    """No value loss (or one weighted to nothing): V predicts about one value everywhere, no better than a
    constant (explained variance below 0 on average) and, untrained, no worse by much either (within 0.5 of 0
    throughout): a critic that is trained but lags its targets overshoots them (Acrobot's first ~30 iterations)."""
    late = later_half(rows)
    explained = mean_of(late, "explained_variance")
    if explained < 0 and all(abs(float(row["explained_variance"])) < 0.5 for row in late):
        return (f"explained variance averaged {explained:.2f} and stayed within 0.5 of 0 in each of the last "
                f"{len(late)} iterations (healthy runs: it averages above 0, or strays past -0.7 while the critic "
                f"catches up): the critic predicts about one value for every state, so the advantages are noise; "
                f"check --value-coef (0 trains no critic)")


# In order: the first rule that holds is the diagnosis. A collapsed policy explains every flat figure
# after it, and a frozen one a critic that has learned nothing, so those come first.
DIAGNOSES = [policy_collapsed, policy_frozen, entropy_bonus_dominates, horizon_too_short, critic_not_learning]


def diagnose(rows: list[dict]) -> list[str]:
    """Why a run did not learn, from its metrics.csv rows (numbers or their text): the message of the
    first of DIAGNOSES that holds, or [] when none does or the run is shorter than 10 iterations (too
    soon to tell a cause from a slow start). For a run that did not solve and ended as configured."""
    if len(rows) < 10:
        return []
    for rule in DIAGNOSES:
        if message := rule(rows):
            return [message]
    return []


def finish_run(config: Config, run: RunConfig, log: RunLog, best: BestPolicy, net: ActorCritic,
               ending: Ending) -> dict:
    """The end of a run: final.pt, the final weights as a best.pt candidate, best.pt's greedy evaluation,
    summary.json, the plot, the GIF; returns the summary. A run cut short (a signal, an error) plays no
    greedy episode, to end within a signal's grace period (docker's 10 s); non-finite weights are neither
    final.pt nor a candidate. A failing step is skipped with one line (ending.cleanup_failures) and the
    rest go on; summary.json and the exit status say what failed. An unsolved run that ended as
    configured says why it did not learn (diagnose)."""
    out_dir, tracker = log.out_dir, log.tracker

    def error_line() -> str | None:  # at the iteration it stopped in, whole iterations logged before it
        first = ending.first_failure
        return None if first is None else f"iteration {len(log.rows['metrics'])}: {describe(first)}"

    def attempt(what: str, step):  # a step that fails, for any reason, is skipped with one line
        try:
            return step()
        except Exception as exc:
            exc = out_of_memory(exc, config, run) or exc
            print(f"skipped {what}: {describe(exc)}", file=sys.stderr)
            ending.cleanup_failures.append(exc)

    def settle():  # the error, the exit status and the diagnosis, as they stand
        # Only for an unsolved run that ended as configured: a signal, an error, a divergence or a failed
        # clean-up step says why itself.
        unsolved = tracker.solved_at_step is None and ending.exit_status == EXIT_STATUS["done"]
        summary.update(error=error_line(), exit_status=ending.exit_status,
                       diagnosis=diagnose(log.rows["metrics"]) if unsolved else [])

    def write_summary():
        settle()
        attempt("summary.json", lambda: atomic_write(out_dir / "summary.json",
                                                     lambda f: f.write(json.dumps(summary, indent=2).encode())))

    if ending.divergence is None:
        attempt("final.pt", lambda: save_checkpoint(out_dir / "final.pt", net, best.config))
        if not ending.cut_short:
            attempt("best.pt's last check", lambda: best.consider(net, tracker.ema, always=True))
    best_net = attempt("best.pt", lambda: load_agent(out_dir / "best.pt", run.device)[0]) \
        if (out_dir / "best.pt").exists() else None  # (none: diverged before any save)
    returns = attempt("the evaluation", lambda: evaluate(best_net, config.env_id, run.eval_episodes,
                                                         config.seed + EVAL_SEED_OFFSET)) \
        if best_net is not None and not ending.cut_short else None
    evaluated = returns is not None
    seconds, collect_seconds = time.perf_counter() - log.start, log.seconds["collect"]
    summary = dict(
        solved_at_step=tracker.solved_at_step, solved_at_seconds=log.solved_at_seconds,
        solved_at_iteration=log.solved_at_iteration, best_ema_return=best.best_ema if log.rows["episodes"] else None,
        best_confirmed_return=best.confirmed if math.isfinite(best.confirmed) else None,
        eval_return_mean=float(returns.mean()) if evaluated else None,
        eval_return_std=float(returns.std()) if evaluated else None, eval_episodes=len(returns) if evaluated else 0,
        env_steps=log.env_steps, iterations=len(log.rows["metrics"]), episodes=len(log.rows["episodes"]),
        seconds=seconds, steps_per_second=log.env_steps / seconds, collect_seconds=collect_seconds,
        update_seconds=log.seconds["update"],
        collect_steps_per_second=log.env_steps / collect_seconds if collect_seconds else None,
        confirm_seconds=best.seconds, signal=ending.signal, divergence=ending.divergence,
        out_dir=str(out_dir), device=run.device, torch_threads=torch.get_num_threads(), versions=versions(),
        config=best.config)
    write_summary()
    failures = len(ending.cleanup_failures)
    if run.plot:
        attempt("training.png", lambda: plot_training(log.rows["episodes"], log.rows["metrics"], run.target_return,
                                                      out_dir / "training.png", tracker.solved_at_step, config.target_kl))
    if run.gif and best_net is not None and not ending.cut_short:
        attempt("agent.gif", lambda: render_gif(best_net, config.env_id, out_dir / "agent.gif",
                                                seed=config.seed + EVAL_SEED_OFFSET))
    if len(ending.cleanup_failures) > failures and (out_dir / "summary.json").exists():
        write_summary()  # the plot or the GIF failed: summary.json says so too
    settle()
    solved = (f"solved at step {tracker.solved_at_step} ({log.solved_at_seconds:.1f} s)"
              if tracker.solved_at_step is not None else "diverged" if ending.divergence else "not solved")
    played = (f"best.pt greedy return {returns.mean():.1f} +- {returns.std():.1f} over {run.eval_episodes} "
              f"episodes" if evaluated else "best.pt not evaluated" if best_net is not None else "no best.pt")
    print(f"{solved}; {played}; {log.env_steps} steps in {seconds:.1f} s -> {out_dir}")
    for line in summary["diagnosis"]:
        print(f"why: {line}")
    return summary


def divergence_advice(rollout: Rollout, gamma: float, lr: float, max_grad_norm: float) -> str:
    """What to try after a divergence, never a setting already in force. Rewards so large that a return
    of them, squared in the value loss, overflows float32: no lr can help, they need scaling. Else a
    lower lr, and gradient clipping if it is off."""
    reward = float(rollout.rewards.abs().max())
    horizon = 1 / (1 - gamma) if gamma < 1 else len(rollout.rewards)
    if reward * horizon > math.sqrt(FLOAT32_MAX):
        return (f"The rewards reach {reward:.3g} a step, and returns of them overflow float32 once squared in the "
                f"value loss: scale them (gymnasium.wrappers.NormalizeReward, or TransformReward).")
    clipping = "" if max_grad_norm else " or gradient clipping (--max-grad-norm 0.5)"
    return f"Try a lower --lr (now {lr:g}){clipping}."


def nonfinite(stats: dict, net: nn.Module) -> list[str]:
    """Which of an update's loss, gradient norm and the parameters after it went NaN or infinite (a NaN
    in any minibatch leaves the update's means non-finite too)."""
    finite_parameters = bool(torch.stack([p.isfinite().all() for p in net.parameters()]).all())
    return [name for name, finite in (("loss", math.isfinite(stats["loss"])), ("gradient norm",
            math.isfinite(stats["grad_norm"])), ("parameters", finite_parameters)) if not finite]


def train(config: Config, run: RunConfig = RunConfig()) -> dict:
    """Train PPO (ppo_iterations), write the run folder, return the summary. Each iteration: the CSVs,
    best.pt's turn, the stop. The sizes are Config's as given; the torch backend wants BACKEND_SIZES["torch"]
    (parse_args fills them in). A signal, a non-finite update or any error ends the loop early; an error is
    raised again once the files are written, unless it is a RunStopped (one line)."""
    log = RunLog(config, resolve(run, config.env_id))  # first: it claims the run folder
    run = log.run
    device = torch.device(run.device)
    torch.set_num_threads(run.threads)
    torch.manual_seed(config.seed)  # the network's init, sampling and shuffling: one seed, as CleanRL
    envs = make_envs(config.env_id, config.num_envs, device, run.env_backend, run.vectorization_mode)
    net = ActorCritic(envs.single_observation_space.shape[0], envs.single_action_space.n).to(device)
    optimizer = Adam(net.parameters(), lr=config.lr)
    best = BestPolicy(log.out_dir / "best.pt", config.env_id, run.confirm_episodes,
                      config.seed + CONFIRM_SEED_OFFSET, dataclasses.asdict(config) | dataclasses.asdict(run))
    ending = Ending()
    bar = tqdm(total=config.num_iterations, desc="PPO", mininterval=0.5)
    try:
        for iteration, (rollout, stats) in enumerate(ppo_iterations(config, envs, net, optimizer)):
            # The episodes that ended: their returns, EMA, last-100 mean, and the solve.
            ended = log.episodes(iteration, rollout)
            solved = log.tracker.solved_at_step is not None
            # best.pt's turn: a new best of the EMA, confirmed greedily; once solved, every iteration
            # until a saved policy plays the target. Never a NaN policy: best.pt keeps the last finite one.
            saved, broken = False, nonfinite(stats, net)
            if broken:
                ending.divergence = f"iteration {iteration}: the {' and '.join(broken)} went NaN or infinite"
                advice = divergence_advice(rollout, config.gamma, stats["lr"], config.max_grad_norm)
                print(f"\ndiverged at {ending.divergence}; stopping. {advice}", file=sys.stderr)
            else:
                saved = best.consider(net, log.tracker.ema, always=solved and best.confirmed < run.target_return)
            log.metrics(iteration, stats, episodes=ended, best_confirmed_return=best.confirmed, best_saved=int(saved))
            bar.update()
            bar.set_postfix(log.progress, refresh=False)
            # Stop on divergence; or, if asked to, once solved and best.pt plays the target (or confirms nothing).
            played = best.confirmed >= run.target_return or not run.confirm_episodes
            if ending.divergence or (run.stop_when_solved and solved and played):
                break
    except KeyboardInterrupt as exc:
        ending.signal = getattr(exc, "signal_name", "SIGINT")
        print(f"\n{ending.signal}: writing final.pt, metrics, plot and summary", file=sys.stderr)
    except Exception as exc:  # the env's, a full disk's, memory's, or a bug's: the files first, then the error
        ending.error = out_of_memory(exc, config, run) or exc
        print(f"\n{type(ending.error).__name__} at iteration {len(log.rows['metrics'])}: "
              "writing final.pt, metrics, plot and summary", file=sys.stderr)
    finally:
        bar.close()
        with contextlib.suppress(Exception):  # a broken env may fail to close too: its first error stands
            envs.close()
    summary = finish_run(config, run, log, best, net, ending)
    if ending.error is not None and not isinstance(ending.error, RunStopped):
        raise ending.error
    return summary


# ==== Main ========================================================================================
def run_eval(config: Config, run: RunConfig) -> None:
    """--eval CHECKPOINT: greedy returns, mean and std, and the agent's GIF; no training."""
    net, checkpoint_config = load_agent(run.eval, run.device)
    env_id = checkpoint_config.get("env_id") if isinstance(checkpoint_config, dict) else None
    try:
        env = gym.make(env_id)
        fits = env.observation_space.shape == (net.obs_dim,) and getattr(env.action_space, "n", None) == net.act_dim
        env.close()
    except Exception:
        fits = False
    if not fits:
        raise UsageError("--eval", f"{run.eval}: its env {env_id!r} cannot be made or does not fit its network")
    returns = evaluate(net, env_id, run.eval_episodes, config.seed + EVAL_SEED_OFFSET)
    print(f"{run.eval}: {env_id}, greedy return over {run.eval_episodes} episodes: "
          f"mean {returns.mean():.1f}, std {returns.std():.1f}, min {returns.min():.0f}, max {returns.max():.0f}")
    if run.gif:
        out_dir = Path(run.out_dir) if run.out_dir else Path(run.eval).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        gif_path = out_dir / f"eval_{Path(run.eval).stem}.gif"
        render_gif(net, env_id, gif_path, seed=config.seed + EVAL_SEED_OFFSET)
        print(f"wrote {gif_path}")


class WriteError(RunStopped):
    """A file of the run that could not be written (a full disk, a folder gone)."""

    def __init__(self, path, exc: OSError):
        super().__init__(f"could not write {path}: {exc.strerror or exc}")


class Interrupted(KeyboardInterrupt):
    """A signal that ends a run as Ctrl-C does, with its name (a plain KeyboardInterrupt is SIGINT)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


# Besides SIGINT (Ctrl-C: Python's KeyboardInterrupt), the signals that end a process by default and
# that a terminal, a shell or a scheduler sends in normal use; each ends a run as Ctrl-C does.
ENDING_SIGNALS = {
    "SIGTERM": "kill's default; timeout, docker stop, Kubernetes, systemd; SLURM, PBS and LSF ending a job",
    "SIGHUP": "the terminal closed (a window, an ssh session), passed on by the shell to its jobs",
    "SIGUSR1": "a scheduler's warning before its time limit: SLURM's --signal=USR1@secs, Grid Engine's -notify",
    "SIGUSR2": "the same warning from LSF (bsub -wa USR2) and Grid Engine's -notify (before the kill)",
}


def catch_ending_signals() -> dict:
    """raise_interrupted for each of ENDING_SIGNALS this platform has, except one inherited as ignored
    (nohup ignores SIGHUP: it stays ignored). Returns the handlers it replaced, by signal number."""
    replaced = {}
    for name in ENDING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            replaced[number] = signal.signal(number, raise_interrupted)
    return replaced


def reopen_closed_stdio() -> None:
    """A process started with stdin, stdout or stderr closed (a cron line's `>&- 2>&-`): each closed
    one reopened on os.devnull, so that no file the run opens later takes its number."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


class BestEffort:
    """sys.stdout or sys.stderr, best-effort: a terminal that closed (EIO), a pipe that nobody reads
    (EPIPE) or a full device (ENOSPC) must not stop a run or its clean-up. The first write that fails
    points the stream's file at os.devnull, so that neither later messages nor Python's flush at exit
    fail on it. None (Python's stream when its file was closed at start) writes to os.devnull."""

    def __init__(self, stream):
        self.stream = stream if stream is not None else open(os.devnull, "w")

    def write(self, text: str) -> int:
        self._try(lambda: (self.stream.write(text), self.stream.flush()))
        return len(text)

    def flush(self) -> None:
        self._try(self.stream.flush)

    def _try(self, act) -> None:
        try:
            act()
        except OSError:
            with contextlib.suppress(Exception):  # (a stream with no file, as under pytest: nothing to do)
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 1 stopped early (diverged, a non-finite env, a failed write, memory, a failed
    clean-up step, or the env raised: then its traceback); 2 a user error; else 128 + the number of the
    signal that ended the run as Ctrl-C does (130 SIGINT, 143 SIGTERM, 129 SIGHUP, 138 SIGUSR1, 140
    SIGUSR2: ENDING_SIGNALS says who sends which). SIGKILL cannot be caught; SIGQUIT and SIGXCPU dump core,
    SIGPIPE Python ignores. Every file is written atomically (the CSVs a row at a time), so a second
    signal during the clean-up leaves none half-written. Messages are best-effort: the files come first."""
    reopen_closed_stdio()
    replaced, streams = catch_ending_signals(), (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = BestEffort(sys.stdout), BestEffort(sys.stderr)
    config = run = None
    try:
        config, run = parse_args(argv)
        if run.eval is not None:
            run_eval(config, run)
            return EXIT_STATUS["done"]
        summary = train(config, run)
        if summary["error"]:
            print(f"error: {summary['error']}", file=sys.stderr)
        return summary["exit_status"]
    except UsageError as exc:
        parser = build_parser()
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_STATUS["user error"]
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"\n{name}: stopped; the files written so far are whole", file=sys.stderr)
        return Ending(signal=name).exit_status
    except Exception as exc:  # memory ran out before the loop (the envs, say): one line, not a traceback
        if config is None or (memory := out_of_memory(exc, config, run)) is None:
            raise
        print(f"error: before training: {memory}", file=sys.stderr)
        return EXIT_STATUS["stopped early"]
    finally:
        sys.stdout, sys.stderr = streams
        for number, handler in replaced.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
