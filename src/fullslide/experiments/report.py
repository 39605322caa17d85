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
        means, lows, highs = [], [], []
        for k in ks:
            values = [float(r[key]) for r in by_k[k] if r[key] is not None]
            mean = _stats(values)[0]
            means.append(mean)
            lows.append(mean - min(values) if values else 0.0)
            highs.append(max(values) - mean if values else 0.0)
        ax.errorbar(x, means, yerr=[lows, highs], marker="o", capsize=4, color="C3", zorder=3,
                    label="mean over seeds, bar: min-max (dots: seeds)")
        ax.set(title=f"{title} against K", xlabel="K (tiles per slide per step; 'all': every tile)", xticks=x,
               xticklabels=ks, ylabel="test AUC" if key == "test_auc" else "cross-entropy")
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


def _range(values: list[float | None], digits: int = 3) -> str:
    """Mean over seeds with the [min, max] of the seeds: a spread that never leaves the metric's range."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return "n/a"
    return f"{sum(xs) / len(xs):.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


ARM_COLOURS = {"frozen": "C0", "e2e": "C3", "e2e-cache": "C1", "e2e-lastN": "C2", "e2e-lora": "C4"}
ARM_LABELS = {"frozen": "frozen", "e2e": "end-to-end", "e2e-cache": "e2e, K+cache", "e2e-lastN": "e2e, last N blocks",
              "e2e-lora": "e2e, LoRA"}


def _arm_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["arch"], r["model"]) for r in rows))


def _arm_name(arch: str, model: str, archs: int) -> str:
    return ARM_LABELS.get(model, model) + (f"\n({arch})" if archs > 1 else "")


def e2e_report(out: Path, rows: list[dict[str, Any]], probes: list[dict[str, Any]], settings: Any) -> Path:
    """Test AUC per seed with its bootstrap 95% CI for every arm, one panel per encoder situation and signal; the
    linear probes before and after fine-tuning; tables and one verdict line per situation, signal and arm."""
    plt = _pyplot()
    situations = list(dict.fromkeys(r["encoder"] for r in rows))
    signals = list(dict.fromkeys(r["signal"] for r in rows))
    arms = _arm_keys(rows)
    n_archs = len({a for a, _ in arms})
    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(len(situations), len(signals), figsize=(1.3 + 1.25 * len(arms) * len(signals),
                                                                       2.2 + 2.6 * len(situations)),
                             squeeze=False, sharey=True)
    for i, situation in enumerate(situations):
        for j, signal in enumerate(signals):
            ax = axes[i][j]
            for x, (arch, model) in enumerate(arms):
                group = sorted((r for r in rows if (r["encoder"], r["signal"], r["arch"], r["model"])
                                == (situation, signal, arch, model)), key=lambda r: r["seed"])
                colour = ARM_COLOURS.get(model, "C7")
                for k, r in enumerate(group):
                    if r["test_auc"] is None:
                        continue
                    xk = x + (k - (len(group) - 1) / 2) * 0.16
                    low, high = (r.get("test_auc_ci") or [None, None])[:2]
                    if low is not None and high is not None:
                        ax.errorbar([xk], [r["test_auc"]], yerr=[[r["test_auc"] - max(0.0, low)],
                                                                  [min(1.0, high) - r["test_auc"]]],
                                    fmt="o", ms=4, capsize=2, color=colour, lw=1)
                    else:
                        ax.plot([xk], [r["test_auc"]], "o", ms=4, color=colour)
                mean = _stats([r["test_auc"] for r in group])[0]
                if math.isfinite(mean):
                    ax.hlines(mean, x - 0.3, x + 0.3, color=colour, lw=2, alpha=0.6)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels([_arm_name(a, m, n_archs) for a, m in arms], fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{situation} encoder, {signal} signal", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
            if j == 0:
                ax.set_ylabel("test AUC")
            if i == len(situations) - 1:
                ax.set_xlabel("arm")
    import textwrap

    title = (f"Test AUC per seed ({', '.join(map(str, seeds))}; left to right) with bootstrap 95% CIs; "
             "bar: mean over seeds; dotted: chance")
    fig.suptitle("\n".join(textwrap.wrap(title, int(14 * fig.get_figwidth()))), fontsize=9)
    figure = _save(fig, out / "e2e_vs_frozen.png")
    probe_figure = _probe_figure(out, probes) if probes else None
    k = settings.tiles_per_slide
    lines = [
        "# e2e-vs-frozen: when does fine-tuning the pretrained encoder end-to-end beat keeping it frozen?",
        "",
        f"Synthetic cohorts of {settings.slides} slides ({settings.size} px a side at 0.5 mpp; tiles of 32 px at "
        f"1 um/px): `focal` (lesions on about {settings.lesion_fraction:.1%} of the tissue of positive slides, "
        f"contrast {settings.lesion_contrast}) and `diffuse` (strength {settings.diffuse_strength}). Encoders "
        f"pretrained with SimCLR on {settings.pretrain.slides} other, unlabelled slides: *in-domain* (half of them "
        "with lesions) and *out-of-domain* (no lesion anywhere). Every arm starts from the same weights, with the same "
        f"splits, gated-attention aggregator, {settings.epochs} epochs and schedule; frozen and end-to-end arms see "
        f"K={'all' if k == 'all' else k} tiles per slide per step, `e2e-cache` K={settings.cache_k} plus the feature "
        f"cache. Seeds {seeds}; test on all tiles of the held-out slides. Learning rates (encoder, aggregator) per "
        f"arm: {', '.join(f'{a} {e:g}/{g:g}' for a, e, g in settings.lrs if any(m == a for _, m in arms))}.",
        "",
        f"![e2e vs frozen]({figure.name})",
        "",
    ]
    if probe_figure:
        lines += [f"![linear probes]({probe_figure.name})", ""]
    lines += ["## Verdicts", ""] + _verdicts(rows) + [
        "", "## Per arm", "",
        "Mean over seeds [min, max]. *Beats frozen*: seeds at which the arm's test AUC is higher than the frozen "
        "arm's (same situation, signal and seed).", "",
        "| encoder | arch | signal | arm | test AUC | test loss | best epoch | seconds | beats frozen |",
        "|---|---|---|---|---|---|---|---|---|"]
    for situation in situations:
        for signal in signals:
            for arch, model in arms:
                group = [r for r in rows if (r["encoder"], r["signal"], r["arch"], r["model"])
                         == (situation, signal, arch, model)]
                if not group:
                    continue
                wins = "" if model == "frozen" else _wins(rows, situation, signal, arch, model)[0]
                lines.append(
                    f"| {situation} | {arch} | {signal} | {model} | {_range([r['test_auc'] for r in group])} | "
                    f"{_range([r['test_loss'] for r in group])} | {_range([r.get('best_epoch') for r in group], 1)} | "
                    f"{_stats([r['seconds'] for r in group])[0]:.0f} | {wins} |")
    if probes:
        lines += ["", "## Linear probes on frozen tile features", "",
                  "Logistic regression on standardised tile features, fitted on the training slides' tiles and scored "
                  "(ROC AUC) on the test slides' tiles. `focal`: lesion tile vs normal tile (synthetic masks); "
                  "`diffuse`: tile of a positive vs a negative slide. *pretrained*: the encoder both arms start "
                  "from; other rows: each end-to-end run's best checkpoint.", "",
                  "| encoder | arch | signal | encoder probed | probe AUC | tiles (train / test) |", "|---|---|---|---|---|---|"]
        for group_key in dict.fromkeys((p["encoder"], p["arch"], p["signal"], p["model"]) for p in probes):
            group = [p for p in probes if (p["encoder"], p["arch"], p["signal"], p["model"]) == group_key]
            lines.append(f"| {group_key[0]} | {group_key[1]} | {group_key[2]} | {group_key[3] or 'pretrained'} | "
                         f"{_range([p['probe_auc'] for p in group])} | {group[0]['train_tiles']} / "
                         f"{group[0]['test_tiles']} |")
    lines += ["", "## Per run (bootstrap 95% CIs)", "",
              "| encoder | arch | signal | seed | arm | test AUC [95% CI] | test loss [95% CI] | best epoch |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['arch']} | {r['signal']} | {r['seed']} | {r['model']} | "
                     f"{_ci(r['test_auc'], r['test_auc_ci'])} | {_ci(r['test_loss'], r['test_loss_ci'])} | "
                     f"{r.get('best_epoch')} |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _probe_figure(out: Path, probes: list[dict[str, Any]]) -> Path:
    """Probe AUC of each pretrained encoder (bar) and of its fine-tuned versions (dots per seed), per signal."""
    plt = _pyplot()
    signals = list(dict.fromkeys(p["signal"] for p in probes))
    encoders = list(dict.fromkeys((p["encoder"], p["arch"]) for p in probes))
    models = list(dict.fromkeys(p["model"] for p in probes if p["model"]))
    fig, axes = plt.subplots(1, len(signals), figsize=(1.5 + 2.2 * len(encoders) * len(signals), 3.6),
                             squeeze=False, sharey=True)
    width = 0.8 / (1 + len(models))
    for ax, signal in zip(axes[0], signals):
        for e, (situation, arch) in enumerate(encoders):
            for m, model in enumerate([None] + models):
                group = [p["probe_auc"] for p in probes if (p["signal"], p["encoder"], p["arch"], p["model"])
                         == (signal, situation, arch, model)]
                if not group:
                    continue
                x = e + (m - len(models) / 2) * width
                colour = "C7" if model is None else ARM_COLOURS.get(model, "C7")
                ax.bar(x, sum(group) / len(group), width * 0.9, color=colour, alpha=0.5,
                       label=("pretrained (before)" if model is None else f"after {ARM_LABELS.get(model, model)}")
                       if e == 0 else None)
                ax.plot([x] * len(group), group, "o", ms=3, color=colour)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(encoders)))
        ax.set_xticklabels([f"{s}\n({a})" for s, a in encoders], fontsize=8)
        ax.set(title=f"{signal}: " + ("lesion vs normal tile" if signal == "focal" else "tile of a positive slide?"),
               xlabel="pretrained encoder", ylim=(0.4, 1.02))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("linear-probe AUC (test tiles)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    return _save(fig, out / "probe.png")


def _wins(rows: list[dict[str, Any]], situation: str, signal: str, arch: str, model: str) -> tuple[str, float, float]:
    """(``"w/n"`` seeds at which ``model`` beats the frozen arm on test AUC, mean AUC difference, mean loss
    difference), same situation, signal, architecture and seed."""
    pairs: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if (r["encoder"], r["signal"], r["arch"]) == (situation, signal, arch) and r["model"] in (model, "frozen"):
            pairs[r["seed"]][r["model"]] = r
    done = [p for p in pairs.values() if p.get(model, {}).get("test_auc") is not None
            and p.get("frozen", {}).get("test_auc") is not None]
    if not done:
        return "0/0", float("nan"), float("nan")
    auc = [p[model]["test_auc"] - p["frozen"]["test_auc"] for p in done]
    loss = [p[model]["test_loss"] - p["frozen"]["test_loss"] for p in done
            if p[model].get("test_loss") is not None and p["frozen"].get("test_loss") is not None]
    return (f"{sum(a > 0 for a in auc)}/{len(done)}", sum(auc) / len(auc),
            sum(loss) / len(loss) if loss else float("nan"))


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per situation, signal and fine-tuned arm: does it beat the frozen arm, by how much?"""
    out = []
    for situation, signal, arch, model in dict.fromkeys((r["encoder"], r["signal"], r["arch"], r["model"])
                                                        for r in rows):
        if model == "frozen":
            continue
        wins, d_auc, d_loss = _wins(rows, situation, signal, arch, model)
        n_win, n = (int(v) for v in wins.split("/"))
        word = ("beats" if n_win == n and n > 0 and d_auc > 0 else
                "does NOT beat" if n_win == 0 else "beats at some seeds only")
        out.append(f"- {situation} encoder, {signal}, {arch} {model} {word} the frozen arm: higher test AUC at {wins} "
                   f"seeds, mean difference {d_auc:+.3f} AUC, {d_loss:+.3f} test loss.")
    return out
