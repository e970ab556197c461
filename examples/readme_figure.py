"""Draw the README's figure from a demo run: the chaos effect (left) and the cone effect (right).

Run: ``dynprobe demo --out runs/demo && python examples/readme_figure.py runs/demo -o docs/figures/demo.png``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dynprobe  # noqa: E402


def draw(run: dynprobe.Run, out: Path) -> Path:
    transition = dynprobe.analyze(run).transition.step  # the headline (None when it is undetermined)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90, constrained_layout=True)
    spawns = sorted({g.spawn_step for g in run.ghosts if not g.control})
    colors = {t0: plt.get_cmap("viridis")(k / max(len(spawns) - 1, 1)) for k, t0 in enumerate(spawns)}
    labelled: set[int] = set()
    for ghost in run.ghosts:
        if ghost.control or not ghost.realized_norm:
            continue
        steps, l2 = run.separation(ghost.ghost_id)
        keep = l2 > 0
        label = None if ghost.spawn_step in labelled else f"t0 = {ghost.spawn_step}"  # one entry per spawn step
        labelled.add(ghost.spawn_step)
        left.plot(steps[keep], l2[keep] / ghost.realized_norm, linewidth=1, color=colors[ghost.spawn_step],
                  label=label)
    left.set(yscale="log", xlabel="step t", ylabel="‖θ′_t − θ_t‖ / ‖ε‖",
             title="chaos: ghosts perturbed by ‖ε‖ = 1e-7 at t0")
    left.legend(fontsize=7, ncol=2)
    kernel_steps = run.kernel_steps
    taus = [t for t in (0, 100, transition, 1600) if t is not None and t in set(kernel_steps.tolist())]
    for tau in dict.fromkeys(taus):
        t, s = run.kernel_distance_to(int(tau))
        after = t > tau
        right.plot(t[after], s[after], marker=".", label=f"τ = {tau}")
    right.set(yscale="log", xlabel="step t", ylabel="S(t, τ)", title="cone: eNTK distance to the kernel at τ")
    right.legend(fontsize=7)
    for ax in (left, right):
        if transition is not None:
            ax.axvline(transition, color="0.5", linestyle="--", linewidth=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/figures/demo.png"))
    args = parser.parse_args()
    print(draw(dynprobe.load_run(args.run), args.output))


if __name__ == "__main__":
    main()
