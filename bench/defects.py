"""The blog post's defects, rebuilt: each one piece of ppo_cartpole.py, copied and changed.

This is the "copy a piece into your own code and change it" use the script is built for, run
backwards: each variant below swaps one function or class of ppo_cartpole.py for a version with
one of the post's bugs, so bench/ablations.py can measure what that bug costs. ppo_cartpole.py
itself stays correct; `install(names)` patches the module in the process that trains.

Shapes as in ppo_cartpole.py: T steps per env per rollout, N envs.
"""

import torch

import ppo_cartpole as ppo

compute_gae = ppo.compute_gae  # the correct one, kept: install() replaces ppo.compute_gae itself


class ResetEveryRollout(ppo.Collector):
    """The post's `collect_trajectory`: env.reset() at the start of every rollout, so no episode
    outlives T steps (the post: T = 256, so CartPole-v1's 500 was unreachable)."""

    def collect(self, net, gamma):
        self.next_obs.copy_(self.envs.reset()[0])  # the defect: cuts every running episode
        self.prev_done.zero_()
        self.episode_return.zero_()
        self.episode_length.zero_()
        return super().collect(net, gamma)


def flat_buffer_gae(rewards, values, dones, last_value, gamma, lam):
    """The post's flat buffer: the envs' steps interleaved ([T, N] read row by row) and GAE run
    over that as one time series, so env n's step t bootstraps from env n+1's value.
    Inputs and outputs as ppo.compute_gae; the one bootstrap is the last entry's env's."""
    T, N = rewards.shape
    advantages = compute_gae(rewards.reshape(T * N, 1), values.reshape(T * N, 1), dones.reshape(T * N, 1),
                             last_value[-1:], gamma, lam)[0].reshape(T, N)  # [T*N, 1] -> [T, N]
    return advantages, advantages + values


def averaged_bootstrap_gae(rewards, values, dones, last_value, gamma, lam):
    """The post's `next_value.mean(dim=0)`: one bootstrap value, averaged over the envs."""
    return compute_gae(rewards, values, dones, last_value.mean().expand_as(last_value), gamma, lam)


class TruncationAsTermination(ppo.Collector):
    """The post's time limit as failure: no gamma * V(final obs) on a truncated step."""

    def collect(self, net, gamma):
        rollout = super().collect(net, gamma)
        next_values = torch.cat([rollout.values[1:], rollout.last_value.unsqueeze(0)])  # [T, N]
        rollout.rewards -= gamma * next_values * self.truncated_only  # the defect: undo the bootstrap
        return rollout


class StoreAutoresetSteps(ppo.Collector):
    """The post on gymnasium >= 1.0: the next-step autoreset steps (action ignored, reward 0,
    the reset observation) kept as real transitions: the valid mask is all ones."""

    def collect(self, net, gamma):
        rollout = super().collect(net, gamma)
        rollout.valid.fill_(1.0)  # the defect
        return rollout


def default_init(layer, gain):
    """PyTorch's default Linear init instead of orthogonal (the post's network)."""
    return layer


class PostCollector(ResetEveryRollout, TruncationAsTermination, StoreAutoresetSteps):
    """The post's three collector defects at once (each collect() runs its change, then the next's)."""


def post_gae(rewards, values, dones, last_value, gamma, lam):
    """The post's two GAE defects at once: the flat buffer, bootstrapped by the envs' mean."""
    return flat_buffer_gae(rewards, values, dones, last_value.mean().expand_as(last_value), gamma, lam)


# name -> {attribute of ppo_cartpole: its replacement}
DEFECTS = {
    "reset every rollout": {"Collector": ResetEveryRollout},
    "flat buffer GAE": {"compute_gae": flat_buffer_gae},
    "averaged bootstrap": {"compute_gae": averaged_bootstrap_gae},
    "truncation as termination": {"Collector": TruncationAsTermination},
    "autoreset steps stored": {"Collector": StoreAutoresetSteps},
}
ALL_DEFECTS = {"Collector": PostCollector, "compute_gae": post_gae}
PATCHES = {**DEFECTS, "all defects": ALL_DEFECTS, "default init": {"layer_init": default_init}}


def install(name: str) -> None:
    """Patch ppo_cartpole for one named variant, in this process (train() looks them up when run)."""
    for attribute, replacement in PATCHES[name].items():
        setattr(ppo, attribute, replacement)
