"""Checkpoints: weights as safetensors, optimizer/scheduler/scaler/sampler/RNG state beside them.

A checkpoint is a folder ``RUN/checkpoints/<name>/`` holding ``model.safetensors`` (the weights, loadable by
any safetensors reader), ``optimizer.safetensors`` (optimizer tensors) and ``state.json`` (everything else:
epoch and step position of the sampler, optimizer hyper-parameters, scheduler and grad-scaler state, best
metric, history). The folder is written under a temporary name and renamed, and the pointer files
``last.json`` / ``best.json`` are replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact. Loading never unpickles anything: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fullslide.atomic import atomic_write_text
from fullslide.errors import FullslideError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors keyed 'param.key', JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    state: dict[str, Any],
    pointers: tuple[str, ...] = ("last",),
) -> Path:
    """Write checkpoint ``name`` atomically and point ``pointers`` (e.g. 'last', 'best') at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        full_state = dict(state)
        if optimizer is not None:
            tensors, rest = _optimizer_split(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            full_state["optimizer"] = rest
        if scheduler is not None:
            full_state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            full_state["scaler"] = scaler.state_dict()
        full_state["torch_rng"] = torch.get_rng_state().tolist()
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
        revision = 1
        while final.exists():  # never delete what a pointer may name: a re-save gets a fresh name
            revision += 1
            final = root / f"{name}-r{revision}"
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for pointer in pointers:
        atomic_write_text(root / f"{pointer}.json", json.dumps({"checkpoint": final.name}))
    _prune(root)
    return final


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, with its I/O failures (a full disk, a read-only folder) raised as the OSError
    they are, naming the file, so callers handle them as any other write error (safetensors raises its own
    error type with the OS error number in its message)."""
    import re

    from safetensors.torch import save_file as write

    try:
        write(tensors, path, metadata=metadata)
    except Exception as exc:  # safetensors_rust.SafetensorError
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


def remove_stale(run_dir: str | Path) -> int:
    """Remove what an interrupted writer left: temporary checkpoint folders and atomic-write temporaries in the
    run folder, and checkpoints no pointer names. Call it only while holding the run's lock. Returns the count."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(".*.tmp*") if p.is_file()]
    root = run_dir / "checkpoints"
    if root.is_dir():
        stale += [p for p in root.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    context = run_dir / "context"  # the whole-slide context cache's atomic writes
    if context.is_dir():
        stale += [p for p in context.glob(".*.tmp*") if p.is_file()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if root.is_dir() and (root / "last.json").exists():
        _prune(root)
    return len(stale)


def _prune(root: Path) -> None:
    """Delete checkpoint folders no pointer refers to (and stale temporary folders)."""
    keep = {resolve_name(root, p) for p in ("last", "best") if (root / f"{p}.json").exists()}
    for child in root.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def resolve_name(root: Path, pointer: str) -> str:
    try:
        return json.loads((root / f"{pointer}.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError) as exc:
        raise FullslideError(f"{root / (pointer + '.json')}: no readable checkpoint pointer ({exc})") from exc


def checkpoint_dir(run_dir: str | Path, which: str = "best") -> Path:
    """The folder of checkpoint ``which``: 'best', 'last', or a path to a checkpoint folder."""
    candidate = Path(which)
    if candidate.is_dir() and (candidate / MODEL_FILE).exists():
        return candidate
    root = Path(run_dir) / "checkpoints"
    if not (root / f"{which}.json").exists():
        if which == "best" and (root / "last.json").exists():
            which = "last"  # a run stopped before its first validation
        else:
            raise FullslideError(f"{run_dir}: no '{which}' checkpoint (expected {root / (which + '.json')})")
    return root / resolve_name(root, which)


def load_weights_into(model: nn.Module, ckpt: Path) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` (strict: names and shapes must match)."""
    from safetensors.torch import load_file

    path = ckpt / MODEL_FILE
    try:
        weights = load_file(str(path))
    except Exception as exc:
        raise FullslideError(f"{path}: cannot read weights ({exc})") from exc
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FullslideError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(
    ckpt: Path, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None, scaler: Any = None
) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; returns the state dict (epoch, step, ...)."""
    from safetensors.torch import load_file

    load_weights_into(model, ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_optimizer_join(load_file(str(ckpt / OPTIMIZER_FILE)), state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if "torch_rng" in state:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state
