"""The report's per-layer section: C per layer over a fixed lag, S per layer, the layers' share of each ghost's
separation (:func:`dynprobe.analysis.layers.layer_view`); a note for whatever the run lacks."""
from __future__ import annotations

from dynprobe.analysis.layers import layer_view
from dynprobe.report import figures

from ._context import SectionContext
from ._html import esc, img, missing, note
from ._text import INTROS

__all__ = ["layers_section"]


def layers_section(s: SectionContext) -> str:
    view = layer_view(s.run, transition=s.transition)
    if not view.layers:
        return missing(esc("; ".join(view.missing)))
    parts = []
    if view.C is not None and view.C_steps is not None and view.C_steps.size:
        s.tick("per-layer C")
        parts.append(img(figures.layer_heatmap_figure(
            view.C_steps, view.C, view.layers, title=f"Direction change per layer, C_l(t, t + {view.C_lag})",
            label="C_l (log scale)", log_steps=s.log_steps, transition=s.transition, log_color=True),
            "per-layer C", f"Each row: 1 − cos between the layer's weights at t and {view.C_lag} steps later."))
    if view.S is not None and view.S_steps is not None and view.S_steps.size:
        s.tick("per-layer S")
        parts.append(img(figures.layer_heatmap_figure(
            view.S_steps, view.S, view.layers, title=f"Kernel change per layer, S_l(t, t + {view.S_lag})",
            label="S_l (log scale)", log_steps=s.log_steps, transition=s.transition, log_color=True),
            "per-layer kernel velocity", "Each row: the layer's share of the eNTK, H_l, compared with itself a fixed "
                                         "lag later (H = Σ_l H_l)."))
    if view.S_tau is not None and view.S_tau_steps is not None:
        parts.append(img(figures.layer_heatmap_figure(
            view.S_tau_steps, view.S_tau, view.layers, title=f"Per-layer kernel distance to step {view.tau}, "
                                                             f"S_l(t, {view.tau})",
            label="S_l(t, τ)", log_steps=s.log_steps, transition=s.transition, log_color=False),
            "per-layer cone", "A row that rises and levels off: the layer's kernel moves inside a cone."))
    if view.separation_share is not None:
        s.tick("separation shares")
        parts.append(img(figures.layer_heatmap_figure(
            view.ghost_spawns, view.separation_share, view.layers,
            title="Each layer's share of a ghost's separation, ‖θ'_l − θ_l‖² / ‖θ' − θ‖²", label="share",
            log_color=False, xlabel="ghost spawn step t0"),
            "separation shares", "Columns: ghosts by spawn step, at their last comparison; each column sums to 1."))
    notes = "".join(missing(esc(m)) for m in view.missing)
    return note(INTROS["layers"]) + f'<div class="grid">{"".join(parts)}</div>' + notes
