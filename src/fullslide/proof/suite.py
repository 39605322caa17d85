"""``fullslide check-grad --suite``: the paths users run, each as one check, in one launch per process count.

Each scenario is a :class:`~fullslide.proof.checkgrad.CheckSpec` chosen so that a class of bug cannot hide in it:

- ``default``: tinycnn + GMA with every probe, every layout of 1, 2 and 4 processes, every memory mode;
- ``abmil``, ``mean``, ``max``, ``transformer``: every other aggregator (all with dropout, so the seeding of
  their calls is checked; ``max`` and ``transformer`` are one whole-slide call, the others streamed);
- ``bfloat16`` and ``float16``: autocast on the encoder, the aggregator and the loss in float32 (checked at the
  float32-rounding tolerance of the aggregator), float16 with a real ``torch.amp.GradScaler``;
- ``lora`` and ``last-blocks``: a 12-block ViT (block numbers of two digits) with LoRA (dropout on) or the last
  3 blocks trainable, block checkpointing and layer-wise lr decay as the optimizer sees it;
- ``peaked``: slides of 700 to 1,300 tiles with sharpened attention, so most tile-stage chunks have every weight
  below 1e-3 and the highest score comes in a late chunk;
- ``resnet18``: the config's default encoder with GMA (BatchNorm in eval mode, a deep conv net);
- ``context``: whole-slide context (``train.context: cache``): cached rows appended to the fresh ones, a slide
  with no cached rows (K = N) and one whose K fresh tiles fit one chunk (with 2 ranks, one holds cached rows only);
- ``positions-gma`` and ``alibi``: aggregators that use the tiles' positions on the slide (GMA with 2-D
  sine/cosine positions, streamed chunk by chunk; a transformer with 2-D ALiBi, one whole-slide call), with
  context rows placed on the grid too;
- ``chief``: CHIEF's slide encoder as the aggregator, trained with the tile encoder (streamed attention pooling);
- ``gigapath-slide``: Prov-GigaPath's LongNet slide encoder (narrowed; segments of 4 and 8 tiles and the whole
  slide, dilations 1, 2, 4: padded segments and head groups), one whole-slide call with context rows, fine-tuned
  with the tile encoder.

On a 2-core CPU the suite takes a few minutes (BENCHMARKS.md); ``--nproc`` limits the process counts.
"""

from __future__ import annotations

from fullslide.proof.checkgrad import CheckSpec

_TWO = [1, 2]
_VIT12 = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2}
_SOME_MODES = ["full", "checkpoint", "recompute", "auto-half"]
#: Prov-GigaPath's slide encoder narrowed for a CPU check (dropout on, so its seeding is checked too)
_GIGAPATH_SMALL = {"dim": 32, "depth": 2, "heads": 8, "segment_length": [4, 8, 4096], "dilated_ratio": [1, 2, 4],
                   "dropout": 0.1, "drop_path": 0.1}


def suite_specs(device: str = "cpu") -> list[CheckSpec]:
    """The scenarios of the suite (module docstring), in the order they are reported."""
    small = dict(tiles=[14, 9, 20], slides=3, tile_px=16, chunk_tiles=4, aggregator_chunk_tiles=4, device=device)
    vit = dict(encoder="vit_tiny_patch16_224", encoder_kwargs=_VIT12, tile_px=32, tiles=[10, 7], slides=2,
               chunk_tiles=4, aggregator_chunk_tiles=4, modes=_SOME_MODES, nprocs=_TWO, device=device)
    return [
        CheckSpec(name="default", device=device),
        *[CheckSpec(name=agg, aggregator=agg, modes=_SOME_MODES, nprocs=_TWO, **small)
          for agg in ("abmil", "mean", "max", "transformer")],
        CheckSpec(name="bfloat16", dtype="bfloat16", nprocs=_TWO, **small),
        CheckSpec(name="float16", dtype="float16", nprocs=_TWO, **small),
        CheckSpec(name="lora", lora_rank=4, lora_dropout=0.1, grad_checkpointing=True, layer_decay=0.75, **vit),
        CheckSpec(name="last-blocks", trainable_blocks=3, grad_checkpointing=True, layer_decay=0.75, **vit),
        CheckSpec(name="peaked", tiles=[700, 1300, 90], slides=3, tile_px=16, chunk_tiles=128,
                  aggregator_chunk_tiles=64, attention_scale=200.0, steps=2, micro_batches=1,
                  modes=["full", "recompute", "auto-half"], nprocs=_TWO, device=device),
        CheckSpec(name="context", tiles=[14, 9, 3], slides=3, tile_px=16, chunk_tiles=4, aggregator_chunk_tiles=8,
                  context_tiles=[40, 0, 25], nprocs=_TWO, device=device),
        # spatial aggregators: tile positions streamed chunk by chunk (GMA + 2-D sine/cosine positions) and in one
        # whole-slide call (transformer with 2-D ALiBi), both with context rows placed on the grid too
        CheckSpec(name="positions-gma", aggregator_kwargs={"positional": True}, modes=_SOME_MODES,
                  context_tiles=[12, 0, 7], nprocs=_TWO, **small),
        CheckSpec(name="alibi", aggregator="transformer", aggregator_kwargs={"alibi": True}, modes=_SOME_MODES,
                  context_tiles=[12, 0, 7], nprocs=_TWO, **small),
        # a slide encoder fine-tuned with the tile encoder: CHIEF's (768-d input: tinycnn of width 192)
        CheckSpec(name="chief", aggregator="chief", encoder_kwargs={"width": 192}, modes=_SOME_MODES, nprocs=_TWO,
                  **small),
        CheckSpec(name="gigapath-slide", aggregator="gigapath-slide", aggregator_kwargs=_GIGAPATH_SMALL,
                  modes=_SOME_MODES, context_tiles=[12, 0, 7], nprocs=_TWO, **small),
        CheckSpec(name="resnet18", encoder="resnet18", tiles=[24, 17, 9], slides=3, tile_px=16, chunk_tiles=8,
                  modes=_SOME_MODES, nprocs=_TWO, device=device),
    ]
