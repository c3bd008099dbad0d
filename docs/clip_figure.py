"""Draws assets/clip.png: the clipped surrogate L^CLIP of one sample against the ratio r, eq. (7) of
the PPO paper, for A > 0 and A < 0, with the flat regions where the sample's gradient is zero.

    python docs/clip_figure.py            # or: make clip-figure

The curve is computed by the script's own clipped_surrogate_loss (negated: the loss is -L^CLIP),
and the zero-gradient regions by autograd, so the picture shows what the code does.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ppo_cartpole import clipped_surrogate_loss  # noqa: E402

EPS = 0.2


def objective_and_gradient(ratios: np.ndarray, advantage: float) -> tuple[np.ndarray, np.ndarray]:
    """L^CLIP of one sample with advantage A at each ratio r, and dL/dr, via the script's loss."""
    ratio = torch.tensor(ratios, requires_grad=True)
    advantages = torch.full_like(ratio, advantage)
    # one sample per r: mean over a batch of one is the sample's own term
    values = torch.stack([-clipped_surrogate_loss(r.view(1), a.view(1), EPS) for r, a in zip(ratio, advantages)])
    values.sum().backward()
    return values.detach().numpy(), ratio.grad.numpy()


def main() -> None:
    ratios = np.linspace(0.3, 1.7, 701)
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, advantage in zip(fig.subplots(1, 2, sharey=False), (1.0, -1.0)):
        objective, gradient = objective_and_gradient(ratios, advantage)
        flat = np.abs(gradient) < 1e-9
        ax.plot(ratios, ratios * advantage, color="tab:gray", ls="--", lw=1, label="r A (unclipped)")
        ax.plot(ratios, objective, color="tab:blue", lw=2.5, label="L^CLIP = min(r A, clip(r, 1-eps, 1+eps) A)")
        ax.fill_between(ratios, 0, 1, where=flat, transform=ax.get_xaxis_transform(), color="tab:red",
                        alpha=0.12, label="flat: zero gradient, the sample stops pushing")
        for edge in (1 - EPS, 1 + EPS):
            ax.axvline(edge, color="black", lw=0.6, alpha=0.5)
        ax.axvline(1.0, color="black", lw=1)
        ax.set(xlabel="ratio r = pi(a|s) / pi_old(a|s)", ylabel="L^CLIP of one sample",
               title=f"A {'>' if advantage > 0 else '<'} 0: the gain stops at r = {1 + EPS if advantage > 0 else 1 - EPS:g}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if advantage > 0 else "lower left", fontsize=8)
    fig.suptitle(f"The clipped surrogate objective, PPO paper eq. (7), eps = {EPS}")
    out = ROOT / "assets" / "clip.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
