"""Host reads per training iteration, counted at run time: each call that copies a tensor's value
to Python or numpy (on a GPU, a wait for the device), made by ppo_cartpole.py's own code.

Patched counters on torch.Tensor (item, tolist, cpu, bool/int/float conversion, nonzero,
a boolean-mask index) and torch.nonzero count a call when its caller's frame is in the script
(torch's own code is not counted: Adam's CPU-side step counter, which is no device read, nor
anything torch.distributions does inside Categorical). Each read is charged to the part of the run
it happens in: the rollout (`collect`), GAE, the update (`ppo_update`), train's divergence check
after it (`nonfinite`: are the parameters finite), the log's copy of the ended episodes
(`finished_episodes`), best.pt's writes (`save_checkpoint`: best.pt's saves and final.pt's,
averaged over the iterations) or the end of the run (`finish_run`: the final evaluation, counted
for the whole run); `other` is anything else in the script (best.pt's greedy confirmations, off
here with --confirm-episodes 0). Runs on the CPU, where a read costs nothing, so the counts say
what a GPU would wait for.

The update reads its stats back at its end, one `.item()` per stat, and drops the rollout's
autoreset steps by one `nonzero` (on a GPU a wait to learn how many steps are kept); with
--target-kl it also reads each minibatch's KL for the stop test. So the update's count is no longer the single read of the version before (its
stats in one `.tolist()`, the autoreset steps kept in and masked): compare versions by running this
on each.

    python bench/host_reads.py                              # this checkout's script
    python bench/host_reads.py --script /tmp/before/ppo_cartpole.py   # another version
"""

import argparse
import collections
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("collect", "compute_gae", "ppo_update", "nonfinite", "finished_episodes", "save_checkpoint", "finish_run")
READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "nonzero")  # not numpy(): only after cpu()


def load(script: Path):
    spec = importlib.util.spec_from_file_location("ppo_cartpole", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ppo_cartpole"] = module
    spec.loader.exec_module(module)
    return module


def count_reads(ppo, argv: list[str]) -> tuple[collections.Counter, int]:
    """Trains with argv, counting host reads by part; returns (counts, iterations run)."""
    script = str(Path(ppo.__file__).resolve())
    counts = collections.Counter()

    def charge():
        frame = sys._getframe(2)  # the caller of the patched method
        if frame.f_code.co_filename != script:
            return
        while frame is not None and frame.f_code.co_name not in PARTS:
            frame = frame.f_back
        counts[frame.f_code.co_name if frame else "other"] += 1

    def counted(original):
        def wrapper(*args, **kwargs):
            charge()
            return original(*args, **kwargs)
        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in READS + ("__getitem__",)}
    real_nonzero = torch.nonzero
    getitem = originals["__getitem__"]

    def masked_getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            charge()
        return getitem(self, index)

    try:
        for name in READS:
            setattr(torch.Tensor, name, counted(originals[name]))
        torch.Tensor.__getitem__ = masked_getitem
        torch.nonzero = counted(real_nonzero)
        with tempfile.TemporaryDirectory() as out:
            parsed = ppo.parse_args([*argv, "--out-dir", str(Path(out) / "run")])
            configs = parsed if isinstance(parsed, tuple) else (parsed,)  # (Config, RunConfig); once one Config
            summary = ppo.train(*configs)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.nonzero = real_nonzero
    return counts, summary["iterations"] if "iterations" in summary else configs[0].num_iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, default=ROOT / "ppo_cartpole.py")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    ppo = load(args.script)
    torch.cuda.is_available = lambda: False  # the CPU's defaults, whatever the machine
    common = ["--episodes", str(args.iterations), "--no-plot", "--no-gif", "--confirm-episodes", "0"]
    cases = [("torch backend, its preset", ["--env-backend", "torch"]),
             ("torch backend, --target-kl 0.02", ["--env-backend", "torch", "--target-kl", "0.02"]),
             ("gymnasium backend, the defaults", [])]
    print(f"host reads per iteration (finish_run: per run), {args.script}, {args.iterations} iterations each")
    print("| run | " + " | ".join(PARTS) + " | other |")
    print("|---" * (len(PARTS) + 2) + "|")
    for label, flags in cases:
        counts, iterations = count_reads(ppo, common + flags)
        cells = [f"{counts[part] / iterations:g}" for part in PARTS[:-1]] + [f"{counts['finish_run']} in all",
                                                                              f"{counts['other']}"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
