"""The demo's ``report.md``: metrics table, loss / validation curves (PNG), heatmaps, lesion localisation."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from fullslide.atomic import atomic_path, atomic_write_text


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(fh)]


def plot_curves(runs: dict[str, Path], out: Path, metric: str = "val_auc") -> Path:
    """Training loss and validation ``metric`` per epoch for each run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run_dir in runs.items():
        rows = read_metrics_csv(run_dir / "metrics.csv")
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o", label=name)
        axes[1].plot(epochs, [r.get("val_loss", float("nan")) for r in rows], marker="o", label=name)
        axes[2].plot(epochs, [r.get(metric, float("nan")) for r in rows], marker="o", label=name)
    name = metric.removeprefix("val_")
    for ax, title, ylabel in zip(axes, ("training loss", "validation loss", f"validation {name}"),
                                 ("cross-entropy (mean over the epoch's steps)", "cross-entropy", name.upper()
                                  if name == "auc" else name)):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    if name in ("auc", "accuracy", "balanced_accuracy", "c_index"):
        axes[2].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    text = f"{m['value']:.3f}" if abs(m["value"]) >= 0.01 or m["value"] == 0 else f"{m['value']:.2e}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        text += f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    return text


def write_report(
    path: Path,
    *,
    title: str,
    intro: str,
    metrics: dict[str, dict[str, Any]],
    metric_names: Sequence[str],
    verdict: str,
    curves: Path,
    localisation: list[dict[str, Any]],
    heatmaps: list[tuple[str, Path]],
    settings: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    """Markdown report; image links are relative to the report's folder."""
    base = path.parent
    lines = [f"# {title}", "", intro, "", "## Test metrics (95% bootstrap CI, patient-level resampling)", ""]
    lines.append("| model | " + " | ".join(metric_names) + " |")
    lines.append("|---|" + "---|" * len(metric_names))
    for model, m in metrics.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(m.get(k)) for k in metric_names) + " |")
    lines += ["", f"**{verdict}**", "", "## Curves", "", f"![curves]({curves.relative_to(base)})", ""]
    if localisation:
        lines += ["## Do the heatmaps find the lesions?", "",
                  "For each positive test slide: the share of lesion tiles (>= 25% lesion) among the top-attention "
                  "tiles (as many as there are lesion tiles) against their share among all tiles. Enrichment > 1 "
                  "means attention concentrates on the lesion foci.", "",
                  "| model | slide | lesion tiles | share of all tiles | share of top-attention tiles | enrichment |",
                  "|---|---|---|---|---|---|"]
        for row in localisation:
            lines.append(f"| {row['model']} | {row['slide_id']} | {row['lesion_tiles']} | {row['base_share']:.3f} | "
                         f"{row['top_share']:.3f} | {row['enrichment']:.1f}x |")
        lines.append("")
        for model in dict.fromkeys(r["model"] for r in localisation):
            mine = [r for r in localisation if r["model"] == model]
            lines.append(f"- {model}: lesion tiles make up {sum(r['top_share'] for r in mine) / len(mine):.0%} of the "
                         f"top-attention tiles against {sum(r['base_share'] for r in mine) / len(mine):.1%} of all "
                         f"tiles (mean over {len(mine)} positive test slides)")
        lines.append("")
    if heatmaps:
        lines += ["## Heatmaps (attention rank over the thumbnail; GeoJSON beside each PNG opens in QuPath)", ""]
        for caption, image in heatmaps:
            lines += [f"**{caption}**", "", f"![{caption}]({image.relative_to(base)})", ""]
    lines += ["## Settings", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += ["", "## Timings (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
