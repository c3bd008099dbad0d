"""Milliseconds of one PPO update and one rollout at the defaults, on the CPU, 1 torch thread.

One rollout and its GAE, then again and again an update and a rollout (which refills the
buffers in place; the advantages stay the first rollout's), at lr 1e-9: the weights barely
move, so versions of the script, or Adam's implementations, are timed on the same kind of work
(the update trains on the buffers' valid steps, which each rollout rewrites: their count varies a
little from round to round).
The script's own Adam choice is not used: --adam picks it. Medians of --repeats after
10 warm-up rounds. Run the versions one after the other, several times: the machine is shared.

    python bench/update_ms.py                                      # this checkout, fused Adam
    python bench/update_ms.py --adam single-tensor                 # torch's default Adam
    python bench/update_ms.py --script /tmp/before/ppo_cartpole.py --adam single-tensor  # another version
"""

import argparse
import importlib.util
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, default=ROOT / "ppo_cartpole.py")
    parser.add_argument("--adam", choices=("fused", "single-tensor"), default="fused")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("ppo_cartpole", args.script)
    ppo = importlib.util.module_from_spec(spec)
    sys.modules["ppo_cartpole"] = ppo
    spec.loader.exec_module(ppo)

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the net's init, sampling and shuffling (torch's global RNG, as train seeds it)
    # A version from before sampling and shuffling used torch's global RNG takes a generator instead.
    seeded = {"generator": torch.Generator().manual_seed(0)} \
        if "generator" in inspect.signature(ppo.ppo_update).parameters else {}
    envs = ppo.make_envs("CartPole-v1", 32, torch.device("cpu"))
    net = ppo.ActorCritic(4, 2)
    collector = ppo.Collector(envs, 32, 0, torch.device("cpu"))
    rollout = collector.collect(net, 0.995, *seeded.values())
    advantages, returns = ppo.compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value,
                                          0.995, 0.8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-9, fused=args.adam == "fused")
    updates, rollouts = [], []
    for _ in range(10 + args.repeats):
        t0 = time.perf_counter()
        ppo.ppo_update(net, optimizer, rollout, advantages, returns, update_epochs=4, minibatch_size=256,
                       clip_eps=0.2, value_clip_eps=None, entropy_coef=0.0, value_coef=0.5, max_grad_norm=0.5,
                       **seeded)
        updates.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collector.collect(net, 0.995, *seeded.values())
        rollouts.append(time.perf_counter() - t0)
    envs.close()
    print(f"{args.script} ({args.adam} Adam): update {statistics.median(updates[10:]) * 1e3:.2f} ms, "
          f"rollout {statistics.median(rollouts[10:]) * 1e3:.2f} ms (medians of {args.repeats})")


if __name__ == "__main__":
    main()
