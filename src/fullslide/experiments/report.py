"""``report.md`` and its figure for each experiment: what a reader takes in at a glance, then the numbers."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fullslide.atomic import atomic_path, atomic_write_text


def _stats(values: list[float | None]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) over the finite values; nan where there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd, len(xs)


def _pm(values: list[float | None], digits: int = 3) -> str:
    mean, sd, n = _stats(values)
    return "n/a" if n == 0 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _ci(value: float | None, ci: list[float | None]) -> str:
    if value is None:
        return "n/a"
    low, high = (ci + [None, None])[:2]
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def k_label(k: int | str, context: str = "none") -> str:
    return ("all" if k == "all" else str(k)) + (" +cache" if context == "cache" else "")


def k_sweep_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """The paper's figure (training loss per epoch for each K; final training loss and test AUC against K,
    mean and spread over seeds) and a table per K."""
    plt = _pyplot()
    by_k: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_k[k_label(row["k"], row.get("context", "none"))].append(row)
    ks = list(by_k)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(ks):
        curves = [r["train_loss_by_epoch"] for r in by_k[k]]
        n = min(len(c) for c in curves)
        mean = [_stats([c[e] for c in curves])[0] for e in range(n)]
        axes[0].plot(range(1, n + 1), mean, marker="o", ms=3, color=cmap(i / max(1, len(ks) - 1)), label=f"K={k}")
    axes[0].set(title="training loss per epoch (mean over seeds)", xlabel="epoch", ylabel="cross-entropy")
    axes[0].legend(fontsize=8)
    x = list(range(len(ks)))
    for ax, key, title in ((axes[1], "final_train_loss", "final training loss"), (axes[2], "test_auc", "test AUC")):
        for xi, k in zip(x, ks):
            values = [r[key] for r in by_k[k] if r[key] is not None]
            ax.scatter([xi] * len(values), values, color="grey", s=14, zorder=2)
        means = [_stats([r[key] for r in by_k[k]]) for k in ks]
        ax.errorbar(x, [m[0] for m in means], yerr=[m[1] for m in means], marker="o", capsize=4, color="C3", zorder=3,
                    label="mean ± s.d. over seeds (dots: seeds)")
        ax.set(title=f"{title} against K", xlabel="K (tiles per slide per step)", xticks=x, xticklabels=ks)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    figure = _save(fig, out / "k_sweep.png")
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# k-sweep: more tiles per slide per step (K)",
        "",
        f"Synthetic `focal` cohort: {meta['slides']} slides of {meta['size']} px a side at 0.5 mpp (median "
        f"{meta.get('tiles_per_slide_median')} tiles of 32 px at 1 um/px per slide), lesions on about "
        f"{meta['lesion_fraction']:.1%} of the tissue of positive slides at contrast {meta['lesion_contrast']}. "
        f"Encoder: `tinycnn` pretrained with SimCLR on a separate cohort; end-to-end training, "
        f"{meta['epochs']} epochs, the same steps and learning rates for every K; seeds {seeds}. "
        "Validation and test use all tiles of each slide.",
        "",
        f"![k-sweep]({figure.name})",
        "",
        "| K | final training loss | test AUC | test loss | tiles seen | seconds | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        group = by_k[k]
        lines.append(f"| {k} | {_pm([r['final_train_loss'] for r in group])} | {_pm([r['test_auc'] for r in group])} "
                     f"| {_pm([r['test_loss'] for r in group])} | {_stats([r['tiles_seen'] for r in group])[0]:,.0f} "
                     f"| {_stats([r['seconds'] for r in group])[0]:.0f} | {len(group)} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Per run (test AUC with its bootstrap 95% CI):", "",
              "| K | seed | final training loss | test AUC [95% CI] | test loss |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {k_label(row['k'], row.get('context', 'none'))} | {row['seed']} | {_num(row['final_train_loss'])} | "
                     f"{_ci(row['test_auc'], row['test_auc_ci'])} | {_num(row['test_loss'])} |")
    plain = [k for k in ks if not k.endswith("+cache")]
    lines += ["", _trend(plain, by_k)] + _cache_verdicts(ks, by_k)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _trend(ks: list[str], by_k: dict[str, list[dict[str, Any]]]) -> str:
    """One sentence on whether the means move the paper's way between the smallest and the largest K."""
    if len(ks) < 2:
        return "One K only: no trend to read."
    lo, hi = by_k[ks[0]], by_k[ks[-1]]
    loss = (_stats([r["final_train_loss"] for r in lo])[0], _stats([r["final_train_loss"] for r in hi])[0])
    auc = (_stats([r["test_auc"] for r in lo])[0], _stats([r["test_auc"] for r in hi])[0])
    loss_ok, auc_ok = loss[1] < loss[0], auc[1] > auc[0]
    return (f"From K={ks[0]} to K={ks[-1]}: final training loss {loss[0]:.3f} -> {loss[1]:.3f} "
            f"({'lower, as in the paper' if loss_ok else 'NOT lower'}); test AUC {auc[0]:.3f} -> {auc[1]:.3f} "
            f"({'higher, as in the paper' if auc_ok else 'NOT higher'}).")


def _cache_verdicts(ks: list[str], by_k: dict[str, list[dict[str, Any]]]) -> list[str]:
    """For each K with a cache arm: its test AUC and wall time against K without it and against K = all."""
    out = []
    for k in (k for k in ks if k.endswith("+cache")):
        base, everything = k.removesuffix(" +cache"), by_k.get("all")
        cache = by_k[k]
        auc = _stats([r["test_auc"] for r in cache])[0]
        line = f"K={k}: test AUC {auc:.3f} in {_stats([r['seconds'] for r in cache])[0]:.0f} s per run"
        if base in by_k:
            line += f"; without the cache {_stats([r['test_auc'] for r in by_k[base]])[0]:.3f}"
        if everything:
            all_auc, all_s = _stats([r["test_auc"] for r in everything])[0], _stats([r["seconds"] for r in everything])[0]
            line += (f"; K=all {all_auc:.3f} in {all_s:.0f} s ({'within' if all_auc - auc <= 0.02 else 'NOT within'} "
                     f"0.02 AUC, at {_stats([r['seconds'] for r in cache])[0] / max(all_s, 1e-9):.2f}x its wall time)")
        out.append(line + ".")
    return [""] + out if out else []


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def e2e_report(out: Path, rows: list[dict[str, Any]], settings: Any) -> Path:
    """Test AUC and test loss per signal and model (seeds as dots, mean ± s.d.), a table, and the verdict."""
    plt = _pyplot()
    signals = list(dict.fromkeys(r["signal"] for r in rows))
    models = ("frozen", "e2e")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "test_auc", "test AUC"), (axes[1], "test_loss", "test loss (cross-entropy)")):
        for j, model in enumerate(models):
            xs, means, sds = [], [], []
            for i, signal in enumerate(signals):
                values = [r[key] for r in rows if r["signal"] == signal and r["model"] == model]
                x = i + (j - 0.5) * 0.3
                ax.scatter([x] * len([v for v in values if v is not None]), [v for v in values if v is not None],
                           color="grey", s=14, zorder=2)
                mean, sd, _ = _stats(values)
                xs.append(x), means.append(mean), sds.append(sd)
            ax.errorbar(xs, means, yerr=sds, fmt="o", capsize=4, color=f"C{j}", zorder=3,
                        label={"e2e": "end-to-end", "frozen": "frozen pretrained"}[model])
        ax.set(title=title, xticks=range(len(signals)), xticklabels=signals)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure = _save(fig, out / "e2e_vs_frozen.png")
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# e2e-vs-frozen: fine-tune the pretrained encoder, or keep it frozen",
        "",
        f"Synthetic cohorts of {settings.slides} slides ({settings.size} px a side at 0.5 mpp; tiles of 32 px at "
        f"1 um/px): `focal` (lesions on about {settings.lesion_fraction:.1%} of the tissue of positive slides, "
        f"contrast {settings.lesion_contrast}) and `diffuse` (strength {settings.diffuse_strength}). Both arms start "
        f"from the same `tinycnn` pretrained with SimCLR on {settings.pretrain.slides} other, unlabelled slides. "
        f"Frozen: features extracted once, gated-attention aggregator on all tiles. End-to-end: encoder and "
        f"aggregator trained jointly on K={settings.tiles_per_slide} tiles per slide per step. Same splits, "
        f"{settings.epochs} epochs, seeds {seeds}; test on all tiles.",
        "",
        f"![e2e vs frozen]({figure.name})",
        "",
        "| signal | model | test AUC | test loss | seconds | runs | e2e wins (AUC) |",
        "|---|---|---|---|---|---|---|",
    ]
    for signal in signals:
        for model in models:
            group = [r for r in rows if r["signal"] == signal and r["model"] == model]
            wins = _wins(rows, signal) if model == "e2e" else ""
            lines.append(f"| {signal} | {model} | {_pm([r['test_auc'] for r in group])} | "
                         f"{_pm([r['test_loss'] for r in group])} | {_stats([r['seconds'] for r in group])[0]:.0f} | "
                         f"{len(group)} | {wins} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Per run (bootstrap 95% CIs):", "",
              "| signal | seed | model | test AUC [95% CI] | test loss [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['signal']} | {r['seed']} | {r['model']} | {_ci(r['test_auc'], r['test_auc_ci'])} | "
                     f"{_ci(r['test_loss'], r['test_loss_ci'])} |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _wins(rows: list[dict[str, Any]], signal: str) -> str:
    """How many seeds end-to-end's test AUC beats the frozen arm's (same seed)."""
    pairs: dict[int, dict[str, float | None]] = defaultdict(dict)
    for r in rows:
        if r["signal"] == signal:
            pairs[r["seed"]][r["model"]] = r["test_auc"]
    done = [p for p in pairs.values() if p.get("e2e") is not None and p.get("frozen") is not None]
    return f"{sum(p['e2e'] > p['frozen'] for p in done)}/{len(done)}"
