"""Loading encoder weights from a local file: safe formats, wrappers and prefixes, key layouts, strictness.

Files: ``.safetensors``, or torch files (``.bin/.pth/.pt``) loaded with ``weights_only=True`` (an unsafe pickle is
refused). Wrappers (``state_dict``, ``model``, ``teacher``, ...) and key prefixes (``module.``, ``backbone.``,
``teacher.backbone.``, ``visual.trunk.``, ...) are recognised. Hugging Face transformers layouts (ViT, DINOv2) are
converted to timm's, without needing ``transformers``. Loading is strict by default: a missing or unexpected
tensor is an error naming the file, up to 10 keys and, where one would fix it, the prefix or architecture
argument to use; ``strict=False`` loads what matches and warns with what was skipped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fullslide.errors import ModelError

log = logging.getLogger(__name__)

#: Prefixes stripped from checkpoint keys (longest first); DINO/iBOT teachers win over students.
PREFIXES = ("teacher.backbone.", "student.backbone.", "visual.trunk.", "base_model.model.", "module.", "model.",
            "backbone.", "encoder.", "trunk.", "teacher.", "student.", "vit.", "dinov2.", "visual.")
#: Checkpoint tensors a feature encoder does not need (classifier heads, poolers, DINO heads, mask tokens).
IGNORED = re.compile(r"^(head\.|fc\.|classifier\.|pooler\.|mask_token|embeddings\.mask_token|dino_head\.|ibot_head\.)")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "teacher", "student", "module", "network")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file, unwrapped, without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found (fullslide never downloads weights: fetch the file "
                         "from the model card, e.g. with `huggingface-cli download`, and give its path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe pickles and corrupt files both land here
        hint = ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):  # tensors next to pickled objects
            hint = (" - the file pickles objects besides its tensors (training arguments, ...); if you trust it, save "
                    "its tensors once as .safetensors: python -c \"import torch; from safetensors.torch import "
                    f"save_file; s = torch.load('{path}', weights_only=False); save_file(s.get('model', s), "
                    f"'{path.with_suffix('.safetensors')}')\"")
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[:1]  # torch's message is coloured
        raise ModelError(f"{path}: cannot load weights safely ({type(exc).__name__}: {''.join(first)}){hint}") from exc
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelError(f"{path}: no tensors found (expected a state dict of parameter tensors)")


def strip_prefixes(state: Mapping[str, torch.Tensor], own: Mapping[str, Any],
                   origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Keys with wrapper prefixes removed until they match ``own`` (a teacher's copy preferred to a student's);
    ``origin`` (if given) maps each new key to the file's key."""
    if any(k.startswith("teacher.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("student.")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        while k not in own:
            prefix = next((p for p in PREFIXES if k.startswith(p)), None)
            if prefix is None:
                break
            k = k[len(prefix):]
        out[k] = value
        if origin is not None:
            origin[k] = origin.get(key, key)
    return out


#: Per-layer renames, transformers (v4 names as the model cards ship them, and v5 names) -> timm.
_HF_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def hf_to_timm(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """transformers ``ViTModel`` (Phikon) or ``Dinov2Model`` (Phikon-v2) keys -> timm ``VisionTransformer`` keys:
    layer-wise renames, q/k/v fused into ``qkv`` (timm stacks them along the output dim), LayerScale ``lambda1``
    -> ``gamma``. Both the v4 names the model cards ship and transformers v5 names are understood. ``origin``
    (if given) receives converted key -> the file's key(s), for error messages."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for original, value in state.items():
        key = re.sub(r"^(vit|dinov2|model)\.", "", original)
        m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if m is None:
            new = _HF_TOP.get(key, key)
        else:
            i, module, kind = m.groups()
            qkv = next(((names, names.index(module)) for names in _HF_QKV if module in names), None)
            if qkv is not None:
                new = f"blocks.{i}.qkv_part{qkv[1]}.{kind}"
            elif module in _HF_LAYER:
                new = f"blocks.{i}.{_HF_LAYER[module]}.{'gamma' if kind == 'lambda1' else kind}"
            else:
                new = original  # left as is: reported as unexpected by the strict check
        out[new], source[new] = value, original
    for key in [k for k in out if ".qkv_part0." in k]:
        names = [key.replace("qkv_part0", f"qkv_part{j}") for j in range(3)]
        if all(n in out for n in names) and len({tuple(out[n].shape[1:]) for n in names}) == 1:
            fused = key.replace("qkv_part0", "attn.qkv")
            out[fused] = torch.cat([out.pop(n) for n in names])
            source[fused] = " + ".join(source.pop(n) for n in names)
    if origin is not None:
        origin.update(source)
    return out


#: CONCH's file holds the whole CoCa model: the image embedding needs the trunk, the contrastive pooler and its
#: LayerNorm; the text tower, the captioning pooler and the contrastive projection are not part of it.
_CONCH_KEEP = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.")


def conch_visual(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """CONCH's full checkpoint -> its image embedding's tensors (``trunk.*``, ``attn_pool_contrast.*``,
    ``ln_contrast.*``); a file without ``visual.`` keys is returned as is (and reported by the strict check)."""
    kept = {k[len("visual."):]: v for k, v in state.items() if k.startswith(_CONCH_KEEP)}
    if origin is not None:
        origin.update({k: "visual." + k for k in kept})
    return kept or dict(state)


#: CONCH v1.5's card builds its ViT-L/16 for 224 px (a 14 x 14 grid) and resamples the file's position embedding to it.
_CONCH_V15_GRID = 14


def conch_v15_visual(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None
                     ) -> dict[str, torch.Tensor]:
    """CONCH v1.5's ``pytorch_model_vision.bin`` (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``): the
    trunk's position embedding resampled to the 14 x 14 grid as the card does when it loads the file (bilinear,
    no antialiasing; the class token's row kept)."""
    out = dict(state)
    pos = out.get("trunk.pos_embed")
    if pos is not None and pos.dim() == 3:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if side * side == pos.shape[1] - 1 and side != _CONCH_V15_GRID:
            grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            grid = torch.nn.functional.interpolate(grid, size=(_CONCH_V15_GRID, _CONCH_V15_GRID), mode="bilinear",
                                                   align_corners=False, antialias=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, _CONCH_V15_GRID**2, -1).to(pos.dtype)
            out["trunk.pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
    return out


#: CHIEF_pretraining.pth: the slide encoder is ``attention_net``; the rest are pretraining heads and text parts.
def chief_slide_encoder(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """CHIEF's pretraining file -> its slide encoder's tensors (``attention_net.*``)."""
    kept = {k: v for k, v in state.items() if k.startswith("attention_net.")}
    return kept or dict(state)


def gigapath_slide_encoder(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Prov-GigaPath's ``slide_encoder.pth`` (``model``): its keys as they are, but a saved ``pos_embed`` (the fixed
    sine/cosine table, a non-persistent buffer in the released code, computed by fullslide per tile)."""
    return {k: v for k, v in state.items() if k != "pos_embed"}


def swin_v054_to_timm(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A Swin file of timm 0.5 (CTransPath's) -> today's timm Swin: each stage's patch merging moves from the end of
    stage i to the start of stage i + 1 (same tensors, same channel order), and the attention-mask and
    relative-position-index buffers, which timm now computes, are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith((".attn_mask", ".relative_position_index")):
            continue
        m = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", key)
        new = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else key
        out[new] = value
        if origin is not None and new != key:
            origin[new] = key
    return out


def resnet_trunc(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A full ResNet's file -> the tensors of its stem and first three stages (``layer4``/``fc`` are not used)."""
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


def timm_layout(state: Mapping[str, torch.Tensor], origin: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A file already in timm's layout: its keys as they are."""
    return dict(state)


#: Layout -> converter ``(state, origin) -> state in the module's key names``; ``origin`` (a dict, or None) receives
#: renamed key -> the file's key, so that errors name what the file holds.
CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor], dict[str, str] | None], dict[str, torch.Tensor]]] = {
    "timm": timm_layout,
    "conch": conch_visual,
    "conch_v15": conch_v15_visual,
    "hf_vit": hf_to_timm,
    "hf_dinov2": hf_to_timm,
    "resnet_trunc": resnet_trunc,
    "chief": chief_slide_encoder,
    "gigapath_slide": gigapath_slide_encoder,
    "ctranspath": swin_v054_to_timm,
}


def _hints(missing: list[str], unexpected: list[str], *, nothing_matched: bool = False) -> str:
    """What would fix a mismatch, where the keys say so. When nothing matched, only layout and prefix hints apply
    (every key is both missing and unexpected, so a LayerScale hint would contradict itself)."""
    hints = []
    if nothing_matched:
        heads = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(heads) == 1 and len(unexpected) > 3:
            hints.append(f"every key of the file starts with '{heads.pop()}': a wrapper prefix fullslide does not know")
        if any(k.startswith(("encoder.layer.", "layers.", "embeddings.")) for k in unexpected):
            hints.append("the file is in the transformers layout: use a recipe that converts it (phikon, phikon-v2)")
        return ("; hint: " + "; ".join(hints)) if hints else ""
    if any(".ls1." in k or ".ls2." in k for k in unexpected):
        hints.append("the file has LayerScale tensors (ls1/ls2): build with init_values (e.g. encoder.kwargs: "
                     "{init_values: 1.0e-5})")
    if any(".ls1." in k or ".ls2." in k for k in missing):
        hints.append("the model has LayerScale but the file has none: drop init_values")
    if "reg_token" in unexpected:
        hints.append("the file has register tokens: set reg_tokens")
    if unexpected and missing:
        heads = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(heads) == 1 and len(unexpected) > 3:
            hints.append(f"every unexpected key starts with '{heads.pop()}': a wrapper prefix fullslide does not know")
    if any(k.startswith("encoder.layer.") for k in unexpected):
        hints.append("the file is in the transformers layout: use a recipe that converts it (phikon, phikon-v2)")
    return ("; hint: " + "; ".join(hints)) if hints else ""


def load_encoder_weights(module: nn.Module, path: str | Path, *, layout: str = "timm", strict: bool = True,
                         may_miss: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Load ``path`` into ``module`` (converted from ``layout``); see the module docstring for strictness.
    ``may_miss``: module prefixes the file is not expected to hold (a new task head), never reported missing;
    ``skip``: prefixes of the file's (converted) keys the module's configuration does not use."""
    if layout not in CONVERTERS:
        raise ModelError(f"unknown weight layout '{layout}' (known: {', '.join(CONVERTERS)})")
    own = module.state_dict()
    origin: dict[str, str] = {}
    converted = CONVERTERS[layout](read_tensors(path), origin)
    state = strip_prefixes({k: v for k, v in converted.items() if not k.startswith(skip)}, own, origin)
    state = {k: v for k, v in state.items() if k in own or not IGNORED.match(k)}
    matched = [k for k in state if k in own]

    def named(k: str) -> str:  # the file's own key (and what fullslide made of it, where they differ)
        own_key = origin.get(k, k)
        return own_key if own_key == k else f"{own_key} (as {k})"

    if not matched:
        raise ModelError(f"{path}: none of its {len(state)} tensors match the encoder's parameter names "
                         f"(file: {', '.join(origin.get(k, k) for k in list(state)[:3])}, ...; encoder: "
                         f"{', '.join(list(own)[:3])}, ...)"
                         + _hints(list(own), [origin.get(k, k) for k in state], nothing_matched=True))
    for k in matched:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ModelError(f"{path}: tensor '{named(k)}' has shape {tuple(state[k].shape)}, the encoder expects "
                             f"{tuple(own[k].shape)} (another model size or input size? check the recipe kwargs)")
    missing = [k for k in own if k not in state and not k.startswith(may_miss)]
    unexpected = [origin.get(k, k) for k in state if k not in own]
    if missing or unexpected:
        what = (f"{len(missing)} encoder tensors missing from the file ({', '.join(missing[:10])})" if missing else "")
        what += ("; " if missing and unexpected else "") + (
            f"{len(unexpected)} file tensors the encoder does not have ({', '.join(unexpected[:10])})"
            if unexpected else "")
        if strict:
            raise ModelError(f"{path}: {what}{_hints(missing, unexpected)} (encoder.strict: false loads the rest)")
        log.warning("%s: loaded %d tensors, skipped: %s", path, len(matched), what)
    module.load_state_dict({k: state[k] for k in matched}, strict=False)
