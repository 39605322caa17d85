"""Patient-level train / val / test splits: from the CSV's column, by stratified k-fold, or by fractions.

A patient's slides always share a split, so that no tissue of a test patient is seen in training.
Splits are stratified at the patient level on a stratum per patient:

* classification: the patient's class index (the largest one if the patient's slides disagree);
* survival: the event indicator (1 if any of the patient's slides has an event);
* regression: quantile bin of the patient's mean target (rank-based, so ties never break it);
* patients without a target form one extra stratum.

Assignment is deterministic in (cohort content, seed): patients are sorted by id before any shuffle,
so the CSV's row order does not change the split. Stratification never fails: patients are dealt
round-robin (k-fold) or along an evenly interleaved split sequence (fractions) stratum after stratum,
so a class with fewer patients than folds simply lands in fewer folds, and split sizes stay exact.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from fullslide.atomic import atomic_path
from fullslide.data.cohort import SPLIT_NAMES, CohortTable, cell_error, read_csv_rows
from fullslide.errors import CohortError, ConfigError

log = logging.getLogger(__name__)

SplitMethod = Literal["auto", "column", "kfold", "fractions"]
SPLIT_METHODS: tuple[str, ...] = ("auto", "column", "kfold", "fractions")
#: Most quantile bins used to stratify a regression target.
MAX_REGRESSION_BINS = 5


def patient_strata(cohort: CohortTable, n_bins: int = MAX_REGRESSION_BINS) -> dict[str, int]:
    """Patient id -> stratum (see the module docstring); -1 for a patient with no target."""
    groups = cohort.patients()
    strata: dict[str, int] = {}
    if cohort.task == "classification":
        lookup = {c: i for i, c in enumerate(cohort.classes)}
        for pid, ids in groups.items():
            labels = [lookup[r.label] for r in map(cohort.by_id, ids) if r.label is not None]
            strata[pid] = max(labels) if labels else -1
    elif cohort.task == "survival":
        for pid, ids in groups.items():
            events = [r.event for r in map(cohort.by_id, ids) if r.event is not None]
            strata[pid] = max(events) if events else -1
    else:
        means: dict[str, float] = {}
        for pid, ids in groups.items():
            values = [r.target for r in map(cohort.by_id, ids) if r.target is not None]
            if values:
                means[pid] = float(np.mean(values))
            else:
                strata[pid] = -1
        ranked = sorted(means, key=lambda p: (means[p], p))
        bins = max(1, min(n_bins, len(ranked)))
        for rank, pid in enumerate(ranked):
            strata[pid] = rank * bins // len(ranked)
    return strata


def _ordered_by_stratum(strata: Mapping[str, int], rng: np.random.Generator) -> list[str]:
    """Patients grouped by stratum (ascending), shuffled within each stratum."""
    out: list[str] = []
    for s in sorted(set(strata.values())):
        members = sorted(p for p, v in strata.items() if v == s)
        out.extend(members[i] for i in rng.permutation(len(members)))
    return out


def split_counts(n_patients: int, fractions: Sequence[float]) -> list[int]:
    """Patients per split for ``fractions``: largest remainder, then at least one for each non-zero fraction.

    The minimum of one is met while there are enough patients (one per non-zero fraction); it is
    taken from the largest split. With fewer patients, the largest fractions are served first.
    """
    raw = [f * n_patients for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n_patients - sum(counts)]:
        counts[i] += 1
    for i in sorted(range(len(fractions)), key=lambda i: (-fractions[i], i)):
        donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
        if fractions[i] > 0 and counts[i] == 0 and counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _interleaved(counts: Sequence[int]) -> list[int]:
    """``counts[s]`` copies of each s, each spread evenly, so that any stretch holds them about in proportion."""
    marks = [((k + 0.5) / c, s) for s, c in enumerate(counts) for k in range(c)]
    return [s for _, s in sorted(marks)]


def _check_options(method: str, folds: int, fold: int, fractions: Sequence[float]) -> None:
    """ConfigError naming the option that is out of range."""
    if method not in SPLIT_METHODS:
        raise ConfigError(f"split method: unknown '{method}'; choose one of {', '.join(SPLIT_METHODS)}")
    if method == "kfold":
        if not isinstance(folds, int) or folds < 3:
            raise ConfigError(f"folds: must be an integer >= 3 (one test fold, one val fold, the rest train), "
                              f"got {folds}")
        if not isinstance(fold, int) or not 0 <= fold < folds:
            raise ConfigError(f"fold: must be in [0, {folds - 1}], got {fold}")
    if method in ("fractions", "auto"):
        if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions):
            raise ConfigError(f"fractions: need three non-negative numbers (train, val, test), got {list(fractions)}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"fractions: must sum to 1, got {list(fractions)} (sum {sum(fractions):g})")


def resolve_split_method(cohort: CohortTable, method: str) -> str:
    """``auto`` -> ``column`` when any row of the cohort has a split, else ``fractions``; others unchanged.

    Logs which source the splits come from, and warns when a split column is present but not used.
    """
    has_column = any(r.split is not None for r in cohort.records)
    if method == "auto":
        method = "column" if has_column else "fractions"
        if has_column:
            log.info("splits: from the 'split' column of %s", cohort.source)
    elif has_column and method != "column":
        log.warning("the 'split' column of %s is ignored: data.split_method is '%s'", cohort.source, method)
    return method


def assign_splits(
    cohort: CohortTable,
    *,
    method: SplitMethod = "auto",
    folds: int = 5,
    fold: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, str]:
    """Slide id -> "train" / "val" / "test", patient-level and stratified.

    ``auto``: ``column`` when the cohort has a ``split`` column, else ``fractions``. ``column``: the CSV's ``split`` column, which every row must fill. ``kfold``: patients in
    ``folds`` stratified folds; fold ``fold`` is test, fold ``(fold + 1) % folds`` is val, the rest
    train (the same seed gives the same folds for every ``fold``). ``fractions``: train / val / test
    by patient fractions; a fraction may be 0. The CSV's split column is ignored by the last two.
    """
    _check_options(method, folds, fold, fractions)
    if len(cohort) == 0:
        raise CohortError(f"{cohort.source}: no slides to split")
    method = resolve_split_method(cohort, method)
    if method == "column":
        for r in cohort.records:
            if r.split is None:
                raise cell_error(cohort.source, r, "split", f"empty value for slide '{r.slide_id}'; "
                                 "split method 'column' needs a split on every row")
        splits = {r.slide_id: r.split for r in cohort.records if r.split is not None}
        check_no_patient_leak(cohort, splits)
        return splits

    rng = np.random.default_rng(seed)
    n_groups = folds if method == "kfold" else max(1, sum(f > 0 for f in fractions))
    n_patients = len(cohort.patients())
    strata = patient_strata(cohort, n_bins=max(1, min(MAX_REGRESSION_BINS, n_patients // (2 * n_groups))))
    order = _ordered_by_stratum(strata, rng)
    patient_split: dict[str, str] = {}
    if method == "kfold":
        if n_patients < folds:
            raise CohortError(f"{cohort.source}: {n_patients} patient(s), fewer than folds={folds}")
        fold_of_slot = rng.permutation(folds)  # which fold the round-robin deals to first, second, ...
        for i, pid in enumerate(order):
            k = int(fold_of_slot[i % folds])
            patient_split[pid] = "test" if k == fold else "val" if k == (fold + 1) % folds else "train"
    else:
        sequence = _interleaved(split_counts(n_patients, fractions))
        shift = int(rng.integers(n_patients))
        for i, pid in enumerate(order):
            patient_split[pid] = SPLIT_NAMES[sequence[(i + shift) % n_patients]]
    splits = {r.slide_id: patient_split[r.patient_id] for r in cohort.records}
    check_no_patient_leak(cohort, splits)
    return splits


def check_no_patient_leak(cohort: CohortTable, splits: Mapping[str, str]) -> None:
    """CohortError if a patient's slides are in two splits, a split name is unknown or a slide is not in the cohort."""
    seen: dict[str, tuple[str, str]] = {}
    for slide_id, split in splits.items():
        if split not in SPLIT_NAMES:
            raise CohortError(f"{cohort.source}: slide '{slide_id}' has unknown split '{split}'; "
                              f"allowed: {', '.join(SPLIT_NAMES)}")
        pid = cohort.by_id(slide_id).patient_id
        first = seen.setdefault(pid, (split, slide_id))
        if first[0] != split:
            raise CohortError(f"{cohort.source}: patient '{pid}' is in two splits: '{first[0]}' "
                              f"(slide '{first[1]}') and '{split}' (slide '{slide_id}')")


def split_cohort(cohort: CohortTable, splits: Mapping[str, str]) -> dict[str, CohortTable]:
    """Split name -> the sub-table of its slides in cohort order (every split name present, maybe empty)."""
    check_no_patient_leak(cohort, splits)
    return {name: cohort.subset(s for s in cohort.slide_ids if splits.get(s) == name) for name in SPLIT_NAMES}


def write_splits_csv(path: str | Path, cohort: CohortTable, splits: Mapping[str, str]) -> None:
    """Write ``slide_id,patient_id,split`` rows (cohort order) atomically, after checking for leaks."""
    check_no_patient_leak(cohort, splits)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "patient_id", "split"])
    for r in cohort.records:
        if r.slide_id in splits:
            writer.writerow([r.slide_id, r.patient_id, splits[r.slide_id]])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def read_splits_csv(path: str | Path) -> dict[str, str]:
    """Slide id -> split from a splits CSV (``slide_id``, ``split``; ``patient_id`` optional, checked for leaks)."""
    source = Path(path)
    _, rows = read_csv_rows(source, ["slide_id", "split"])
    splits: dict[str, str] = {}
    first_row: dict[str, int] = {}
    patient: dict[str, tuple[str, int]] = {}
    for row in rows:
        slide_id, split = row.cells["slide_id"], row.cells["split"].lower()
        for column in ("slide_id", "split"):
            if not row.cells[column]:
                raise cell_error(source, row, column, "empty value")
        if split not in SPLIT_NAMES:
            raise cell_error(source, row, "split", f"unknown split '{row.cells['split']}'; "
                             f"allowed: {', '.join(SPLIT_NAMES)}")
        if slide_id in splits:
            raise cell_error(source, row, "slide_id",
                             f"duplicate slide id '{slide_id}' (first at row {first_row[slide_id]})")
        pid = row.cells.get("patient_id") or ""
        if pid:
            first = patient.setdefault(pid, (split, row.row))
            if first[0] != split:
                raise cell_error(source, row, "split", f"patient '{pid}' is in split '{split}' here "
                                 f"but in '{first[0]}' at row {first[1]}")
        splits[slide_id] = split
        first_row[slide_id] = row.row
    return splits
