"""Slide-level losses for the three tasks, and how model outputs turn into saved predictions.

The engine calls ``loss_fn(logits, targets)`` once on the logits of every slide in the step, with
``targets`` a tensor built from rows of :meth:`fullslide.data.cohort.CohortTable.targets`:

* classification: logits ``[N, C]``, targets int64 ``[N]`` -> cross-entropy (optionally class-weighted);
* survival: logits ``[N, 1]`` (risk = ``logits[:, 0]``, higher = earlier event), targets ``[N, 2]``
  (time, event) -> negative Cox partial log-likelihood, Breslow ties;
* regression: logits ``[N, 1]``, targets float ``[N]`` -> MSE (or L1).

The Cox likelihood compares slides *within* the step, so a survival step needs several slides of
which at least one has an event; a step without events gives a loss of exactly 0 (still connected
to the graph, so every rank runs the same backward).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fullslide.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TASKS = ("classification", "survival", "regression")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for a numerically safe loss; float32/float64 kept (gradcheck needs float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def n_outputs(task: str, n_classes: int = 0) -> int:
    """Model output width: ``n_classes`` for classification (>= 2), 1 for survival and regression."""
    if task == "classification":
        if n_classes < 2:
            raise ConfigError(f"n_classes: classification needs at least 2 classes, got {n_classes}")
        return n_classes
    if task in ("survival", "regression"):
        return 1
    raise ConfigError(f"task: unknown task '{task}'; choose one of {', '.join(TASKS)}")


def balanced_class_weights(labels: Sequence[int] | np.ndarray, n_classes: int) -> list[float]:
    """Weights ``N / (n_classes * count_c)`` (scikit-learn's "balanced"), so every class weighs the same in total.

    A class without any slide gets weight 0.0: it never appears as a target, and an infinite weight
    would poison the weighted mean.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ConfigError(f"class_weights: labels must be class indices in [0, {n_classes - 1}]")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return [float(y.size / (n_classes * c)) if c > 0 else 0.0 for c in counts]


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events (Cox, JRSS-B 1972).

    For each event i: ``-(risk_i - log sum_{j: time_j >= time_i} exp(risk_j))``; tied event times
    share one risk set (Breslow). Builds an ``[N, N]`` at-risk mask, fine for the slides of one step.
    With no event the sum is empty and the result is ``0 * risk.sum()``-like: zero, with zero gradients.
    """
    risk = _upcast(risk)  # [N]; log-sum-exp in at least float32, even under bf16 autocast
    time, event = time.to(risk), event.to(risk)
    at_risk = time[None, :] >= time[:, None]  # [N, N]: row i's risk set
    log_denominator = risk[None, :].masked_fill(~at_risk, float("-inf")).logsumexp(dim=1)  # [N], finite (j = i)
    per_slide = event * (log_denominator - risk)  # [N]; censored slides contribute only through risk sets
    return per_slide.sum() / event.sum().clamp(min=1.0)  # no host sync: an all-censored step divides 0 by 1


def make_loss(
    task: str,
    *,
    n_classes: int = 0,
    class_weights: Sequence[float] | None = None,
    regression_loss: Literal["mse", "l1"] = "mse",
) -> LossFn:
    """The loss for ``task`` as ``loss_fn(logits [N, n_outputs], targets) -> scalar`` (see the module docstring).

    ``class_weights`` (classification only): one non-negative weight per class, e.g. from
    :func:`balanced_class_weights`; the loss is then the weighted mean, as in ``F.cross_entropy``.
    """
    width = n_outputs(task, n_classes)
    if class_weights is not None:
        if task != "classification":
            raise ConfigError(f"class_weights: only applies to classification, not {task}")
        weights = [float(w) for w in class_weights]
        if len(weights) != width or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ConfigError(f"class_weights: need {width} finite non-negative weights, not all 0; got {weights}")
    if regression_loss not in ("mse", "l1"):
        raise ConfigError(f"regression_loss: unknown '{regression_loss}'; choose mse or l1")

    def check(logits: torch.Tensor, targets: torch.Tensor, target_shape: tuple[int, ...]) -> None:
        if logits.ndim != 2 or logits.shape[1] != width:
            raise ValueError(f"{task} loss: logits must be [N, {width}], got {list(logits.shape)}")
        if tuple(targets.shape) != (logits.shape[0], *target_shape):
            raise ValueError(f"{task} loss: targets must be {[logits.shape[0], *target_shape]}, "
                             f"got {list(targets.shape)}")

    def classification(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check(logits, targets, ())
        logits = _upcast(logits)
        weight = None if class_weights is None else torch.tensor(weights, dtype=logits.dtype, device=logits.device)
        return F.cross_entropy(logits, targets.long(), weight=weight)

    def survival(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check(logits, targets, (2,))
        return cox_loss(logits[:, 0], targets[:, 0], targets[:, 1])

    def regression(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check(logits, targets, ())
        fn = F.mse_loss if regression_loss == "mse" else F.l1_loss
        value = _upcast(logits[:, 0])  # [N]
        return fn(value, targets.to(value))

    return {"classification": classification, "survival": survival, "regression": regression}[task]


def predictions(task: str, logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """What the predictions CSV stores: softmax probabilities ``[N, C]``, risk ``[N]`` or value ``[N]`` (float64)."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown task '{task}'; choose one of {', '.join(TASKS)}")
    x = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"predictions: logits must be [N, outputs], got {list(x.shape)}")
    if task == "classification":
        return torch.softmax(x, dim=1).numpy()
    return x[:, 0].numpy()
