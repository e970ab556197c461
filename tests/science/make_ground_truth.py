"""Independent lock-step ground truth for the chaos → stable transition at a constant learning rate.

Plain PyTorch, no dynprobe import. For each setting of ``settings.py`` the main run trains for 2H steps; at every
spawn step t0 of the setting's grid, ``directions`` ghosts are made: a deepcopy of model *and* optimizer whose
parameters are moved by ε = 1e-7 · d/‖d‖ (d a seeded float64 Gaussian over all parameters, θ + ε formed in float64
and rounded to float32; the realized ‖θ'−θ‖ is recorded), then trained in lock-step on exactly the main run's
batches (no setting has dropout or other in-step randomness). Per ghost and per step: L2 = ‖θ'−θ‖₂ and
1 − cos(θ', θ) in float64 (cancellation-free, ``½‖a/‖a‖ − b/‖b‖‖²``), over parameters only (not BN buffers). At H and
2H: also the disagreement D (argmax differs, eval mode, first ``eval_n`` test examples) and the linear loss barrier
max_α [L(αθ' + (1−α)θ) − (αL(θ') + (1−α)L(θ))] on 11 α (parameters and float buffers interpolated, eval mode, mean
cross-entropy on the same examples — dynprobe's default barrier convention).

Ground-truth bracket (per comparison step T ∈ {H, 2H}, see ``bracket``): the first split of the spawn grid into
an early block and a late block such that every direction of every late spawn is ≥ K = 10× below every direction of
every early spawn in L2 (≥ K² in 1 − cos), also after projecting still-growing late ghosts one more quarter of
their life ahead; "no transition located" when no split qualifies. Every split's factors are in the JSON so another
K can be applied. Spawn grids end at ≤ H/2 (except where a setting says otherwise), so that at H every ghost has
lived ≥ H/2 steps.

Usage: ``python tests/science/make_ground_truth.py [--setting NAME ...] [--seed K] [--out PATH] [--threads 1]``
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import settings as S  # noqa: E402

K_L2 = 10.0            # bracket factor on L2 (the 1 − cos factor is K_L2²)
ALPHAS = np.linspace(0.0, 1.0, 11)


def flat64(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64)


def separation(ghost: torch.Tensor, main: torch.Tensor) -> tuple[float, float]:
    """(‖g − m‖₂, 1 − cos(g, m)) in float64; 1 − cos as ½‖g/‖g‖ − m/‖m‖‖² (no cancellation)."""
    l2 = float(torch.linalg.vector_norm(ghost - main))
    omc = 0.5 * float(torch.linalg.vector_norm(ghost / torch.linalg.vector_norm(ghost)
                                               - main / torch.linalg.vector_norm(main)) ** 2)
    return l2, omc


def direction_seed(s: S.Setting, spawn: int, k: int) -> int:
    return s.seed * 1_000_000_007 + spawn * 1000 + k + 1


def perturb_(model: torch.nn.Module, eps: float, seed: int) -> float:
    """θ ← fl32(θ + eps · d/‖d‖), d ~ N(0, I) float64 over all parameters; returns the realized ‖Δθ‖₂."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    ds = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(float((d * d).sum()) for d in ds))
    realized = 0.0
    with torch.no_grad():
        for p, d in zip(params, ds):
            before = p.detach().to(torch.float64)
            p.copy_((before + d * (eps / norm)).to(p.dtype))
            realized += float(((p.detach().to(torch.float64) - before) ** 2).sum())
    return math.sqrt(realized)


@torch.no_grad()
def eval_logits_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    return logits, float(torch.nn.functional.cross_entropy(logits.double(), y))


@torch.no_grad()
def barrier(main: torch.nn.Module, ghost: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            loss_main: float, loss_ghost: float) -> tuple[float, float]:
    """(barrier, interior) with interior = max over the 9 interior α of L(α θ' + (1−α) θ) − (α L(θ') + (1−α) L(θ))
    (negative when the whole path lies below the chord) and barrier = max(interior, 0), the max over all 11 α
    (the endpoints give 0). Parameters and float buffers (BatchNorm running statistics) are interpolated;
    evaluation in eval mode."""
    probe = copy.deepcopy(main)
    sm, sg = main.state_dict(), ghost.state_dict()
    interior = -math.inf
    for a in ALPHAS[1:-1]:
        mixed = {k: (a * sg[k].double() + (1 - a) * sm[k].double()).to(sm[k].dtype) if sm[k].is_floating_point()
                 else sm[k] for k in sm}
        probe.load_state_dict(mixed)
        _, loss = eval_logits_loss(probe, x, y)
        interior = max(interior, loss - (a * loss_ghost + (1 - a) * loss_main))
    return max(interior, 0.0), interior


class Ghost:
    def __init__(self, spawn: int, k: int, model, optimizer, realized: float, total: int) -> None:
        self.spawn, self.k, self.model, self.optimizer, self.realized = spawn, k, model, optimizer, realized
        self.l2 = np.full(total + 1, np.nan)
        self.omc = np.full(total + 1, np.nan)
        self.at: dict[int, dict] = {}


def run_setting(s: S.Setting, *, with_barrier: bool = True, control: bool = True, log=print) -> dict:
    started = time.perf_counter()
    data = S.load_data(s)
    x_eval, y_eval = data.x_test[:s.eval_n], data.y_test[:s.eval_n]
    model = S.build_model(s)
    optimizer = S.build_optimizer(s, model)
    H, total = s.horizon, s.total_steps
    assert max(s.spawns) < H, "every spawn must precede H"
    ghosts: list[Ghost] = []
    controls: list[Ghost] = []
    main_loss = np.full(total, np.nan)
    main_eval: dict[int, dict] = {}

    def record(step: int) -> None:
        main = flat64(model)
        for g in ghosts + controls:
            g.l2[step], g.omc[step] = separation(flat64(g.model), main)
        if step in (H, total):
            logits, loss = eval_logits_loss(model, x_eval, y_eval)
            main_eval[step] = {"eval_loss": loss, "eval_acc": float((logits.argmax(1) == y_eval).float().mean()),
                               "train_loss_last50": float(np.mean(main_loss[max(0, step - 50):step])),
                               "param_norm": float(torch.linalg.vector_norm(main))}
            for g in ghosts:
                g_logits, g_loss = eval_logits_loss(g.model, x_eval, y_eval)
                entry = {"l2": g.l2[step], "one_minus_cos": g.omc[step],
                         "amplification": g.l2[step] / g.realized,
                         "disagreement": float((g_logits.argmax(1) != logits.argmax(1)).float().mean()),
                         "growth_last_quarter": growth(g.l2, g.spawn, step)}
                if with_barrier:
                    entry["barrier"], entry["barrier_interior"] = barrier(model, g.model, x_eval, y_eval, loss, g_loss)
                g.at[step] = entry

    for step in range(total):
        if step in s.spawns:
            for k in range(s.directions):
                gm, go = copy.deepcopy((model, optimizer))
                realized = perturb_(gm, s.eps, direction_seed(s, step, k))
                ghosts.append(Ghost(step, k, gm, go, realized, total))
            if control and step == s.spawns[0]:
                gm, go = copy.deepcopy((model, optimizer))
                controls.append(Ghost(step, -1, gm, go, 0.0, total))
            record(step)
        x, y = S.batch(s, data, step)
        main_loss[step] = S.train_step(model, optimizer, x, y)
        for g in ghosts + controls:
            S.train_step(g.model, g.optimizer, x, y)
        record(step + 1)
    seconds = time.perf_counter() - started
    result = summarize(s, ghosts, controls, main_eval, main_loss, seconds)
    log_table(result, log)
    return result


def growth(l2: np.ndarray, spawn: int, step: int) -> float:
    """L2(step) / L2(step − (step − spawn)/4): growth over the last quarter of the ghost's life up to ``step``."""
    start = step - (step - spawn) // 4
    return float(l2[step] / l2[start]) if l2[start] > 0 else float("nan")


def trajectory_steps(total: int, points: int = 80) -> list[int]:
    """Log-and-linearly spaced record steps (every ghost's values on these steps go into the JSON)."""
    lin = np.linspace(0, total, points // 2)
    log = np.geomspace(1, total, points // 2)
    return sorted({int(round(v)) for v in np.concatenate([lin, log])} | {0, total})


def bracket(s: S.Setting, per_spawn: dict[int, list[dict]], step: int) -> dict:
    """Ground-truth bracket at comparison step ``step`` (H or 2H).

    For each split of the spawn grid into an early block (spawns ≤ a) and a late block (spawns ≥ b, b the next
    spawn after a), the separation factor is min(early L2) / max(late L2), the minimum and maximum taken over
    spawns *and* directions: every direction of every late spawn lies that factor below every direction of every
    early spawn (same for 1 − cos). A late ghost still growing by g > 1 over the last quarter of its life is
    also counted at its projected level L2·g (``projected_factor_l2``), so a late ghost on its way up cannot pass
    for a plateau. The bracket is the *first* split (scanning from the earliest spawn) with factor_l2 ≥ K_L2,
    factor_one_minus_cos ≥ K_L2² and projected_factor_l2 ≥ K_L2: (a, b) = (last spawn on the early/chaotic level,
    first spawn whose every direction — and every later spawn's — is ≥ K× lower). ``located`` is False when no
    split qualifies ("no transition located"). ``best_split`` is the split with the largest factor_l2 whatever
    K, and ``splits`` lists every split's factors so another K can be applied."""
    spawns = sorted(per_spawn)
    l2 = {t: np.array([e[step]["l2"] for e in per_spawn[t]]) for t in spawns}
    omc = {t: np.array([e[step]["one_minus_cos"] for e in per_spawn[t]]) for t in spawns}
    grow = {t: np.array([e[step]["growth_last_quarter"] for e in per_spawn[t]]) for t in spawns}
    amp = {t: np.array([e[step]["amplification"] for e in per_spawn[t]]) for t in spawns}
    splits = []
    for i in range(len(spawns) - 1):
        early, late = spawns[:i + 1], spawns[i + 1:]
        early_min = min(l2[t].min() for t in early)
        splits.append({
            "last_chaotic": early[-1], "first_stable": late[0],
            "factor_l2": float(early_min / max(l2[t].max() for t in late)),
            "factor_one_minus_cos": float(min(omc[t].min() for t in early) / max(omc[t].max() for t in late)),
            "projected_factor_l2": float(early_min / max((l2[t] * np.maximum(grow[t], 1.0)).max() for t in late)),
            "adjacent_factor_l2": float(l2[early[-1]].min() / l2[late[0]].max()),
            "adjacent_factor_one_minus_cos": float(omc[early[-1]].min() / omc[late[0]].max()),
            "late_max_growth": float(max(grow[t].max() for t in late)),
            "late_min_amplification": float(min(amp[t].min() for t in late)),
            "late_max_amplification": float(max(amp[t].max() for t in late)),
        })
    qualifying = [d for d in splits if d["factor_l2"] >= K_L2 and d["factor_one_minus_cos"] >= K_L2 ** 2
                  and d["projected_factor_l2"] >= K_L2]
    chosen = qualifying[0] if qualifying else None
    return {"step": step, "K_l2": K_L2, "K_one_minus_cos": K_L2 ** 2, "located": chosen is not None,
            "last_chaotic": chosen["last_chaotic"] if chosen else None,
            "first_stable": chosen["first_stable"] if chosen else None,
            "chosen_split": chosen, "best_split": max(splits, key=lambda d: d["factor_l2"]),
            "median_l2_per_spawn": {str(t): float(np.median(l2[t])) for t in spawns},
            "median_one_minus_cos_per_spawn": {str(t): float(np.median(omc[t])) for t in spawns},
            "splits": splits}


def sig(v: float) -> float:
    return float(f"{float(v):.4g}")


def summarize(s, ghosts, controls, main_eval, main_loss, seconds) -> dict:
    H, total = s.horizon, s.total_steps
    steps = trajectory_steps(total)
    per_spawn: dict[int, list[dict]] = {}
    for g in ghosts:
        per_spawn.setdefault(g.spawn, []).append({
            "direction": g.k, "direction_seed": direction_seed(s, g.spawn, g.k), "realized_eps": g.realized,
            H: g.at[H], total: g.at[total],
            "trajectory": {"steps": [t for t in steps if t >= g.spawn],
                           "l2": [sig(g.l2[t]) for t in steps if t >= g.spawn],
                           "one_minus_cos": [sig(g.omc[t]) for t in steps if t >= g.spawn]}})
    control_max = max((float(np.nanmax(c.l2)) for c in controls), default=None)
    brackets = {str(t): bracket(s, per_spawn, t) for t in (H, total)}
    spawns_json = {str(t): [{**{k: v for k, v in e.items() if not isinstance(k, int)},
                             "at_H": e[H], "at_2H": e[total]} for e in es] for t, es in per_spawn.items()}
    return {"setting": s.to_dict(), "H": H, "2H": total, "seconds": seconds, "threads": torch.get_num_threads(),
            "control_max_l2": control_max, "main": {"at_H": main_eval[H], "at_2H": main_eval[total],
                                                    "train_loss_first10": float(np.mean(main_loss[:10]))},
            "spawns": spawns_json, "bracket": {"at_H": brackets[str(H)], "at_2H": brackets[str(total)]}}


def log_table(r: dict, log=print) -> None:
    s = r["setting"]
    log(f"\n== {s['name']}: {s['arch']} w{s['width']} {s['optimizer']} lr={s['lr']} mom={s['momentum']} "
        f"wd={s['weight_decay']} init×{s['init_scale']} bs={s['batch_size']} n={s['num_samples']} seed={s['seed']} "
        f"H={r['H']}  ({r['seconds']:.1f} s, control max L2 {r['control_max_l2']})")
    for which in ("at_H", "at_2H"):
        m = r["main"][which]
        log(f"   main {which}: train loss(last50) {m['train_loss_last50']:.3g}  eval loss {m['eval_loss']:.3g}  "
            f"acc {m['eval_acc']:.3f}  |θ| {m['param_norm']:.3g}")
    log("   spawn | " + " | ".join(f"{w:^59}" for w in ("at H", "at 2H")))
    head = f"{'L2':>9} {'1-cos':>9} {'amp':>8} {'grow':>6} {'D':>6} {'B_int':>9}"
    log("         | " + " | ".join(head for _ in (0, 1)))
    for t, es in sorted(r["spawns"].items(), key=lambda kv: int(kv[0])):
        for e in es:
            cells = []
            for which in ("at_H", "at_2H"):
                v = e[which]
                cells.append(f"{v['l2']:9.2e} {v['one_minus_cos']:9.2e} {v['amplification']:8.1e} "
                             f"{v['growth_last_quarter']:6.2f} {v['disagreement']:6.3f} "
                             f"{v.get('barrier_interior', float('nan')):9.1e}")
            log(f"   {int(t):5d} | " + " | ".join(cells))
    for which in ("at_H", "at_2H"):
        b = r["bracket"][which]
        c = b["chosen_split"] or b["best_split"]
        log(f"   bracket {which}: {'LOCATED' if b['located'] else 'no transition located (best split shown)'} "
            f"({c['last_chaotic']}, {c['first_stable']})  factor L2 {c['factor_l2']:.3g}  1-cos "
            f"{c['factor_one_minus_cos']:.3g}  projected L2 {c['projected_factor_l2']:.3g}  late growth ≤ "
            f"{c['late_max_growth']:.3g}  late amplification {c['late_min_amplification']:.2g}"
            f"–{c['late_max_amplification']:.2g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", action="append", help="setting name (repeatable; NAME@seedK for another seed)")
    parser.add_argument("--seed", type=int, default=None, help="override every selected setting's seed")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "ground_truth.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-barrier", action="store_true")
    args = parser.parse_args(argv)
    S.configure_torch(args.threads)
    names = args.setting or list(S.SETTINGS)
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    results = existing.get("settings", {})
    started = time.perf_counter()
    for name in names:
        s = S.get(name)
        if args.seed is not None:
            s = s.with_seed(args.seed)
        results[s.name] = run_setting(s, with_barrier=not args.no_barrier)
    payload = {"description": __doc__, "torch": torch.__version__, "settings": results}
    text = json.dumps(payload, indent=1, default=float)
    # one line per list of numbers (the trajectories), so the file stays readable and small
    text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
    out.write_text(text + "\n")
    print(f"\nwrote {out} ({len(results)} settings); this invocation took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
