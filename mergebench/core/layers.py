"""Block depth of every parameter slot, for depth-dependent methods such as LiNeS.

The depth of a parameter is the index of the residual block / encoder layer it belongs to, read from
its name. Recognized layouts (the block index is the integer after the marker):

* EfficientNet (``efficientnet_pytorch`` / ``efficientnet-lite-pytorch``): ``net._blocks.{i}.``
* open_clip ViT / CLIP: ``visual.transformer.resblocks.{i}.``
* timm ViT: ``blocks.{i}.``
* HF CLIP / Llama / Mistral / Qwen: ``vision_model.encoder.layers.{i}.``, ``model.layers.{i}.``
* HF BERT / RoBERTa: ``encoder.layer.{i}.``; HF GPT-2: ``transformer.h.{i}.``

Depths are the ranks of the distinct block indices found (so indices need not start at 0 or be
contiguous); a model with two towers (CLIP's text and vision encoders) gives layer i of both the same
depth. L = :func:`num_layers` is the number of distinct depths. Staged layouts are not ordered across
stages: torchvision ResNet's ``layer{s}.{b}.`` matches no marker (every parameter gets depth 0), and
timm's ``stages.{s}.blocks.{b}.`` is ranked by b alone.

Parameters outside every block (stem, embeddings, ``ln_pre``, and also the final norm / projection /
head conv) get depth 0, the shallowest: LiNeS's code (``LiNeS_scaling`` in the authors' ``eval.py``)
scales every key that matches no ``.{i}.`` block pattern by α, the coefficient of the first block.
``trailing="last"`` instead gives the parameters *after* the last block (in layout order) the
deepest depth L − 1. Layout order is state-dict order, in which a module's own parameters precede its
submodules' (open_clip's ``visual.proj`` comes before ``visual.conv1``), so ``"last"`` only moves
trailing submodules such as ``ln_post`` or EfficientNet's ``_conv_head``/``_bn1``.
"""

from __future__ import annotations

import re

from mergebench.core.task_vectors import ParamLayout
from mergebench.errors import MergebenchError

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:_blocks|resblocks|blocks|layers|layer|h)\.(\d+)\.")
TRAILING = ("first", "last")


def block_index(name: str) -> int | None:
    """The block index in a parameter name, or None for parameters outside the blocks."""
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_depths(layout: ParamLayout, *, trailing: str = "first") -> list[int]:
    """Each slot's block depth in 0..L−1; parameters outside the blocks get 0 (see module doc)."""
    if trailing not in TRAILING:
        raise MergebenchError(f"trailing must be one of {', '.join(TRAILING)}, not {trailing!r}")
    indices = [block_index(slot.name) for slot in layout.slots]
    rank = {index: depth for depth, index in enumerate(sorted({i for i in indices if i is not None}))}
    depths = [rank[i] if i is not None else 0 for i in indices]
    if trailing == "last" and rank:
        last_block_slot = max(position for position, i in enumerate(indices) if i is not None)
        for position in range(last_block_slot + 1, len(depths)):
            depths[position] = len(rank) - 1
    return depths


def num_layers(layout: ParamLayout) -> int:
    """L, the number of distinct blocks found in the parameter names (0 if none)."""
    return len({i for i in map(block_index, layout.names) if i is not None})
