"""The report's words: the plain-language opening of each section, the glossary and the reference part.

Each section opens with one or two sentences a practitioner understands (what is measured, what a high or low
value means, what to do with it); the paper and its equation numbers are in the reference part only.
"""
from __future__ import annotations

PAPER = ("Zhanpeng Zhou, Yongyi Yang, Masashi Sugiyama and Junchi Yan, <i>New Evidence of the Two-Phase Learning "
         "Dynamics of Neural Networks</i>")

WHAT_IS_THE_TRANSITION = (
    "Training first goes through a <b>chaotic phase</b>, in which a change as small as a rounding error in the "
    "weights sends the network to a different solution, and then a <b>stable phase</b>, in which such changes fade "
    "and the network keeps refining the same solution. Knowing when the switch happens tells you when seeds and "
    "small data or hyper-parameter changes stop mattering — a natural point to start weight averaging, to fork "
    "fine-tuning runs, or to compare checkpoints.")

INTROS = {
    "summary": "The headline asks the paper's question: does a tiny perturbation of the weights change where "
               "training ends up? It reads each ghost's outcome — where its separation from the run saturates — "
               "and brackets the transition between the last spawn that ends up on the chaotic level and the first "
               "whose ghosts all end up far below it; when the deciding ghosts are still growing it says "
               "undetermined. The other methods locate when the main trajectory settles, a different event: they "
               "are shown on a line of their own and never vote.",
    "training": "Loss and accuracy on your evaluation set. The dashed red line is the transition of the headline; "
                "the loss axis switches to a log scale when the losses span more than 100× (a spike would "
                "otherwise flatten every other point).",
    "chaos": "A <b>ghost</b> is a copy of your network nudged by a tiny ε at step t0 and then trained on exactly "
             "the same batches. In the chaotic phase its distance from your run grows exponentially; once "
             "training is stable it stays small. The chaos estimate is the first spawn step whose ghost's "
             "perturbation grows far less over the same number of steps; later ghosts that still grow show "
             "weaker chaos, not stability.",
    "trajectory": "How different the network is from itself at two moments: C compares the direction of the "
                  "weights, S the neural tangent kernels (how the network generalizes from one example to "
                  "another), D the predictions, B the loss along the straight line between the two weight "
                  "vectors. Large values close to the diagonal mean the network changes fast at that time.",
    "cone": "After the transition the neural tangent kernel keeps changing but stays inside a narrow cone: its "
            "distance to a reference kernel rises and then levels off, and kernels a fixed number of steps apart "
            "stop moving far. A kernel that keeps drifting away instead means the network is still in its "
            "exploratory phase.",
    "layers": "Which layers turn, which layers move the kernel, and which layers carry a ghost's separation — "
              "useful to see whether the chaos or the late refinement sits in the first layers, the last ones, "
              "or everywhere.",
    "switching": "What the network would reach if, from step t on, it were trained as its linearization (a "
                 "fixed kernel): if accuracy keeps improving as t grows, the continued non-linear evolution "
                 "after the transition still matters.",
    "evidence": "The rows of the C map behind its estimate: how far the direction of the weights has turned "
                "since each start step t0. Each row's dot is where it stops rising.",
    "configuration": "What was measured and how: the settings of the probe and the conventions of each number, "
                     "so the report can be reproduced and compared with others.",
}

GLOSSARY = [
    ("transition", "the step at which training leaves the chaotic phase (see the headline)."),
    ("ghost", "a copy of the network perturbed by ε at its spawn step t0 and trained on the same batches as "
              "the run; the ε = 0 <b>control</b> ghost checks that the replay is exact (its separation should be "
              "exactly 0)."),
    ("δ(t), separation", "‖θ'_t − θ_t‖ / ‖ε‖: how many times the perturbation has grown by step t."),
    ("plateau level", "the median separation ‖θ' − θ‖ over the last tenth of a ghost's life: where it ended up."),
    ("saturated", "a ghost whose separation changed less than ×3 over the last half of its life."),
    ("A(t0, Δ), amplification", "δ(t0 + Δ): the growth over a fixed window of Δ steps after the spawn (evidence)."),
    ("λ(t0, Δ), growth rate", "log A / Δ per step: positive while the perturbation grows exponentially."),
    ("C", "1 − cosine between two weight vectors (0: same direction)."),
    ("S", "1 − cosine between two neural tangent kernels (0: the network generalizes the same way)."),
    ("D", "the share of evaluation examples on which two networks predict different classes."),
    ("B (mean reference)", "the largest loss along the straight path between two networks minus the mean of "
                           "their losses; at least half their loss gap even without any barrier on the path."),
    ("B_linear", "the largest loss along the path minus the straight line between the two end losses: a "
                 "barrier only where the path actually rises (linear mode connectivity)."),
    ("kernel velocity", "S between kernels exactly Δ steps apart, S(t, t + Δ), against t."),
    ("bracket", "the steps between which a method locates the transition (from its snapshots or spawns)."),
    ("undetermined", "the data do not decide (e.g. later ghosts have not run long enough), said with the reason."),
]

REFERENCE = (
    f"<p>{PAPER} (the two-phase paper). Its quantities: parameter dissimilarity C, eq. (1); the empirical neural "
    "tangent kernel H, eq. (3); kernel distance S, eq. (4); loss barrier B, eq. (5); disagreement rate D, eq. (6). "
    "Its figures: Fig. 3 (the chaos effect: ghosts spawned at t0 compared at t1), Fig. 4 (the S map), Fig. 5 (the "
    "cone: a, S(t, τ); b, S(t, t + dt); c, the kernel trajectory), Fig. 6 (switching to linearized training). "
    "Finding I (the inflection point of C), Finding II and Conjecture I (the chaos effect) are in its §4, the cone "
    "effect in its §5.</p><p>Also used: the linear-reference barrier B_linear of linear mode connectivity (Frankle, "
    "Dziugaite, Roy and Carbin, <i>Linear Mode Connectivity and the Lottery Ticket Hypothesis</i>, 2020); the "
    "disagreement of independently trained networks as the scale of D (Jiang, Nagarajan, Baek and Kolter, "
    "<i>Assessing Generalization of SGD via Disagreement</i>, 2022); the kernel velocity (Fort et al., <i>Deep "
    "Learning versus Kernel Learning</i>, 2020).</p>"
    "<p>Where dynprobe departs from the paper, and why: the chaos estimate reads where each ghost's separation "
    "saturates (its plateau level, compared across spawns at the same final step, with several directions per "
    "spawn) rather than C, B and D at one t1 alone, and answers undetermined while the deciding ghosts still grow "
    "(final values of a still-growing ghost depend on when the run stops); the kernel velocity uses kernels a "
    "fixed number of steps apart (S between nearby snapshots is dominated by SGD noise, so dividing by the gap "
    "would follow the snapshot grid); decisions use B_linear, not "
    "eq. (5)'s B, which is at least half the end-point loss gap.</p>")
