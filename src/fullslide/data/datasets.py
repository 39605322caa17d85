"""Cohort CSVs for public datasets, built from each dataset's published folder layout and label files.

``fullslide cohort camelyon16|tcga|panda ROOT --out cohort.csv`` writes the cohort table ``train`` reads
(``slide_id``, ``path``, ``label``, ``patient_id``, optional ``split`` and extra columns), paths relative to the CSV.
What each recipe relies on (from the datasets' own documentation):

* **CAMELYON16** (Bejnordi et al., JAMA 2017; camelyon16.grand-challenge.org): ``training/normal/normal_NNN.tif``,
  ``training/tumor/tumor_NNN.tif``, ``testing/images/test_NNN.tif`` and ``testing/reference.csv`` (one line per test
  slide: name, ``Tumor`` or ``Normal``, then the metastasis type). Label ``tumor``/``normal``; the official test set
  is ``split=test``, the training slides are dealt into ``train``/``val`` (stratified, seeded). Slides are from
  different patients as far as the release says, so each slide is its own patient.
* **TCGA** (GDC download: ``ROOT/<file uuid>/<barcode>.<uuid>.svs``, or slides directly under ROOT): one row per
  *diagnostic* slide (``DX`` section in the barcode; frozen ``TS``/``BS`` sections are skipped unless
  ``--all-sections``); ``slide_id`` = the barcode (``TCGA-05-4244-01Z-00-DX1``), ``patient_id`` = its first three
  fields (``TCGA-05-4244``), ``sample_type`` = the two digits of the fourth (01 primary tumour, 11 normal tissue).
  Labels are study-specific: ``--labels FILE.csv`` joins a table keyed by patient (``patient_id``, ``case_id``,
  ``case_submitter_id`` or ``bcr_patient_barcode``) or by slide (``slide_id``), taking ``--label-column``.
* **PANDA** (Bulten et al., Nat Med 2022; the Kaggle release): ``train.csv`` (``image_id``, ``data_provider``,
  ``isup_grade``, ``gleason_score``) and ``train_images/<image_id>.tiff``. Label = ISUP grade 0-5, ``provider`` and
  ``gleason_score`` as columns. Patient ids are not released: each biopsy is its own patient (say so in a paper).

Every problem is one line naming the file (or folder) and the cause; a listed slide whose file is missing is
an error, never a silent drop (``--skip-missing`` lists them and goes on).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fullslide.atomic import atomic_write_text
from fullslide.errors import CohortError

log = logging.getLogger("fullslide.cohort")
DATASETS = ("camelyon16", "tcga", "panda")
TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(\d{2})[A-Z]-\d{2}-([A-Z]{2})(\d+)", re.IGNORECASE)
TCGA_SUFFIXES = (".svs", ".tif", ".tiff")
PATIENT_KEYS = ("patient_id", "case_submitter_id", "bcr_patient_barcode", "case_id", "submitter_id")


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to the CSV's folder when it can be (a portable cohort), else absolute."""
    import os

    return os.path.relpath(path.resolve(), out.resolve().parent)


def _write(out: Path, columns: Sequence[str], rows: list[dict[str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buffer.getvalue())
    return out


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CohortError(f"{path}: not found ({what})")
    return path


def _train_val(slide_ids: list[str], labels: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Stratified, seeded train/val assignment of slides that are their own patients."""
    rng = np.random.default_rng(seed)
    split = {}
    for label in sorted(set(labels)):
        ids = [s for s, y in zip(slide_ids, labels) if y == label]
        order = rng.permutation(len(ids))
        n_val = int(round(val_fraction * len(ids)))
        for rank, i in enumerate(order):
            split[ids[i]] = "val" if rank < n_val else "train"
    return split


def camelyon16(root: Path, out: Path, *, val_fraction: float = 0.15, seed: int = 0,
               skip_missing: bool = False) -> Path:
    """CAMELYON16: tumour vs normal, official test split (module docstring)."""
    train_rows = []
    for label in ("normal", "tumor"):
        folder = _need(root / "training" / label, "CAMELYON16 training folder")
        for path in sorted(folder.glob(f"{label}_*.tif")):
            train_rows.append({"slide_id": path.stem, "path": path, "label": label})
    if not train_rows:
        raise CohortError(f"{root / 'training'}: no normal_*.tif or tumor_*.tif slides")
    split = _train_val([r["slide_id"] for r in train_rows], [r["label"] for r in train_rows], val_fraction, seed)
    rows = [{**r, "split": split[r["slide_id"]]} for r in train_rows]
    reference = _need(root / "testing" / "reference.csv", "CAMELYON16 test labels")
    missing = []
    with open(reference, newline="", encoding="utf-8-sig") as fh:
        for line, cells in enumerate(csv.reader(fh), start=1):
            if not cells or not cells[0].strip() or cells[0].strip().lower() in ("image", "name", "slide"):
                continue
            if len(cells) < 2 or cells[1].strip().lower() not in ("tumor", "normal"):
                raise CohortError(f"{reference}: line {line}: expected 'test_NNN,Tumor|Normal,...', got {','.join(cells)!r}")
            name = cells[0].strip().removesuffix(".tif")
            path = root / "testing" / "images" / f"{name}.tif"
            if not path.exists():
                missing.append(path)
                continue
            rows.append({"slide_id": name, "path": path, "label": cells[1].strip().lower(), "split": "test"})
    _missing(missing, skip_missing, reference)
    for r in rows:
        r["patient_id"], r["path"] = r["slide_id"], _relative(r["path"], out)
    return _write(out, ("slide_id", "path", "label", "patient_id", "split"), rows)


def _missing(missing: list[Path], skip: bool, listed_in: Path) -> None:
    if not missing:
        return
    if not skip:
        raise CohortError(f"{missing[0]}: listed in {listed_in.name} but not found ({len(missing)} missing in all; "
                          "--skip-missing leaves them out)")
    for path in missing:
        log.warning("%s: listed in %s but not found; left out", path, listed_in.name)


def parse_tcga_barcode(name: str) -> dict[str, str] | None:
    """``TCGA-05-4244-01Z-00-DX1...`` -> slide id, patient id, sample type, section kind (``DX``/``TS``/``BS``);
    None for a name that is not a TCGA slide barcode."""
    match = TCGA_BARCODE.match(name)
    if not match:
        return None
    slide_id = name.split(".")[0]
    return {"slide_id": slide_id, "patient_id": match.group(1).upper(), "sample_type": match.group(2),
            "section": match.group(3).upper()}


def _read_labels(path: Path, label_column: str) -> tuple[str, dict[str, str]]:
    """(key kind 'patient' or 'slide', key -> label) from a user's label table."""
    with open(_need(path, "labels table"), newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, dialect=csv.Sniffer().sniff(fh.read(4096), delimiters=",\t;"))
        fh.seek(0)
        reader = csv.DictReader(fh, dialect=reader.dialect)
        fields = reader.fieldnames or []
        if label_column not in fields:
            raise CohortError(f"{path}: no column '{label_column}' (columns: {', '.join(fields)})")
        key = "slide_id" if "slide_id" in fields else next((k for k in PATIENT_KEYS if k in fields), None)
        if key is None:
            raise CohortError(f"{path}: needs a slide_id column or a patient column ({', '.join(PATIENT_KEYS)})")
        table: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            ident, value = (row.get(key) or "").strip(), (row.get(label_column) or "").strip()
            if not ident:
                continue
            if key != "slide_id":
                ident = ident.upper()[:12]  # a sample or slide barcode in a patient column: its patient part
            if ident in table and table[ident] != value:
                raise CohortError(f"{path}: line {line}: '{ident}' has two labels ('{table[ident]}', '{value}')")
            table[ident] = value
    return ("slide" if key == "slide_id" else "patient"), table


def tcga(root: Path, out: Path, *, labels: Path | None = None, label_column: str = "label",
         all_sections: bool = False) -> Path:
    """TCGA diagnostic slides with patient ids from the barcode, labels joined from ``labels`` (module docstring)."""
    found = sorted(p for p in _need(root, "TCGA slide folder").rglob("*")
                   if p.is_file() and p.suffix.lower() in TCGA_SUFFIXES)
    rows, seen = [], {}
    for path in found:
        parts = parse_tcga_barcode(path.name)
        if parts is None:
            log.warning("%s: not a TCGA slide barcode; left out", path)
            continue
        if parts["section"] != "DX" and not all_sections:
            continue
        if parts["slide_id"] in seen:
            raise CohortError(f"{path}: slide {parts['slide_id']} is also at {seen[parts['slide_id']]}")
        seen[parts["slide_id"]] = path
        rows.append({**parts, "path": _relative(path, out)})
    if not rows:
        raise CohortError(f"{root}: no TCGA {'' if all_sections else 'diagnostic (DX) '}slides (*.svs named by barcode)")
    columns = ["slide_id", "path", "patient_id", "sample_type", "section"]
    if labels is not None:
        kind, table = _read_labels(labels, label_column)
        kept = []
        for r in rows:
            value = table.get(r["slide_id"] if kind == "slide" else r["patient_id"], "")
            if not value:
                log.warning("%s: no label in %s; left out", r["slide_id"], labels.name)
                continue
            kept.append({**r, "label": value})
        if not kept:
            raise CohortError(f"{labels}: labels none of the {len(rows)} slides under {root} (keys by {kind})")
        rows, columns = kept, ["slide_id", "path", "label", *columns[2:]]
    return _write(out, columns, rows)


def panda(root: Path, out: Path, *, skip_missing: bool = False) -> Path:
    """PANDA: ISUP grade 0-5 per biopsy, provider as a column (module docstring)."""
    table = _need(root / "train.csv", "PANDA label table")
    rows, missing = [], []
    with open(table, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = {"image_id", "data_provider", "isup_grade"}
        if not need <= set(reader.fieldnames or []):
            raise CohortError(f"{table}: needs columns {', '.join(sorted(need))}; has {', '.join(reader.fieldnames or [])}")
        for line, row in enumerate(reader, start=2):
            grade = row["isup_grade"].strip()
            if grade not in {str(g) for g in range(6)}:
                raise CohortError(f"{table}: line {line}, column 'isup_grade': expected 0-5, got {grade!r}")
            path = root / "train_images" / f"{row['image_id'].strip()}.tiff"
            if not path.exists():
                missing.append(path)
                continue
            rows.append({"slide_id": row["image_id"].strip(), "path": _relative(path, out), "label": grade,
                         "patient_id": row["image_id"].strip(), "provider": row["data_provider"].strip(),
                         "gleason_score": (row.get("gleason_score") or "").strip()})
    _missing(missing, skip_missing, table)
    if not rows:
        raise CohortError(f"{table}: no slides")
    return _write(out, ("slide_id", "path", "label", "patient_id", "provider", "gleason_score"), rows)


BUILDERS: dict[str, Callable[..., Path]] = {"camelyon16": camelyon16, "tcga": tcga, "panda": panda}
