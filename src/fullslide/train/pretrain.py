"""``fullslide pretrain``: self-supervised pretraining of a tile encoder (SimCLR) on tiled slides.

What a pathology foundation model is, made small: an encoder trained without labels on tiles of many slides,
then used frozen (``extract``) or fine-tuned (``train``) on a labelled task. The objective is SimCLR's
normalised-temperature cross-entropy (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", eq. 1): two random views of each tile are pulled together and pushed away from the other
tiles' views, through a two-layer projection head that is thrown away afterwards.

Views are made on the encoder's device in one batched pass: a random crop (60-100% of the side) with flips and
90-degree rotations as one affine resampling per tile, then brightness, per-channel stain strength and
saturation jitter (pathology tiles differ by stain far more than by colour hue). Tiles are read once, a fixed
seeded sample of ``tiles_per_slide`` per slide, and held in memory; every draw comes from one seeded generator,
so the same command on the same tiles gives the same weights on the same device. The output is the backbone's
``state_dict`` as safetensors (what ``encoder.weights`` loads), written atomically, with the settings and the
loss per epoch in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fullslide.atomic import atomic_path
from fullslide.errors import ConfigError

log = logging.getLogger("fullslide.pretrain")
METADATA_KEY = "fullslide:pretrain"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    """Settings of one pretraining run (all recorded in the weights file)."""

    encoder: str = "tinycnn"
    encoder_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra arguments of the encoder factory (e.g. a small ViT: ``{"img_size": 32, "patch_size": 8, ...}``);
    the same ones must be given to ``encoder.kwargs`` when the weights are used."""
    epochs: int = 8
    tiles_per_slide: int = 256
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection_dim: int = 64
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "tiles_per_slide", "projection_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch < 2:
            raise ConfigError(f"pretrain: batch must be >= 2 (contrastive pairs need other tiles), got {self.batch}")
        if not (self.lr > 0 and self.temperature > 0):
            raise ConfigError(f"pretrain: lr and temperature must be > 0, got {self.lr}, {self.temperature}")


def load_tiles(coords_dir: str | Path, tiles_per_slide: int, seed: int) -> tuple[torch.Tensor, int]:
    """A seeded sample of up to ``tiles_per_slide`` tiles of every slide tiled into ``coords_dir``:
    (uint8 [N, 3, P, P], number of slides). Slides whose file cannot be read are skipped with a warning."""
    from fullslide.slides import open_slide
    from fullslide.slides.coords_io import read_coords_and_attrs

    files = sorted(Path(coords_dir).glob("patches/*.h5")) or sorted(Path(coords_dir).glob("*.h5"))
    if not files:
        raise ConfigError(f"pretrain: {coords_dir}: no coords files (*.h5 or patches/*.h5); run `fullslide tile` first")
    parts, sizes = [], set()
    for i, h5 in enumerate(files):
        try:
            coords, geometry, attrs = read_coords_and_attrs(h5)  # one read of the file
            slide_path = str(attrs["slide_path"])
            pick = np.random.default_rng([seed, i]).permutation(len(coords))[:tiles_per_slide]
            with open_slide(slide_path) as slide:
                parts.append(slide.read_tiles(coords[np.sort(pick)], geometry, channels_first=True))
            sizes.add(geometry.tile_px)
        except Exception as exc:  # one bad slide never stops the run
            log.warning("pretrain: skipping %s: %s", h5.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if not parts:
        raise ConfigError(f"pretrain: {coords_dir}: no slide could be read")
    if len(sizes) > 1:
        raise ConfigError(f"pretrain: {coords_dir}: coords of several tile sizes {sorted(sizes)}; tile once per size")
    return torch.from_numpy(np.concatenate(parts)), len(parts)


def make_views(tiles: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each uint8 tile [B, 3, P, P] -> float [B, 3, P, P] in 0..1 (see the module docstring)."""
    b = tiles.shape[0]
    x = tiles.float() / 255.0

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen, device=gen.device)

    scale = uniform(0.6, 1.0)  # crop side as a share of the tile
    shift = (1 - scale)[:, None] * uniform(-1.0, 1.0, 2)  # [B, 2], keeps the crop inside the tile
    quarter = torch.randint(0, 4, (b,), generator=gen, device=gen.device).float() * (math.pi / 2)
    flip = torch.where(torch.rand(b, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(quarter).round(), torch.sin(quarter).round()
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = scale * cos * flip, -scale * sin
    theta[:, 1, 0], theta[:, 1, 1] = scale * sin * flip, scale * cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = x * uniform(0.85, 1.15, 1, 1, 1)  # brightness
    x = 1 - (1 - x) * uniform(0.8, 1.2, 3, 1, 1)  # per-channel stain strength (absorbance-like)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * uniform(0.7, 1.3, 1, 1, 1)  # saturation
    return x.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for projections [B, E] of two views: mean over the 2B anchors of the cross-entropy
    of picking the other view of the same tile among the 2B - 1 other views (cosine similarity / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2B, E]
    sim = z @ z.T / temperature  # [2B, 2B]
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def pretrain(coords_dir: str | Path, out: str | Path, settings: PretrainSettings = PretrainSettings(), *,
             device: str = "cpu", progress: bool = False) -> dict:
    """Pretrain ``settings.encoder`` on the tiles of ``coords_dir`` and save its backbone to ``out``;
    returns the record stored in the file's metadata (settings, tiles, loss per epoch, seconds)."""
    from fullslide.train.checkpoint import save_file

    from fullslide.models import create_encoder
    from fullslide.train.logs import progress_bar

    settings.check()
    t0 = time.perf_counter()
    tiles, n_slides = load_tiles(coords_dir, settings.tiles_per_slide, settings.seed)
    if len(tiles) < settings.batch:
        raise ConfigError(f"pretrain: {coords_dir}: {len(tiles)} tiles, fewer than one batch of {settings.batch}")
    torch.manual_seed(settings.seed)
    encoder = create_encoder(settings.encoder, tile_px=int(tiles.shape[-1]), **settings.encoder_kwargs).to(device)
    width = encoder.feature_dim
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, settings.projection_dim)).to(device)
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = len(tiles) // settings.batch  # the last partial batch is dropped: fewer negatives
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    history: list[float] = []
    encoder.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(tiles), generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch))
        losses = []
        bar = progress_bar(steps_per_epoch, f"pretrain epoch {epoch + 1}", progress)
        for s in range(steps_per_epoch):
            batch = tiles[order[s * settings.batch:(s + 1) * settings.batch]].to(device)
            loss = nt_xent(head(encoder(make_views(batch, gen))), head(encoder(make_views(batch, gen))),
                           settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())  # host sync, once per step
            bar.update(1)
        bar.close()
        history.append(float(np.mean(losses)))
        log.info("pretrain epoch %d/%d: contrastive loss %.4f", epoch + 1, settings.epochs, history[-1])
    record = {"settings": dataclasses.asdict(settings), "coords_dir": str(coords_dir), "slides": n_slides,
              "tiles": len(tiles), "tile_px": int(tiles.shape[-1]), "loss_by_epoch": history,
              "seconds": round(time.perf_counter() - t0, 1)}
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record)})
    return record


def read_pretrain_record(path: str | Path) -> dict | None:
    """The pretraining record stored in a weights file by :func:`pretrain` (None for other files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
