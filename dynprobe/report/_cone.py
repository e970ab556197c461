"""The report's cone section (the two-phase paper's Fig. 5): S(t, τ), S(t, t + dt), the kernel velocity at a fixed
lag with its estimate, and the kernel trajectory in 2-D."""
from __future__ import annotations

import numpy as np

from dynprobe.analysis.cone import kernel_embedding, lag_curve
from dynprobe.report import figures

from ._context import SectionContext
from ._html import esc, img, missing, note
from ._text import INTROS

__all__ = ["cone_section"]


def cone_section(s: SectionContext) -> str:
    run, result = s.run, s.result
    if not result.cone.available:
        return missing(esc(result.cone.reason) + ". The cone curves (Fig. 5), the kernel velocity and the kernel "
                                                 "embedding need them.")
    steps, S = s.steps, run.S
    parts = []
    curves = [(c.tau, *run.kernel_distance_to(c.tau)) for c in result.cone.cones]
    if curves:
        s.tick("Fig. 5a")
        parts.append(img(figures.cone_curves_figure(curves, log_steps=s.log_steps, transition=s.transition),
                         "cone curves"))
    lags = [(dt, *lag_curve(steps, S, dt)) for dt in result.cone.lags]
    if lags:
        s.tick("Fig. 5b")
        parts.append(img(figures.lag_curves_figure(lags, log_steps=s.log_steps, transition=s.transition),
                         "lag curves", "Pairs of kernel snapshots exactly dt steps apart."))
    velocity = result.transition.get("kernel_velocity")
    if velocity is not None and velocity.evidence.get("t"):
        e = velocity.evidence
        s.tick("kernel velocity")
        parts.append(img(figures.velocity_figure(np.array(e["t"]), np.array(e["S"]), lag=e["lag"],
                                                 estimate=velocity.step, threshold=e.get("threshold"),
                                                 transition=s.transition, log_steps=s.log_steps),
                         "kernel velocity", esc(velocity.summary)))
    embedding = result.cone.embedding
    if embedding is not None:
        s.tick("Fig. 5c")
        parts.append(img(figures.embedding_figure(embedding.steps, embedding.coordinates, embedding.explained,
                                                  transition=s.transition), "kernel embedding",
                         "Classical MDS on the chordal distance √(2S) = PCA of Frobenius-normalized kernels."))
    if s.transition is not None:
        # The early, chaotic kernels dominate the embedding's scale: zoom into the kernels after the transition.
        keep = steps >= s.transition
        late = kernel_embedding(steps[keep], S[np.ix_(keep, keep)])
        if late is not None:
            s.tick("Fig. 5c (zoom)")
            parts.append(img(figures.embedding_figure(late.steps, late.coordinates, late.explained,
                                                      title=f"Kernels from step {s.transition} on (Fig. 5c, zoom)"),
                             "kernel embedding after the transition",
                             f"The same embedding of the kernels from step {s.transition} on only."))
    return note(INTROS["cone"]) + f'<div class="grid">{"".join(parts)}</div>'
