"""Patient-level splits: no leakage over many seeds, stratification, determinism, small cohorts, CSV round trip."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from fullslide.data.cohort import CohortTable, SlideRecord
from fullslide.data.splits import (assign_splits, check_no_patient_leak, patient_strata, read_splits_csv,
                                   split_cohort, split_counts, write_splits_csv)
from fullslide.errors import CohortError, ConfigError

SOURCE = Path("mem.csv")


def make_cohort(n_patients: int, *, positive_fraction: float = 0.3, seed: int = 0, max_slides: int = 3,
                task: str = "classification", n_classes: int = 2) -> CohortTable:
    """A random cohort: 1..max_slides slides per patient; slides of one patient may disagree in label."""
    rng = np.random.default_rng(seed)
    records: list[SlideRecord] = []
    for p in range(n_patients):
        base = int(rng.random() < positive_fraction) if n_classes == 2 else int(rng.integers(n_classes))
        for s in range(int(rng.integers(1, max_slides + 1))):
            label = base if rng.random() > 0.1 else int(rng.integers(n_classes))
            sid, pid = f"p{p:03d}_s{s}", f"p{p:03d}"
            if task == "classification":
                records.append(SlideRecord(sid, Path(sid), pid, label=str(label), row=len(records) + 1))
            elif task == "survival":
                records.append(SlideRecord(sid, Path(sid), pid, time=float(rng.exponential(10)), event=base,
                                           row=len(records) + 1))
            else:
                records.append(SlideRecord(sid, Path(sid), pid, target=float(rng.normal()), row=len(records) + 1))
    classes = tuple(str(c) for c in range(n_classes)) if task == "classification" else ()
    return CohortTable(SOURCE, task, tuple(records), classes)


def patient_splits(cohort: CohortTable, splits: dict[str, str]) -> dict[str, str]:
    """Patient -> split, asserting that all of a patient's slides agree."""
    out: dict[str, str] = {}
    for sid, split in splits.items():
        pid = cohort.by_id(sid).patient_id
        assert out.setdefault(pid, split) == split, f"patient {pid} leaks"
    return out


@pytest.mark.parametrize("method", ["fractions", "kfold"])
def test_no_patient_leak_over_many_seeds(method: str) -> None:
    for seed in range(40):
        cohort = make_cohort(int(np.random.default_rng(seed).integers(5, 60)), seed=seed)
        splits = assign_splits(cohort, method=method, seed=seed, fold=seed % 5)
        assert set(splits) == set(cohort.slide_ids)
        per_patient = patient_splits(cohort, splits)
        assert set(per_patient.values()) == {"train", "val", "test"}  # >= 5 patients: every split is used


def test_fraction_sizes_are_exact_and_stratified() -> None:
    cohort = make_cohort(200, positive_fraction=0.25, seed=3, max_slides=1)
    strata = patient_strata(cohort)
    per_patient = patient_splits(cohort, assign_splits(cohort, fractions=(0.6, 0.2, 0.2), seed=1))
    sizes = collections.Counter(per_patient.values())
    assert sizes == {"train": 120, "val": 40, "test": 40}
    overall = np.mean([strata[p] for p in per_patient])
    for split in ("train", "val", "test"):
        share = np.mean([strata[p] for p, s in per_patient.items() if s == split])
        assert abs(share - overall) <= 1.5 / sizes[split], (split, share, overall)


def test_kfold_rotates_test_and_val_and_balances_classes() -> None:
    cohort = make_cohort(53, positive_fraction=0.3, seed=5)
    strata = patient_strata(cohort)
    test_of: dict[str, int] = {}
    for k in range(5):
        per_patient = patient_splits(cohort, assign_splits(cohort, method="kfold", folds=5, fold=k, seed=2))
        for p, s in per_patient.items():
            if s == "test":
                assert p not in test_of
                test_of[p] = k
        nxt = patient_splits(cohort, assign_splits(cohort, method="kfold", folds=5, fold=(k + 1) % 5, seed=2))
        assert {p for p, s in per_patient.items() if s == "val"} == {p for p, s in nxt.items() if s == "test"}
    assert len(test_of) == 53  # every patient is in exactly one test fold
    sizes = collections.Counter(test_of.values())
    positives = collections.Counter(k for p, k in test_of.items() if strata[p] == 1)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert max(positives[k] for k in range(5)) - min(positives[k] for k in range(5)) <= 1


def test_rare_class_fewer_patients_than_folds_does_not_crash() -> None:
    cohort = make_cohort(12, positive_fraction=0.0, seed=1, max_slides=1)
    records = list(cohort.records)
    records[0] = SlideRecord(records[0].slide_id, records[0].path, records[0].patient_id, label="1")
    rare = CohortTable(SOURCE, "classification", tuple(records), ("0", "1"))
    for k in range(5):
        splits = assign_splits(rare, method="kfold", folds=5, fold=k, seed=0)
        assert len(splits) == 12
    splits = assign_splits(rare, fractions=(0.5, 0.25, 0.25), seed=0)
    assert collections.Counter(splits.values()) == {"train": 6, "val": 3, "test": 3}


@pytest.mark.parametrize(("n", "fractions", "expected"), [
    (3, (0.7, 0.15, 0.15), [1, 1, 1]),
    (4, (0.8, 0.1, 0.1), [2, 1, 1]),
    (2, (0.7, 0.15, 0.15), [1, 1, 0]),
    (10, (1.0, 0.0, 0.0), [10, 0, 0]),
    (7, (0.5, 0.5, 0.0), [4, 3, 0]),
    (100, (0.7, 0.15, 0.15), [70, 15, 15]),
])
def test_split_counts_small_cohorts(n: int, fractions: tuple[float, float, float], expected: list[int]) -> None:
    assert split_counts(n, fractions) == expected


def test_small_cohort_gets_every_split_and_zero_fraction_stays_empty() -> None:
    cohort = make_cohort(3, seed=0)
    assert set(patient_splits(cohort, assign_splits(cohort, seed=4)).values()) == {"train", "val", "test"}
    big = make_cohort(20, seed=0)
    assert "test" not in assign_splits(big, fractions=(0.8, 0.2, 0.0)).values()


def test_deterministic_by_seed_and_independent_of_row_order() -> None:
    cohort = make_cohort(40, seed=9)
    a = assign_splits(cohort, seed=7)
    assert assign_splits(cohort, seed=7) == a
    assert any(assign_splits(cohort, seed=s) != a for s in (8, 9, 10))
    reversed_cohort = CohortTable(SOURCE, "classification", tuple(reversed(cohort.records)), cohort.classes)
    assert assign_splits(reversed_cohort, seed=7) == a
    k = assign_splits(cohort, method="kfold", seed=7)
    assert assign_splits(reversed_cohort, method="kfold", seed=7) == k


def test_survival_stratifies_on_event_and_regression_on_quantiles() -> None:
    surv = make_cohort(100, seed=2, task="survival", positive_fraction=0.4)
    strata = patient_strata(surv)
    assert set(strata.values()) == {0, 1}
    per_patient = patient_splits(surv, assign_splits(surv, method="kfold", seed=0))
    events = collections.Counter(s for p, s in per_patient.items() if strata[p] == 1)
    assert abs(events["test"] - sum(strata.values()) / 5) <= 1
    reg = make_cohort(100, seed=2, task="regression")
    bins = patient_strata(reg, n_bins=4)
    assert collections.Counter(bins.values()) == {0: 25, 1: 25, 2: 25, 3: 25}
    means = {p: np.mean([reg.by_id(s).target for s in ids]) for p, ids in reg.patients().items()}
    assert max(means[p] for p in bins if bins[p] == 0) < min(means[p] for p in bins if bins[p] == 3)
    assert len(patient_splits(reg, assign_splits(reg, seed=0))) == 100


def test_column_method_uses_csv_and_requires_every_row() -> None:
    records = (SlideRecord("a", Path("a"), "P", label="0", split="train", row=1, line=2),
               SlideRecord("b", Path("b"), "P", label="1", split="train", row=2, line=3),
               SlideRecord("c", Path("c"), "Q", label="1", split="test", row=3, line=4))
    cohort = CohortTable(SOURCE, "classification", records, ("0", "1"))
    assert assign_splits(cohort, method="column") == {"a": "train", "b": "train", "c": "test"}
    missing = CohortTable(SOURCE, "classification", records[:2] + (SlideRecord("c", Path("c"), "Q", label="1",
                                                                               row=3, line=4),), ("0", "1"))
    with pytest.raises(CohortError, match=r"mem\.csv: row 3 \(line 4\), column 'split': empty value for slide 'c'"):
        assign_splits(missing, method="column")


def test_kfold_needs_enough_patients_and_options_are_checked() -> None:
    cohort = make_cohort(4, seed=0)
    with pytest.raises(CohortError, match=r"mem\.csv: 4 patient\(s\), fewer than folds=5"):
        assign_splits(cohort, method="kfold", folds=5)
    with pytest.raises(ConfigError, match="split method: unknown 'random'"):
        assign_splits(cohort, method="random")
    with pytest.raises(ConfigError, match="folds: must be an integer >= 3"):
        assign_splits(cohort, method="kfold", folds=2)
    with pytest.raises(ConfigError, match=r"fold: must be in \[0, 3\], got 4"):
        assign_splits(cohort, method="kfold", folds=4, fold=4)
    with pytest.raises(ConfigError, match="fractions: must sum to 1"):
        assign_splits(cohort, fractions=(0.7, 0.2, 0.2))
    with pytest.raises(ConfigError, match="fractions: need three non-negative numbers"):
        assign_splits(cohort, fractions=(1.2, -0.2, 0.0))


def test_check_no_patient_leak_names_patient_and_splits() -> None:
    cohort = make_cohort(5, seed=1, max_slides=1)
    records = cohort.records + (SlideRecord("extra", Path("x"), cohort.records[0].patient_id, label="0"),)
    two = CohortTable(SOURCE, "classification", records, cohort.classes)
    splits = dict.fromkeys(two.slide_ids, "train") | {"extra": "test"}
    pid, first = cohort.records[0].patient_id, records[0].slide_id
    with pytest.raises(CohortError, match=rf"patient '{pid}' is in two splits: 'train' \(slide '{first}'\)"
                                          r" and 'test' \(slide 'extra'\)"):
        check_no_patient_leak(two, splits)
    with pytest.raises(CohortError, match="unknown split 'holdout'"):
        check_no_patient_leak(two, {"extra": "holdout"})
    with pytest.raises(CohortError, match="no slide 'ghost'"):
        check_no_patient_leak(two, {"ghost": "train"})


def test_split_cohort_returns_three_tables() -> None:
    cohort = make_cohort(30, seed=3)
    splits = assign_splits(cohort, seed=3)
    parts = split_cohort(cohort, splits)
    assert sorted(parts) == ["test", "train", "val"]
    assert sum(len(t) for t in parts.values()) == len(cohort)
    assert all(splits[s] == name for name, t in parts.items() for s in t.slide_ids)
    assert parts["train"].classes == cohort.classes


def test_splits_csv_round_trip_and_atomic_write(tmp_path: Path) -> None:
    cohort = make_cohort(25, seed=4)
    splits = assign_splits(cohort, seed=0)
    out = tmp_path / "run" / "splits.csv"
    write_splits_csv(out, cohort, splits)
    assert read_splits_csv(out) == splits
    lines = out.read_text().splitlines()
    assert lines[0] == "slide_id,patient_id,split" and len(lines) == len(cohort) + 1
    assert [p.name for p in out.parent.iterdir()] == ["splits.csv"]  # no temporary file left behind
    multi = next(ids for ids in cohort.patients().values() if len(ids) > 1)
    leaky = splits | {multi[0]: "test" if splits[multi[0]] != "test" else "train"}
    with pytest.raises(CohortError, match="is in two splits"):
        write_splits_csv(out, cohort, leaky)
    assert read_splits_csv(out) == splits  # a refused write leaves the old file as it was


@pytest.mark.parametrize(("text", "message"), [
    ("slide_id,split\na,train\nb,holdout\n", r"row 2 \(line 3\), column 'split': unknown split 'holdout'"),
    ("slide_id,split\na,train\na,val\n", r"row 2 \(line 3\), column 'slide_id': duplicate slide id 'a'"),
    ("slide_id,split\na,\n", r"row 1 \(line 2\), column 'split': empty value"),
    ("slide_id,patient_id,split\na,P,train\nb,P,test\n",
     r"row 2 \(line 3\), column 'split': patient 'P' is in split 'test' here but in 'train' at row 1"),
    ("slide,split\na,train\n", r"missing column\(s\) 'slide_id'"),
])
def test_read_splits_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "splits.csv"
    path.write_text(text)
    with pytest.raises(CohortError, match=r"splits\.csv: " + message if "missing" in message else message):
        read_splits_csv(path)
