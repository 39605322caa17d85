"""ROC and precision-recall curves from ``predictions.csv`` rows: data files (CSV) and figures (PNG).

Binary tasks get one curve (the second class, e.g. ``1`` or ``tumor``, is the positive one); multi-class tasks one
one-vs-rest curve per class. Rows without a label or with an error are left out. Written by ``eval`` (one split)
and by ``cv`` (each fold, and every fold's test predictions pooled).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fullslide.atomic import atomic_path, atomic_write_text

Curves = dict[str, tuple[np.ndarray, np.ndarray]]  # class -> (binary labels, scores)


def curve_inputs(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> Curves:
    """Per class (binary: the positive class only) the labels (1 = that class) and its predicted probability."""
    usable = [r for r in rows if not r.get("error") and r.get("label", "") != "" and r.get(f"prob_{classes[0]}", "") != ""]
    targets = classes[1:] if len(classes) == 2 else classes
    out: Curves = {}
    for name in targets:
        y = np.array([1 if str(r["label"]) == name else 0 for r in usable], dtype=np.int64)
        s = np.array([float(r[f"prob_{name}"]) for r in usable], dtype=np.float64)
        if 0 < y.sum() < len(y):  # both classes present: the curve exists
            out[str(name)] = (y, s)
    return out


def _roc_pr(y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    fpr, tpr, roc_t = roc_curve(y, s)
    precision, recall, pr_t = precision_recall_curve(y, s)
    return {"fpr": fpr, "tpr": tpr, "roc_thresholds": roc_t, "precision": precision, "recall": recall,
            "pr_thresholds": np.append(pr_t, np.nan), "auc": float(roc_auc_score(y, s)),
            "ap": float(average_precision_score(y, s)), "prevalence": float(y.mean()), "n": int(len(y))}


def write_curve_data(curves: Mapping[str, Mapping[str, Curves]], out_dir: Path) -> tuple[Path, Path]:
    """``roc.csv`` (group, class, fpr, tpr, threshold) and ``pr.csv`` (group, class, recall, precision, threshold)
    for every group (e.g. a fold, or ``pooled``) and class."""
    roc, pr = io.StringIO(), io.StringIO()
    roc_w, pr_w = csv.writer(roc, lineterminator="\n"), csv.writer(pr, lineterminator="\n")
    roc_w.writerow(["group", "class", "fpr", "tpr", "threshold"])
    pr_w.writerow(["group", "class", "recall", "precision", "threshold"])
    for group, by_class in curves.items():
        for name, (y, s) in by_class.items():
            c = _roc_pr(y, s)
            for f, t, th in zip(c["fpr"], c["tpr"], c["roc_thresholds"]):
                roc_w.writerow([group, name, f"{f:.6g}", f"{t:.6g}", f"{th:.6g}"])
            for r, p, th in zip(c["recall"], c["precision"], c["pr_thresholds"]):
                pr_w.writerow([group, name, f"{r:.6g}", f"{p:.6g}", "" if np.isnan(th) else f"{th:.6g}"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "roc.csv", roc.getvalue())
    atomic_write_text(out_dir / "pr.csv", pr.getvalue())
    return out_dir / "roc.csv", out_dir / "pr.csv"


def plot_curves(curves: Mapping[str, Mapping[str, Curves]], out_dir: Path, title: str, *,
                emphasise: str | None = None) -> tuple[Path, Path]:
    """``roc.png`` and ``pr.png``: one line per group and class (AUC / average precision in the legend); the
    ``emphasise`` group (e.g. ``pooled``) drawn thick, the others thin; chance lines dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.2, 4.6))
        prevalences = []
        for i, (group, by_class) in enumerate(curves.items()):
            for j, (name, (y, s)) in enumerate(by_class.items()):
                c = _roc_pr(y, s)
                label = (f"{group}" if len(by_class) == 1 else f"{group}, class {name}") + (
                    f" (AUC {c['auc']:.3f}, n={c['n']})" if kind == "roc" else f" (AP {c['ap']:.3f}, n={c['n']})")
                strong = emphasise is None or group == emphasise
                colour = "black" if group == emphasise and len(by_class) == 1 else f"C{(i + j) % 10}"
                xs, ys = (c["fpr"], c["tpr"]) if kind == "roc" else (c["recall"], c["precision"])
                style = {"drawstyle": "steps-post"} if kind == "pr" else {}  # ROC: straight lines between points
                ax.plot(xs, ys, lw=2.2 if strong else 1.0, alpha=1.0 if strong else 0.55, color=colour, label=label,
                        **style)
                prevalences.append(c["prevalence"])
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
            ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
        else:
            if prevalences and len(set(round(p, 6) for p in prevalences)) == 1:
                ax.axhline(prevalences[0], ls=":", color="grey", lw=1, label=f"chance ({prevalences[0]:.2f})")
            ax.set(xlabel="recall (sensitivity)", ylabel="precision (positive predictive value)")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=f"{title}: {'ROC' if kind == 'roc' else 'precision-recall'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths[0], paths[1]


def write_curves(curves: Mapping[str, Mapping[str, Curves]], out_dir: Path, title: str,
                 emphasise: str | None = None) -> list[Path]:
    """Data and figures; nothing when no group has a curve (e.g. one class only among the labelled slides)."""
    curves = {g: c for g, c in curves.items() if c}
    if not curves:
        return []
    return [*write_curve_data(curves, out_dir), *plot_curves(curves, out_dir, title, emphasise=emphasise)]
