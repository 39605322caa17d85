"""Turn ``tile`` inputs (slide files, folders, CSV files) into one list of slide jobs.

A CSV needs a ``path`` column (``slide_id`` and ``mpp`` are optional); relative paths resolve
against the CSV's folder. An input that cannot be used becomes a one-line error for that input
only, so the other slides are still processed.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path

from fullslide.errors import CohortError, FullslideError, SlideError
from fullslide.slides.dicom import default_slide_id, dicom_instances, is_dicom_file, maybe_dicom
from fullslide.slides.open import SLIDE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """One slide to process: where it is, its id (output file stem) and an optional mpp."""

    path: Path
    slide_id: str
    mpp: float | None = None


@dataclasses.dataclass(frozen=True)
class InputError:
    """An input that produced no job; ``message`` is one line naming the file and the cause."""

    path: Path
    message: str


#: Longest slide id in bytes: file systems allow 255-byte names, and outputs append up to ~20 bytes to the id.
MAX_ID_BYTES = 200


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name output files (``{out}/patches/{slide_id}.h5``, heatmaps, features), or None.

    Output files are named after slide ids, so an id must stay inside its folder: no path separators, not
    ``.`` or ``..``, no control characters. Such ids are refused, never rewritten, so that a file name always
    equals its slide id.
    """
    if not slide_id.strip():
        return "is empty"
    if slide_id != slide_id.strip():
        return f"{slide_id!r} has leading or trailing spaces (ids are never rewritten: remove them)"
    if len(slide_id.encode("utf-8")) > MAX_ID_BYTES:
        return (f"'{slide_id[:40]}...' is {len(slide_id.encode('utf-8'))} bytes long; output files are named after "
                f"slide ids (e.g. '{{id}}_attention.png'), so at most {MAX_ID_BYTES} bytes fit a file name")
    if "/" in slide_id or "\\" in slide_id:
        return f"'{slide_id}' contains a path separator (output files are named after slide ids)"
    if slide_id in (".", ".."):
        return f"'{slide_id}' is not a file name"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in slide_id):
        return f"{slide_id!r} contains a control character"
    return None


def collect_jobs(inputs: Iterable[str | Path], *, mpp: float | None = None) -> tuple[list[SlideJob], list[InputError]]:
    """Expand slide paths, folders and CSV files into jobs (in order), plus per-input errors.

    ``mpp`` applies to every slide without an ``mpp`` CSV value. Duplicate slide ids are errors
    for the later occurrences, since they would write the same output files.
    """
    jobs: list[SlideJob] = []
    errors: list[InputError] = []
    for item in inputs:
        path = Path(item)
        try:
            if path.is_dir():
                found = slides_in_folder(path)
                if not found:
                    raise SlideError(path, f"folder holds no slide files ({' '.join(SLIDE_SUFFIXES)}) and no DICOM "
                                           "slide folders")
                for p in found:  # one unusable name never stops the folder's other slides
                    slide_id = default_slide_id(p)
                    if problem := slide_id_problem(slide_id):
                        errors.append(InputError(p, f"{p}: slide id from the file name {problem}; list it in a CSV "
                                                    "with a slide_id column"))
                    else:
                        jobs.append(SlideJob(p, slide_id, mpp))
            elif path.suffix.lower() == ".csv":
                jobs.extend(read_slide_csv(path, default_mpp=mpp))
            else:
                slide_id = default_slide_id(path)
                if problem := slide_id_problem(slide_id):
                    raise SlideError(path, f"slide id from the file name {problem}; list it in a CSV with a "
                                           "slide_id column")
                jobs.append(SlideJob(path, slide_id, mpp))
        except FullslideError as exc:
            errors.append(InputError(path, str(exc)))
    unique: list[SlideJob] = []
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.slide_id in seen:
            errors.append(
                InputError(
                    job.path,
                    f"{job.path}: slide_id '{job.slide_id}' is already used by {seen[job.slide_id]}; "
                    "give distinct ids with a slide_id column in a CSV",
                )
            )
            continue
        seen[job.slide_id] = job.path
        unique.append(job)
    return unique, errors


def slides_in_folder(folder: Path) -> list[Path]:
    """The slides under ``folder``: slide files, and each folder of DICOM instances as one slide (the folder).

    ``folder`` itself is one slide when it holds DICOM instances. DICOM files are found by suffix (``.dcm``) or,
    for files without a suffix, by content.
    """
    if dicom_instances(folder):
        return [folder]
    slides: set[Path] = set()
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if maybe_dicom(p) and is_dicom_file(p):
            slides.add(p.parent)
        elif p.suffix.lower() in SLIDE_SUFFIXES:
            slides.add(p)
    return sorted(slides)


def read_slide_csv(csv_path: Path, *, default_mpp: float | None = None) -> list[SlideJob]:
    """Jobs from a CSV with a ``path`` column (optional ``slide_id``, ``mpp``)."""
    if not csv_path.is_file():
        raise CohortError(f"{csv_path}: CSV file not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in columns:
                raise CohortError(
                    f"{csv_path}: no 'path' column (columns: {', '.join(columns) or 'none'}); "
                    "the CSV needs a 'path' column, optionally 'slide_id' and 'mpp'"
                )
            rows = [{(k or "").strip(): (v or "") if (k or "").strip() == "slide_id" else (v or "").strip()
                     for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"{csv_path}: cannot read CSV ({exc})") from exc
    jobs = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise CohortError(f"{csv_path}: line {line}: empty 'path'")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        slide_id = row.get("slide_id") or default_slide_id(path)
        problem = slide_id_problem(slide_id)
        if problem:
            raise CohortError(f"{csv_path}: line {line}: column 'slide_id': {problem}")
        jobs.append(SlideJob(path, slide_id, _mpp(row.get("mpp"), csv_path, line, default_mpp)))
    return jobs


def _mpp(text: str | None, csv_path: Path, line: int, default: float | None) -> float | None:
    """The CSV's mpp value for a row, or the default when the cell is empty."""
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise CohortError(f"{csv_path}: line {line}: mpp must be a positive number, got {text!r}")
    return value
