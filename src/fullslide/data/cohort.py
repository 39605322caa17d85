"""The cohort table: one CSV row per slide, validated once, then read-only.

Columns: ``slide_id``, ``path`` and the task's target columns are required; ``patient_id``,
``split`` and ``mpp`` are optional; any other column is ignored. Targets by task:

* classification: ``label_column`` (default ``label``), read as a string class name;
* survival: ``time`` (finite, >= 0) and ``event`` (0 = censored, 1 = event);
* regression: ``label_column`` as a finite number.

Relative paths resolve against the CSV's folder. Without a ``patient_id`` column (or with an
empty cell) a slide is its own patient, so splits cannot separate it from anything.

Every error is a :class:`CohortError` whose one-line message names the file, the data row
(1-based, header excluded, blank rows not counted) with its CSV line number, and the column:
``cohort.csv: row 3 (line 4), column 'label': empty value``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Iterable, Literal, Sequence, get_args

import numpy as np

from fullslide.errors import CohortError, ConfigError
from fullslide.slides.inputs import slide_id_problem

Task = Literal["classification", "survival", "regression"]
TASKS: tuple[str, ...] = get_args(Task)
#: Split names a cohort's ``split`` column may hold (case-insensitive).
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


#: Label texts that mean "no label" in exported tables (R, pandas, Excel, LIMS exports): refused, never a class.
MISSING_LABELS = frozenset({"na", "n/a", "nan", "none", "null", "missing", "?", "#n/a"})


@dataclasses.dataclass(frozen=True)
class SlideRecord:
    """One validated slide row. Only the fields of the cohort's task are set; the others are None."""

    slide_id: str
    path: Path
    patient_id: str
    label: str | None = None
    split: str | None = None
    time: float | None = None
    event: int | None = None
    target: float | None = None
    mpp: float | None = None
    row: int = 0  # 1-based data row in the source CSV (0: not read from a CSV)
    line: int = 0  # its line number in the CSV


@dataclasses.dataclass(frozen=True)
class CsvRow:
    """One non-blank data row of a CSV: its 1-based data row, its line number and its cells by column."""

    row: int
    line: int
    cells: dict[str, str]


def cell_error(source: str | Path, row: CsvRow | SlideRecord, column: str, cause: str) -> CohortError:
    """A CohortError in the one house format: ``file: row R (line L), column 'C': cause``."""
    return CohortError(f"{source}: row {row.row} (line {row.line}), column '{column}': {cause}")


def read_csv_rows(path: str | Path, required: Sequence[str]) -> tuple[list[str], list[CsvRow]]:
    """Read a comma-separated UTF-8 file into its header and rows, checking the header names ``required``.

    Cells and header names are stripped of surrounding whitespace; blank rows (including rows of
    empty cells, as spreadsheet exports leave) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: CSV file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            numbered = [(reader.line_num, r) for r in reader]  # line_num: the row's (last) line
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise CohortError(f"{path}: not a valid CSV file ({exc})") from None
    numbered = [(n, r) for n, r in numbered if any(c.strip() for c in r)]
    if not numbered:
        raise CohortError(f"{path}: empty file (no header row)")
    header_line, header_raw = numbered[0]
    header = [h.strip() for h in header_raw]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise CohortError(f"{path}: line {header_line}: duplicate column(s) {', '.join(repr(d) for d in dupes)}")
    missing = [c for c in required if c not in header]
    if missing:
        hint = " (is it comma-separated?)" if len(header) == 1 and re.search(r"[;\t|]", header[0]) else ""
        raise CohortError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                          f"found {', '.join(repr(h) for h in header)}{hint}")
    rows: list[CsvRow] = []
    for i, (line, cells) in enumerate(numbered[1:], start=1):
        if len(cells) != len(header):
            raise CohortError(f"{path}: row {i} (line {line}): {len(cells)} fields but the header has {len(header)}")
        # slide ids are kept as written (never rewritten: one with spaces around is refused, not trimmed)
        rows.append(CsvRow(i, line, {h: c if h == "slide_id" else c.strip() for h, c in zip(header, cells, strict=True)}))
    return header, rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _natural_key(name: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Natural order: digit runs compare as integers, so "g2" < "g10"."""
    parts = [p for p in re.split(r"(\d+)", name) if p]
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts), name


def sort_classes(labels: Iterable[str]) -> list[str]:
    """The distinct labels in numeric-aware order: all-numeric sets by value ("2" < "10"), others naturally.

    Two spellings of one number ("1" and "1.0") are an error: they would silently become two classes.
    """
    unique = set(labels)
    numeric = all(_is_number(c) for c in unique)
    ordered = sorted(unique, key=lambda c: (float(c), c)) if numeric else sorted(unique, key=_natural_key)
    if numeric:
        for a, b in itertools.pairwise(ordered):
            if float(a) == float(b):
                raise CohortError(f"labels '{a}' and '{b}' are the same number; write each class one way")
    return ordered


def _number(source: Path, row: CsvRow, column: str) -> float:
    """The cell as a finite float, or a CohortError naming it."""
    text = row.cells[column]
    try:
        value = float(text)
    except ValueError:
        raise cell_error(source, row, column, f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise cell_error(source, row, column, f"'{text}' is not a finite number")
    return value


@dataclasses.dataclass(frozen=True)
class CohortTable:
    """A validated cohort: its source CSV, task, slide records (CSV order) and, for classification, class names.

    ``classes`` is the class list that ``targets()`` indexes; a subset keeps its parent's classes so
    that indices mean the same thing in every split.
    """

    source: Path
    task: Task
    records: tuple[SlideRecord, ...]
    classes: tuple[str, ...] = ()
    _index: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task: unknown task '{self.task}'; choose one of {', '.join(TASKS)}")
        index: dict[str, int] = {}
        for i, r in enumerate(self.records):
            if r.slide_id in index:
                raise CohortError(f"{self.source}: duplicate slide id '{r.slide_id}'")
            index[r.slide_id] = i
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        task: Task = "classification",
        label_column: str = "label",
        classes: Sequence[str] | None = None,
        check_paths: bool = True,
        require_labels: bool = True,
    ) -> CohortTable:
        """Read and validate a cohort CSV.

        ``classes`` (classification only) fixes the class list, e.g. a trained run's, and makes any
        other label an error; otherwise the classes are the sorted distinct labels. With
        ``require_labels=False`` (prediction on new slides) target columns may be absent or empty.
        ``check_paths`` makes a missing slide file an error.
        """
        if task not in TASKS:
            raise ConfigError(f"task: unknown task '{task}'; choose one of {', '.join(TASKS)}")
        if classes is not None:
            if task != "classification":
                raise ConfigError(f"classes: only applies to classification, not {task}")
            if len(classes) == 0 or len(set(classes)) != len(classes) or any(not str(c).strip() for c in classes):
                raise ConfigError(f"classes: must be distinct non-empty names, got {list(classes)}")
        source = Path(path)
        target_columns = ["time", "event"] if task == "survival" else [label_column]
        required = ["slide_id", "path"] + (target_columns if require_labels else [])
        _, rows = read_csv_rows(source, required)
        if not rows:
            raise CohortError(f"{source}: no slide rows after the header")
        base = source.resolve().parent
        records: list[SlideRecord] = []
        first_row: dict[str, CsvRow] = {}
        patient_split: dict[str, tuple[str, CsvRow]] = {}
        for row in rows:
            record = _parse_row(source, base, row, task, label_column, classes, check_paths, require_labels)
            if record.slide_id in first_row:
                raise cell_error(source, row, "slide_id", f"duplicate slide id '{record.slide_id}' "
                                 f"(first at row {first_row[record.slide_id].row})")
            first_row[record.slide_id] = row
            if record.split is not None:
                seen = patient_split.setdefault(record.patient_id, (record.split, row))
                if seen[0] != record.split:
                    raise cell_error(source, row, "split", f"patient '{record.patient_id}' is in split "
                                     f"'{record.split}' here but in '{seen[0]}' at row {seen[1].row}")
            records.append(record)
        if task != "classification":
            names: tuple[str, ...] = ()
        elif classes is not None:
            names = tuple(str(c) for c in classes)
        else:
            labels = [r.label for r in records if r.label is not None]
            try:
                names = tuple(sort_classes(labels))
            except CohortError as exc:
                raise CohortError(f"{source}: column '{label_column}': {exc}") from None
        return cls(source=source, task=task, records=tuple(records), classes=names)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def slide_ids(self) -> list[str]:
        """Slide ids in table order."""
        return [r.slide_id for r in self.records]

    @property
    def labelled(self) -> bool:
        """Whether every slide has its task's target, so that ``targets()`` is defined."""
        return all(_has_target(self.task, r) for r in self.records)

    def by_id(self, slide_id: str) -> SlideRecord:
        """The record of ``slide_id``; CohortError if the table has no such slide."""
        try:
            return self.records[self._index[slide_id]]
        except KeyError:
            raise CohortError(f"{self.source}: no slide '{slide_id}' in the cohort") from None

    def patients(self) -> dict[str, list[str]]:
        """Patient id -> its slide ids, both in table order."""
        out: dict[str, list[str]] = {}
        for r in self.records:
            out.setdefault(r.patient_id, []).append(r.slide_id)
        return out

    def targets(self) -> np.ndarray:
        """Training targets in table order.

        classification: int64 class indices ``[N]``; survival: float64 ``[N, 2]`` (time, event);
        regression: float64 ``[N]``. CohortError names the first slide without a target.
        """
        for r in self.records:
            if not _has_target(self.task, r):
                raise CohortError(f"{self.source}: row {r.row} (line {r.line}): slide '{r.slide_id}' has no "
                                  f"{self.task} target")
        if self.task == "classification":
            lookup = {c: i for i, c in enumerate(self.classes)}
            return np.array([lookup[r.label] for r in self.records], dtype=np.int64)  # type: ignore[index]
        if self.task == "survival":
            return np.array([[r.time, r.event] for r in self.records], dtype=np.float64).reshape(-1, 2)
        return np.array([r.target for r in self.records], dtype=np.float64)

    def subset(self, slide_ids: Iterable[str]) -> CohortTable:
        """A table of the given slides, in the given order, keeping this table's classes."""
        ids = list(slide_ids)
        if len(set(ids)) != len(ids):
            dupes = sorted({s for s in ids if ids.count(s) > 1})
            raise CohortError(f"{self.source}: subset names slide(s) {', '.join(dupes)} more than once")
        return CohortTable(source=self.source, task=self.task, records=tuple(self.by_id(s) for s in ids),
                           classes=self.classes)


def _has_target(task: str, r: SlideRecord) -> bool:
    if task == "classification":
        return r.label is not None
    if task == "survival":
        return r.time is not None and r.event is not None
    return r.target is not None


def _parse_row(
    source: Path, base: Path, row: CsvRow, task: str, label_column: str,
    classes: Sequence[str] | None, check_paths: bool, require_labels: bool,
) -> SlideRecord:
    """Validate one CSV row into a SlideRecord (errors name the row and column)."""
    cells = row.cells
    for column in ("slide_id", "path"):
        if not cells[column]:
            raise cell_error(source, row, column, "empty value")
    slide_id = cells["slide_id"]
    problem = slide_id_problem(slide_id)
    if problem:
        raise cell_error(source, row, "slide_id", problem)
    path = Path(cells["path"]).expanduser()
    path = path if path.is_absolute() else base / path
    if check_paths and not path.exists():
        raise cell_error(source, row, "path", f"file not found: {path}")
    patient_id = cells.get("patient_id") or slide_id

    split: str | None = None
    if cells.get("split"):
        split = cells["split"].lower()
        if split not in SPLIT_NAMES:
            raise cell_error(source, row, "split", f"unknown split '{cells['split']}'; "
                             f"allowed: {', '.join(SPLIT_NAMES)}")
    mpp: float | None = None
    if cells.get("mpp"):
        mpp = _number(source, row, "mpp")
        if mpp <= 0:
            raise cell_error(source, row, "mpp", f"must be > 0, got {cells['mpp']}")

    target_columns = ["time", "event"] if task == "survival" else [label_column]
    present = [c for c in target_columns if cells.get(c)]
    if len(present) < len(target_columns):
        if require_labels:
            column = next(c for c in target_columns if not cells.get(c))
            raise cell_error(source, row, column, "empty value")
        if present:  # survival with only one of time/event
            column = next(c for c in target_columns if not cells.get(c))
            raise cell_error(source, row, column, f"empty value while '{present[0]}' is given")
        return SlideRecord(slide_id, path, patient_id, split=split, mpp=mpp, row=row.row, line=row.line)

    if task == "classification":
        label = cells[label_column]
        if label.lower() in MISSING_LABELS:
            raise cell_error(source, row, label_column, f"'{label}' means a missing label; give the slide's label or "
                             "leave it out of the cohort (an unlabelled slide can still be predicted)")
        if classes is not None and label not in classes:
            raise cell_error(source, row, label_column, f"unknown label '{label}'; "
                             f"known classes: {', '.join(map(str, classes))}")
        return SlideRecord(slide_id, path, patient_id, label=label, split=split, mpp=mpp, row=row.row, line=row.line)
    if task == "survival":
        time = _number(source, row, "time")
        if time < 0:
            raise cell_error(source, row, "time", f"must be >= 0, got {cells['time']}")
        event = _number(source, row, "event")
        if event not in (0.0, 1.0):
            raise cell_error(source, row, "event", f"must be 0 (censored) or 1 (event), got '{cells['event']}'")
        return SlideRecord(slide_id, path, patient_id, split=split, time=time, event=int(event), mpp=mpp,
                           row=row.row, line=row.line)
    target = _number(source, row, label_column)
    return SlideRecord(slide_id, path, patient_id, split=split, target=target, mpp=mpp, row=row.row, line=row.line)
