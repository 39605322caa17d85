"""Build encoders and aggregators by name: explicit registries, clear errors for unknown names.

Encoders: ``tinycnn`` (built in), any timm name (``resnet18``, ``vit_base_patch16_224``, ...), ``hf-hub:org/name``
where a hub is reachable, or a user factory ``package.module:callable``. Weights come from a local file.
Aggregators: ``gma``, ``abmil``, ``mean``, ``max``, ``transformer``, the slide encoders ``chief`` and
``gigapath-slide``, or a user factory.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from fullslide.errors import ModelError
from fullslide.models import aggregators as agg
from fullslide.models.encoders import IMAGENET_MEAN, IMAGENET_STD, RecipeBackbone, TileEncoder, TinyCNN
from fullslide.models.recipes import Recipe, get_recipe
from fullslide.models.slide_encoders import GigaPathSlideEncoder
from fullslide.models.weights import load_encoder_weights

if TYPE_CHECKING:
    from fullslide.models.slide_model import SlideModel

AGGREGATORS: dict[str, Callable[..., nn.Module]] = {
    "gma": agg.GatedAttentionMIL,
    "abmil": agg.AttentionMIL,
    "mean": agg.MeanMIL,
    "max": agg.MaxMIL,
    "transformer": agg.TransformerMIL,
    "chief": agg.CHIEFSlideEncoder,
    "gigapath-slide": GigaPathSlideEncoder,
}
#: Aggregators with a released weight file: its key layout (a key of fullslide.models.weights.CONVERTERS) and the
#: module prefixes the file does not hold (the task's new head).
AGGREGATOR_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chief": ("chief", ("head.",)),  # CHIEF_pretraining.pth
    "gigapath-slide": ("gigapath_slide", ("head.",)),  # Prov-GigaPath's slide_encoder.pth
}

BUILTIN_ENCODERS: dict[str, Callable[..., nn.Module]] = {"tinycnn": TinyCNN}


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``package.module:callable`` and return the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"factory '{spec}': expected the form package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"factory '{spec}': cannot import module '{module_name}' ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"factory '{spec}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"factory '{spec}': '{attr}' is not callable")
    return obj


def _call_with_supported(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``fn`` with the subset of ``kwargs`` its signature accepts (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _probe_feature_dim(backbone: nn.Module, tile_px: int) -> int:
    """Run one dummy tile through ``backbone`` to learn its output width."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, tile_px, tile_px))
    backbone.train(was_training)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]  # (features, extras): the features come first
    if out.ndim == 3:
        return int(out.shape[2])  # tokens [1, T, D]
    return int(out.shape[1]) if out.ndim == 4 else int(out.reshape(1, -1).shape[1])  # maps: NCHW


def create_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    tile_px: int = 224,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> TileEncoder:
    """Build a :class:`TileEncoder` by name; ``weights`` is a local ``.safetensors/.pth/.bin`` file.

    ``name`` is a foundation-model recipe (``uni``, ``virchow2``, ... : :data:`fullslide.models.recipes.RECIPES`),
    ``tinycnn``, a timm name, ``hf-hub:org/name`` or a ``package.module:callable`` factory. ``kwargs`` override the
    recipe's or timm's arguments (e.g. ``depth`` for small tests). Weights load strictly unless ``strict=False``.
    """
    norm_mean, norm_std = IMAGENET_MEAN, IMAGENET_STD
    if name.startswith("hf_hub:"):  # timm accepts both spellings (Prov-GigaPath's card writes hf_hub:)
        name = "hf-hub:" + name[len("hf_hub:"):]
    recipe = get_recipe(name)
    if recipe is not None:
        return _create_recipe(recipe, weights=weights, drop_path_rate=drop_path_rate, strict=strict,
                              mean=mean, std=std, **kwargs)
    if ":" in name and not name.startswith("hf-hub:"):
        factory = resolve_factory(name)
        backbone = _call_with_supported(
            factory, {"tile_px": tile_px, "drop_rate": drop_rate, "drop_path_rate": drop_path_rate, **kwargs}
        )
        if not isinstance(backbone, nn.Module):
            raise ModelError(f"factory '{name}' returned {type(backbone).__name__}, expected a torch.nn.Module")
        if isinstance(backbone, TileEncoder):
            if weights is not None:
                load_encoder_weights(backbone.backbone, weights, strict=strict)
            return backbone
        dim = getattr(backbone, "feature_dim", None) or getattr(backbone, "num_features", None)
        dim = int(dim) if dim else _probe_feature_dim(backbone, tile_px)
    elif name in BUILTIN_ENCODERS:
        backbone = _call_with_supported(BUILTIN_ENCODERS[name], {"drop_rate": drop_rate, **kwargs})
        dim = backbone.num_features
    else:
        backbone = _create_timm(name, tile_px=tile_px, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                local_weights=weights, **kwargs)
        dim = int(backbone.num_features)
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        norm_mean = tuple(cfg.get("mean", norm_mean))
        norm_std = tuple(cfg.get("std", norm_std))
    if weights is not None:
        load_encoder_weights(backbone, weights, strict=strict)
    return TileEncoder(backbone, dim, mean or norm_mean, std or norm_std, name=name)


def _create_recipe(recipe: Recipe, *, weights: str | Path | None, drop_path_rate: float, strict: bool,
                   mean: tuple[float, float, float] | None, std: tuple[float, float, float] | None,
                   **overrides: Any) -> TileEncoder:
    """A foundation model as its card builds it (``overrides``: e.g. ``depth`` for tests), weights from a file."""
    from fullslide.models._timm_compat import import_timm

    timm = import_timm()
    if recipe.builder == "hub_config":
        recipe = recipe_from_hub_config(recipe, weights)
    try:
        model = build_recipe_network(timm, recipe, overrides, drop_path_rate=drop_path_rate)
    except Exception as exc:
        raise ModelError(f"encoder '{recipe.name}': timm could not build {recipe.arch} "
                         f"({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if weights is not None:
        load_encoder_weights(model, weights, layout=recipe.layout, strict=strict)
    backbone = RecipeBackbone(model, recipe.pooling, recipe.input_size(overrides), resize_px=recipe.resize_px,
                              interpolation=recipe.interpolation)
    return TileEncoder(backbone, backbone.num_features, mean or recipe.mean, std or recipe.std, name=recipe.name)


def build_recipe_network(timm: Any, recipe: Recipe, overrides: dict[str, Any] | None = None, *,
                         drop_path_rate: float = 0.0) -> nn.Module:
    """The network of a recipe (random weights): ``timm.create_model`` or the recipe's builder."""
    kwargs = recipe.timm_kwargs(overrides)
    if recipe.builder in ("timm", "hub_config"):  # hub_config without its config: the record's shape
        return timm.create_model(recipe.arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                 **kwargs)
    from fullslide.models.recipe_modules import BUILDERS

    return BUILDERS[recipe.builder](timm, recipe.arch, kwargs, drop_path_rate)


def recipe_parameter_count(recipe: Recipe) -> int:
    """Parameters of a recipe's network, counted on the meta device (nothing allocated, nothing downloaded)."""
    from fullslide.models._timm_compat import import_timm

    timm = import_timm()
    with torch.device("meta"):
        model = build_recipe_network(timm, recipe)
    return sum(p.numel() for p in model.parameters())


def _hub_config(name: str, weights: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, model_args, pretrained_cfg) of an ``hf-hub:`` model from the ``config.json`` beside a local
    weights file (timm's hub layout: the card's mean/std live in ``pretrained_cfg``)."""
    import json

    config = Path(weights).parent / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        return (str(data["architecture"]), dict(data.get("model_args") or {}),
                dict(data.get("pretrained_cfg") or {}))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"encoder '{name}' with the local file {weights}: fullslide makes no network call, so it "
                         f"needs the card's config.json beside the file ({config}: {exc}); or name a recipe "
                         "(`fullslide encoders`) or a timm architecture") from None


#: ``model_args`` keys of a hub config that fullslide sets itself when it builds the network (they would clash).
_SET_BY_FULLSLIDE = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "drop_path_rate")


def recipe_from_hub_config(recipe: Recipe, weights: str | Path | None) -> Recipe:
    """A ``hub_config`` recipe specialised by the card's ``config.json`` beside ``weights``: its architecture and
    ``model_args`` plus the layer classes the card's ``create_model`` call adds (the record's ``mlp_layer``,
    ``act_layer``), and timm's eval transform of its ``pretrained_cfg`` (mean/std; resize to
    ``floor(input / crop_pct)`` with its interpolation, then centre crop). Without weights: the record."""
    import dataclasses
    import math

    if weights is None:
        return recipe
    arch, model_args, cfg = _hub_config(recipe.name, weights)
    extra = {k: v for k, v in recipe.kwargs.items() if k in ("mlp_layer", "act_layer", "norm_layer")}
    kwargs = {**{k: v for k, v in model_args.items() if k not in _SET_BY_FULLSLIDE}, **extra}
    input_px = int((cfg.get("input_size") or [3, kwargs.get("img_size", recipe.input_px)])[-1])
    interpolation = str(cfg.get("interpolation", recipe.interpolation))
    if interpolation not in ("bilinear", "bicubic") or cfg.get("crop_mode", "center") != "center":
        raise ModelError(f"encoder '{recipe.name}': its config.json asks for a {interpolation} resize with crop mode "
                         f"{cfg.get('crop_mode')}; fullslide reproduces bilinear/bicubic with a centre crop")
    crop_pct = float(cfg.get("crop_pct", 1.0))
    resize = math.floor(input_px / crop_pct)
    mean, std = tuple(cfg.get("mean", recipe.mean)), tuple(cfg.get("std", recipe.std))
    return dataclasses.replace(recipe, arch=arch, kwargs=kwargs, input_px=input_px, mean=mean, std=std,
                               interpolation=interpolation, resize_px=resize if resize != input_px else None,
                               builder="timm")


def _create_timm(name: str, *, tile_px: int, drop_rate: float, drop_path_rate: float,
                 local_weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0`` gives pooled features)."""
    from fullslide.models._timm_compat import import_timm

    timm = import_timm()
    hub = name.startswith("hf-hub:")
    hub_cfg: dict[str, Any] = {}
    if hub and local_weights is not None:  # build from the card's config beside the file: no network
        name, model_args, hub_cfg = _hub_config(name, local_weights)
        kwargs = {**model_args, **kwargs}
        hub = False
    if not hub and not timm.is_model(name):
        raise ModelError(f"unknown encoder '{name}': not a recipe (`fullslide encoders`), not built in "
                         f"({', '.join(BUILTIN_ENCODERS)}), not a timm model, not an hf-hub: name and not a "
                         "package.module:callable factory")
    from fullslide.models.recipes import resolve_layer

    kwargs = {k: resolve_layer(v) if k in ("mlp_layer", "act_layer", "norm_layer") else v for k, v in kwargs.items()}
    # the card's model_args may repeat what fullslide sets (Prov-GigaPath's holds num_classes: 0): theirs win,
    # then the user's encoder.kwargs
    base = {"pretrained": hub, "num_classes": 0, "drop_rate": drop_rate, "drop_path_rate": drop_path_rate, **kwargs}
    try:
        try:  # ViT-style models take img_size so that tiles other than 224 px work; CNNs do not accept it
            model = timm.create_model(name, **{"img_size": tile_px, **base})  # the card's img_size wins
        except TypeError:
            model = timm.create_model(name, **{k: v for k, v in base.items() if k != "img_size"})
        if hub_cfg:  # mean/std (and the rest) as the card's config.json gives them, not timm's defaults
            model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **hub_cfg}
        return model
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"encoder '{name}': timm could not build it ({type(exc).__name__}: {exc})".splitlines()[0]) from exc


def load_aggregator_weights(name: str, aggregator: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """A slide encoder's released weights into ``aggregator`` (strict, but for the task's new head)."""
    if name not in AGGREGATOR_FILES:
        raise ModelError(f"aggregator '{name}' has no released weight layout (aggregators with weights: "
                         f"{', '.join(AGGREGATOR_FILES)})")
    layout, new = AGGREGATOR_FILES[name]
    unused = getattr(aggregator, "unused_file_prefixes", None)
    load_encoder_weights(aggregator, path, layout=layout, strict=strict, may_miss=new,
                         skip=unused() if callable(unused) else ())


def create_aggregator(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> nn.Module:
    """Build an aggregator by name, or a user factory ``package.module:callable(in_dim=, n_classes=, ...)``."""
    if ":" in name:
        module = _call_with_supported(resolve_factory(name), {"in_dim": in_dim, "n_classes": n_classes, **kwargs})
        if not isinstance(module, nn.Module):
            raise ModelError(f"factory '{name}' returned {type(module).__name__}, expected a torch.nn.Module")
        return module if isinstance(module, tuple(AGGREGATORS.values())) else agg.WrappedAggregator(module)
    if name not in AGGREGATORS:
        raise ModelError(f"unknown aggregator '{name}': choose one of {', '.join(AGGREGATORS)} or package.module:callable")
    try:
        return AGGREGATORS[name](in_dim, n_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"aggregator '{name}': {exc}") from exc


def create_model(
    encoder: str,
    aggregator: str,
    n_classes: int,
    *,
    weights: str | Path | None = None,
    tile_px: int = 224,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    freeze_bn: bool = True,
    strict: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
    aggregator_kwargs: dict[str, Any] | None = None,
    aggregator_weights: str | Path | None = None,
) -> "SlideModel":
    """Encoder + aggregator in one :class:`SlideModel`, the aggregator sized to the encoder's features;
    ``aggregator_weights``: a slide encoder's released file (e.g. CHIEF's)."""
    from fullslide.models.slide_model import SlideModel

    enc = create_encoder(
        encoder, weights=weights, tile_px=tile_px, drop_rate=drop_rate, drop_path_rate=drop_path_rate, strict=strict,
        **(encoder_kwargs or {}),
    )
    head = create_aggregator(aggregator, enc.feature_dim, n_classes, **(aggregator_kwargs or {}))
    if aggregator_weights is not None:
        load_aggregator_weights(aggregator, head, aggregator_weights, strict=strict)
    return SlideModel(enc, head, freeze_bn=freeze_bn)
