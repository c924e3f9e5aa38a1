"""Tiny tall_masks checkpoints: open_clip models of a tiny architecture, saved as tall_masks saves them.

tall_masks ``src/models/modeling.py``: ``ImageEncoder.__init__`` holds ``self.model`` from
``open_clip.create_model_and_transforms(name, pretrained="openai")`` and deletes the text
``transformer`` (``keep_lang=False``); ``ImageEncoder.save`` is ``utils.torch_save(self, filename)``,
which writes ``self.state_dict()`` (keys ``model.visual.*``, ``model.token_embedding.weight``…).
Checkpoints of the earlier task-vectors code are whole pickled ``ImageEncoder`` modules
(``torch.save(image_encoder)``): :func:`save_tall_masks` writes either.

The tiny architecture has the dimensions of ``test_clip.tiny_clip`` (width 32, 2 layers of 2 heads,
MLP 64, 32-px images in 8-px patches, embedding 16, QuickGELU as OpenAI's CLIP), so a transformers
CLIP's weights mapped by ``test_clip.to_open_clip`` load into it.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mergebench.errors import MergebenchError
from mergebench.models.clip import import_open_clip

TINY_ARCHITECTURE = "tiny-ViT-8"
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}


def skip_without_open_clip() -> None:
    """Skip the calling test, with the one-line reason, where open_clip cannot be imported."""
    try:
        import_open_clip()
    except MergebenchError as error:
        pytest.skip(str(error))


def register_tiny_architecture(folder: Path) -> str:
    """Add the tiny architecture to open_clip's registry (``open_clip.add_model_config``); its name."""
    import open_clip

    if TINY_ARCHITECTURE not in open_clip.list_models():
        path = Path(folder) / f"{TINY_ARCHITECTURE}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
    return TINY_ARCHITECTURE


class ImageEncoder(nn.Module):
    """tall_masks' ``ImageEncoder`` as it is pickled: an open_clip model under ``model``, no text transformer."""

    def __init__(self, architecture: str, seed: int = 0):
        super().__init__()
        import open_clip

        torch.manual_seed(seed)
        self.model = open_clip.create_model(architecture, pretrained=None)
        del self.model.transformer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def save_tall_masks(encoder: ImageEncoder, path: Path, *, whole_module: bool = False) -> Path:
    """``ImageEncoder.save`` (the state dict), or the whole module pickled (``whole_module``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder if whole_module else encoder.state_dict(), path)
    return path
