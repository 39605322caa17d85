"""One validated configuration for a run: keyword-only dataclasses, a one-line description per field.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load``, applies ``--set section.key=value``
overrides, refuses unknown keys and wrong types naming the key, and returns a :class:`Config`.
``dump_yaml(config)`` writes it back (with the descriptions as comments): ``fullslide config --show``
prints the defaults that way, and every run folder keeps its resolved ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fullslide.errors import ConfigError


def _f(default: Any, doc: str, factory: Any = None) -> Any:
    """A dataclass field with its one-line description."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(kw_only=True)
class DataConfig:
    """Where the slides and labels are and how tiles are cut."""

    cohort: str = _f("", "CSV with slide_id, path, label (optional patient_id, split, mpp, time, event)")
    task: Literal["classification", "survival", "regression"] = _f("classification", "what the label is")
    label_column: str = _f("label", "column with the class (classification) or the numeric target (regression)")
    coords_dir: str | None = _f(None, "output of `fullslide tile` (patches/*.h5); null: tile into RUN/tiles")
    features_dir: str | None = _f(None, "output of `fullslide extract` (features/*.h5), used when encoder.freeze")
    target_mpp: float = _f(0.5, "micrometres per pixel of the tiles")
    tile_px: int = _f(224, "tile side in pixels at target_mpp")
    tissue_threshold: float = _f(0.5, "minimal tissue fraction of a kept tile")
    backend: Literal["auto", "openslide", "tiffslide", "fastslide", "image"] = _f("auto", "slide reader")
    stain_normalize: Literal["none", "macenko", "reinhard"] = _f(
        "none", "stain normalisation, fitted once per slide, applied on the device in training, extraction and "
                "inference alike: none, macenko or reinhard")
    stain_reference: str | None = _f(None, "reference of the stain normalisation: a tile image (PNG/JPEG) or a slide; "
                                           "null: Macenko's published reference (reinhard needs one)")
    mpp: float | None = _f(None, "mpp of slides without metadata (a CSV mpp column overrides it per slide)")
    split_method: Literal["auto", "column", "kfold", "fractions"] = _f(
        "auto", "patient-level split: auto (the cohort's split column if it has one, else fractions), column, kfold, fractions")
    folds: int = _f(5, "number of folds (split_method kfold)")
    fold: int = _f(0, "test fold; the next fold is validation (split_method kfold)")
    fractions: list[float] = _f(None, "train/val/test fractions (split_method fractions)", factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = _f(0, "seed of the patient-level split")


@dataclass(kw_only=True)
class EncoderConfig:
    """The tile encoder."""

    name: str = _f("resnet18", "a foundation-model recipe (`fullslide encoders`: uni, virchow2, ...), tinycnn, "
                   "any timm name, hf-hub:org/name or package.module:callable")
    weights: str | None = _f(None, "local weights file (.safetensors, .pth, .bin); never downloaded")
    strict: bool = _f(True, "refuse a weights file with missing or unexpected tensors (false: load what matches, warn)")
    freeze: bool = _f(False, "frozen baseline: train only the aggregator on data.features_dir features")
    frozen_epochs: int = _f(0, "first epochs with the encoder frozen (aggregator warm-up), then end-to-end")
    lr: float = _f(1e-5, "peak learning rate of the encoder")
    drop_rate: float = _f(0.0, "dropout in the encoder")
    drop_path_rate: float = _f(0.0, "stochastic depth in the encoder (ViTs)")
    freeze_bn: bool = _f(True, "keep BatchNorm in eval mode (needed for exact chunked gradients)")
    kwargs: dict[str, Any] = _f(None, "extra keyword arguments for the encoder factory", factory=dict)
    trainable_blocks: int | None = _f(None, "train only the last N transformer blocks (and the final norm); null: all")
    layer_decay: float = _f(1.0, "layer-wise lr decay: block i of L gets lr * decay^(L + 1 - i) (1: off)")
    lora_rank: int = _f(0, "LoRA adapters of this rank on the blocks' lora_targets, the rest frozen (0: off)")
    lora_alpha: float = _f(16.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input (replayed exactly in recompute)")
    lora_targets: list[str] = _f(None, "Linear layers of each block that get LoRA", factory=lambda: ["qkv"])
    grad_checkpointing: bool = _f(False, "activation checkpointing inside the blocks (giant encoders, larger chunks)")


@dataclass(kw_only=True)
class AggregatorConfig:
    """The MIL aggregator."""

    name: str = _f("gma", "gma, abmil, mean, max, transformer, chief (CHIEF's slide encoder), gigapath-slide "
                        "(Prov-GigaPath's) or package.module:callable")
    lr: float = _f(1e-4, "peak learning rate of the aggregator")
    weights: str | None = _f(None, "a slide encoder's released weights (chief: CHIEF_pretraining.pth; gigapath-slide: "
                              "slide_encoder.pth); never downloaded")
    kwargs: dict[str, Any] = _f(None, "extra keyword arguments (e.g. dropout, hidden)", factory=dict)


@dataclass(kw_only=True)
class AugmentConfig:
    """Tile augmentations at training time (never at validation)."""

    flip: bool = _f(True, "random horizontal and vertical flips")
    rot90: bool = _f(True, "random 90-degree rotations")
    blur_p: float = _f(0.2, "probability of a light Gaussian blur")
    jitter: float = _f(0.05, "strength of brightness/contrast/saturation jitter (0 disables)")
    hed_sigma: float = _f(0.0, "HED stain jitter: each stain's concentration scaled by U(1 - s, 1 + s) per tile "
                          "(Tellez et al. 2018; 0.05 = their HED-light; 0 disables)")
    hed_bias: float = _f(0.0, "HED stain jitter: each stain's concentration shifted by U(-b, b) per tile (0.05 = "
                         "HED-light; 0 disables)")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation."""

    epochs: int = _f(20, "number of epochs")
    tiles_per_slide: int | Literal["all"] = _f(512, "K: tiles sampled per slide per step (without replacement), or all")
    slides_per_step: int = _f(1, "slides per step in each slide group (world / tile_parallel groups)")
    epoch_fraction: float = _f(1.0, "fraction of training slides drawn each epoch")
    chunk_tiles: int | Literal["auto"] = _f(64, "tiles encoded at once, or auto (sized from a probe of the encoder)")
    mode: Literal["auto", "full", "checkpoint", "recompute"] = _f(
        "auto", "engine memory mode: auto keeps every chunk graph that fits train.memory_budget and recomputes the rest")
    memory_budget: float | str | None = _f(
        None, "what a step may add in memory (mode auto): a fraction of free memory (0.5), bytes, or '16GB'; "
        "null: 80% of the free device memory (CPU: available RAM)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "auto: bf16 on GPU, fp32 on CPU")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_epochs: float = _f(1.0, "linear warm-up length, then cosine decay")
    min_lr_ratio: float = _f(0.01, "final learning rate as a fraction of the peak")
    grad_clip: float | None = _f(1.0, "clip the gradient norm (null: off)")
    class_weights: list[float] | Literal["balanced"] | None = _f(None, "loss weights per class, balanced, or null")
    tile_parallel: int = _f(1, "ranks that share one slide (torchrun world must be divisible by it)")
    loader_workers: int = _f(2, "processes reading tiles ahead of the step")
    prefetch_tiles: int | None = _f(None, "tiles the loader may hold in flight (null: one step's, at most 1/4 of free RAM)")
    part_tiles: int = _f(1024, "tiles per loader item: a big step is read by several workers in parts")
    seed: int = _f(0, "seed of initialisation, sampling, augmentation and dropout")
    context: Literal["none", "cache"] = _f(
        "none", "whole-slide context: cache = the aggregator sees every tile each step (K fresh features + the other "
        "tiles' cached ones, RUN/context), the encoder back-propagates through the K")
    context_refresh_epochs: int = _f(0, "context: cache: re-extract the whole cache every this many epochs (0: never)")
    context_dtype: Literal["float16", "float32"] = _f("float16", "context: cache: storage precision of the cache")
    selection_metric: str = _f("auto", "validation metric for the best checkpoint (auto: task default, or loss)")
    patience: int = _f(0, "stop after this many epochs without improvement (0: never)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available")


@dataclass(kw_only=True)
class EvalConfig:
    """Validation, evaluation and prediction."""

    chunk_tiles: int = _f(128, "tiles encoded at once (all tiles of every slide are used)")
    bootstrap: int = _f(1000, "bootstrap resamples for 95% confidence intervals")
    validate_every: int = _f(1, "validate every N epochs")


@dataclass(kw_only=True)
class Config:
    """A whole run."""

    run_dir: str = _f("runs/fullslide", "output folder (checkpoints, logs, metrics, predictions)")
    data: DataConfig = _f(None, "", factory=DataConfig)
    encoder: EncoderConfig = _f(None, "", factory=EncoderConfig)
    aggregator: AggregatorConfig = _f(None, "", factory=AggregatorConfig)
    augment: AugmentConfig = _f(None, "", factory=AugmentConfig)
    train: TrainConfig = _f(None, "", factory=TrainConfig)
    eval: EvalConfig = _f(None, "", factory=EvalConfig)

    def validate(self) -> "Config":
        """Cross-field checks (value ranges), each naming the key."""
        checks = [
            (self.data.tile_px >= 8, "data.tile_px", "must be >= 8"),
            (self.data.target_mpp > 0, "data.target_mpp", "must be > 0"),
            (0 < self.data.tissue_threshold <= 1, "data.tissue_threshold", "must be in (0, 1]"),
            (len(self.data.fractions) == 3 and abs(sum(self.data.fractions) - 1) < 1e-6
             and min(self.data.fractions) >= 0, "data.fractions", "must be three non-negative numbers summing to 1"),
            (0 <= self.data.fold < self.data.folds, "data.fold", f"must be in [0, data.folds={self.data.folds})"),
            (self.train.epochs >= 1, "train.epochs", "must be >= 1"),
            (self.train.tiles_per_slide == "all" or self.train.tiles_per_slide >= 1, "train.tiles_per_slide",
             "must be >= 1 or 'all'"),
            (self.train.slides_per_step >= 1, "train.slides_per_step", "must be >= 1"),
            (0 < self.train.epoch_fraction <= 1, "train.epoch_fraction", "must be in (0, 1]"),
            (self.train.chunk_tiles == "auto" or self.train.chunk_tiles >= 1, "train.chunk_tiles",
             "must be >= 1 or 'auto'"),
            (_budget_ok(self.train.memory_budget), "train.memory_budget",
             "must be a fraction in (0, 1], a byte count or a size such as '16GB'"),
            (self.train.tile_parallel >= 1, "train.tile_parallel", "must be >= 1"),
            (self.train.loader_workers >= 0, "train.loader_workers", "must be >= 0"),
            (self.train.part_tiles >= 1, "train.part_tiles", "must be >= 1"),
            (self.train.prefetch_tiles is None or self.train.prefetch_tiles >= 1, "train.prefetch_tiles",
             "must be >= 1 or null"),
            (self.encoder.frozen_epochs >= 0, "encoder.frozen_epochs", "must be >= 0"),
            (0 < self.encoder.layer_decay <= 1, "encoder.layer_decay", "must be in (0, 1]"),
            (self.encoder.lora_rank >= 0, "encoder.lora_rank", "must be >= 0"),
            (0 <= self.encoder.lora_dropout < 1, "encoder.lora_dropout", "must be in [0, 1)"),
            (self.encoder.trainable_blocks is None or self.encoder.trainable_blocks >= 0, "encoder.trainable_blocks",
             "must be >= 0 or null"),
            (0 <= self.encoder.lr <= 1, "encoder.lr", "must be in [0, 1] (AdamW learning rate)"),
            (0 < self.aggregator.lr <= 1, "aggregator.lr", "must be in (0, 1] (AdamW learning rate)"),
            (0 <= self.train.weight_decay <= 10, "train.weight_decay", "must be in [0, 10]"),
            (0 <= self.augment.blur_p <= 1, "augment.blur_p", "must be in [0, 1]"),
            (0 <= self.augment.jitter < 1, "augment.jitter", "must be in [0, 1)"),
            (0 <= self.augment.hed_sigma < 1, "augment.hed_sigma", "must be in [0, 1)"),
            (0 <= self.augment.hed_bias <= 1, "augment.hed_bias", "must be in [0, 1]"),
            (self.train.grad_clip is None or self.train.grad_clip > 0, "train.grad_clip", "must be > 0 or null"),
            (self.eval.bootstrap >= 0, "eval.bootstrap", "must be >= 0 (0: no confidence intervals)"),
            (self.train.context_refresh_epochs >= 0, "train.context_refresh_epochs", "must be >= 0"),
            (self.train.context == "none" or not self.encoder.freeze, "train.context",
             "cache needs a trained encoder (encoder.freeze: the frozen arm reads every tile's stored features: "
             "set train.tiles_per_slide: all)"),
            (self.eval.chunk_tiles >= 1, "eval.chunk_tiles", "must be >= 1"),
            (self.eval.validate_every >= 1, "eval.validate_every", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why}")
        return self


def _budget_ok(budget: float | str | None) -> bool:
    from fullslide.engine.budget import parse_bytes

    if budget is None:
        return True
    try:
        value = parse_bytes(budget) if isinstance(budget, str) else budget
    except ValueError:
        return False
    return value > 0 and (value <= 1 or float(value).is_integer())


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats); return it or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} is not {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp in (int, float) and isinstance(value, str):
        value = _number(value, tp, key)  # YAML 1.1 reads 3e-5 (no dot) as a string: accept numeric strings
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _number(text: str, tp: type, key: str) -> Any:
    """A numeric string as ``tp`` (``"3e-5"`` -> 3e-05, ``"8"`` -> 8); the string itself if it is not one."""
    try:
        number = float(text.strip())
    except ValueError:
        return text
    if tp is int:
        if not number.is_integer():
            raise ConfigError(f"config key '{key}': expected int, got {text!r}")
        return int(number)
    return number


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or 'root'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known in this section: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, YAML-parsed value)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.epochs=5")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                          "quote strings with special characters") from exc


def config_from_dict(raw: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated :class:`Config` from a mapping plus ``key=value`` overrides."""
    merged = dict(raw or {})
    for text in overrides:
        _set_dotted(merged, *parse_override(text))
    return _build(Config, merged, "").validate()


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (``None``: defaults) with overrides. Relative paths in it are relative to the
    working directory, as on the command line."""
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
        if raw is None:
            raise ConfigError(f"{path}: the config file is empty (`fullslide config --show` prints every key)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(raw, overrides)


#: The config keys that hold paths (``run_dir`` aside): a run folder saves them absolute, or relative to itself.
PATH_KEYS = (("data", "cohort"), ("data", "coords_dir"), ("data", "features_dir"), ("encoder", "weights"))


def portable_config(config: Config, run_dir: str | Path) -> Config:
    """``config`` as its run folder keeps it: every path absolute, or relative to the run folder when inside it,
    so that ``eval``/``heatmap``/``predict``/``--resume`` work from any working directory and after the folder is
    copied or moved (what it points to outside itself must stay where it is); ``run_dir`` is saved absolute, so a
    copy of the file used as a config for a new run is refused until it names another folder."""
    run = Path(run_dir).resolve()
    out = copy.deepcopy(config)
    for section, key in PATH_KEYS:
        value = getattr(getattr(out, section), key)
        if value:
            path = Path(value).expanduser().resolve()
            setattr(getattr(out, section), key, str(path.relative_to(run)) if path.is_relative_to(run) else str(path))
    out.run_dir = str(run)
    return out


#: What ``--resume RUN --set ...`` may change: how the steps are computed, never which steps or their maths (a
#: resumed run must equal the uninterrupted one: ``mode`` and the memory keys give the same gradient).
RESUME_SAFE_KEYS = frozenset({
    "train.mode", "train.memory_budget", "train.loader_workers", "train.prefetch_tiles", "train.part_tiles",
    "train.device", "eval.chunk_tiles", "eval.bootstrap", "data.backend",
})


def check_resume_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the first ``--set`` key that would change the steps of a resumed run."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key not in RESUME_SAFE_KEYS:
            raise ConfigError(f"--set {key} with --resume: it would change the steps the run takes, so the resumed "
                              f"run would no longer equal an uninterrupted one; start a new run_dir (with "
                              f"`fullslide train CONFIG`) to change it. Allowed on resume: "
                              f"{', '.join(sorted(RESUME_SAFE_KEYS))}")


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of the run folder ``run_dir``: relative paths in its ``config.yaml`` are relative to the folder
    (folders saved before this rule kept paths relative to the working directory: those still resolve when
    nothing exists under the folder); ``run_dir`` is the folder as given; ``overrides`` (command-line, relative
    to the working directory) apply last."""
    import yaml

    run = Path(run_dir)
    config = load_config(run / "config.yaml")
    for section, key in PATH_KEYS:
        value = getattr(getattr(config, section), key)
        if value and not Path(value).expanduser().is_absolute():
            inside = run / value
            if inside.exists() or not Path(value).exists():
                setattr(getattr(config, section), key, str(inside))
    config.run_dir = str(run)
    if not overrides:
        return config
    return config_from_dict(yaml.safe_load(dump_yaml(config, comments=False)), overrides)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Config, comments: bool = True) -> str:
    """YAML text of ``config``; with ``comments`` every key carries its description."""
    import yaml

    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                doc = (type(value).__doc__ or "").strip().splitlines()[0]
                lines.append(f"{pad}{f.name}:" + (f"  # {doc}" if comments and doc else ""))
                emit(value, indent + 1)
                continue
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            text = text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()
            doc = f.metadata.get("doc", "")
            lines.append(f"{pad}{f.name}: {text}" + (f"  # {doc}" if comments and doc else ""))

    emit(config, 0)
    return "\n".join(lines) + "\n"
