"""Run logs: a progress bar per epoch, one summary line per epoch, metrics.csv and TensorBoard events.

``metrics.csv`` is rewritten atomically from the run's history after every epoch, so it always matches the
last checkpoint (a resumed run continues it seamlessly). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from fullslide.atomic import atomic_write_text

log = logging.getLogger("fullslide.train")


@contextlib.contextmanager
def stage(logger: logging.Logger, name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """One line when a long stage starts and one with its time when it ends (a terminal or not, so that a log file
    or a batch job's output shows where a command is); the seconds go into ``timings[name]``."""
    logger.info("%s ...", name)
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    if timings is not None:
        timings[name] = seconds
    logger.info("%s: done in %.0f s", name, seconds)


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """All epochs so far, one row each; columns are the union of keys in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


class RunLogger:
    """TensorBoard scalars, the epoch summary line and a log file in the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")  # appends: a resume continues it
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        package = logging.getLogger("fullslide")  # every module's lines (splits, tiling, ...), not the trainer's alone
        if package.level == logging.NOTSET:  # the file gets the epoch lines even where the caller's logging is quieter
            package.setLevel(logging.INFO)
        package.addHandler(handler)
        self._handler = handler
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; a broken install only loses the event files
            log.warning("tensorboard unavailable: no event files will be written")

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def epoch_line(self, row: dict[str, Any]) -> None:
        """One line per epoch on stderr (and in train.log)."""
        if not self.enabled:
            return
        parts = [f"epoch {row['epoch']:>3}"]
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        log.info("  ".join(parts))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.enabled:
            logging.getLogger("fullslide").removeHandler(self._handler)
            self._handler.close()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):  # -> tqdm
    """A tqdm bar on stderr (slides/s as the rate; tiles/s, loss, ETA in the postfix)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="slide", disable=not enabled, leave=False,
                dynamic_ncols=True, file=sys.stderr)
