"""tall_masks checkpoints read through open_clip (the ``[clip]`` extra), on tiny open_clip models saved as tall_masks does.

Skipped, with the reason, where open_clip cannot be imported (``pip install '.[clip]'`` installs it).
"""

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from mergebench.errors import MergebenchError
from mergebench.models.clip import (
    OpenClipImageEncoder,
    convert_open_clip_checkpoint,
    import_open_clip,
    make_preprocess,
    make_resize_crop,
    open_clip_visual,
    open_clip_visual_state,
    read_open_clip_checkpoint,
)
from tall_masks_files import ImageEncoder, register_tiny_architecture, save_tall_masks
from test_clip import pixels, reference_embeds, tiny_clip, to_open_clip

try:
    import_open_clip()
except MergebenchError as error:
    pytest.skip(str(error), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")
PROCESSOR = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).to_dict()


@pytest.fixture(scope="module")
def architecture(tmp_path_factory):
    return register_tiny_architecture(tmp_path_factory.mktemp("open_clip_configs"))


def backbone_from(path, architecture, **read):
    backbone = OpenClipImageEncoder(open_clip_visual(architecture), PROCESSOR)
    backbone.load_state_dict(open_clip_visual_state(read_open_clip_checkpoint(path, **read)))
    return backbone.eval()


def test_tall_masks_state_dict_loads_into_the_architecture_open_clip_builds(architecture, tmp_path):
    encoder = ImageEncoder(architecture, seed=3).eval()
    path = save_tall_masks(encoder, tmp_path / "ViT" / "MNISTVal" / "nonlinear_finetuned.pt")
    backbone = backbone_from(path, architecture)  # a plain state dict: no pickle opt-in needed
    assert set(backbone.state_dict()) == {key[len("model."):] for key in encoder.state_dict() if key.startswith("model.visual.")}
    images = [np.random.default_rng(i).integers(0, 256, size=(40, 36 + 5 * i, 3), dtype=np.uint8) for i in range(3)]
    normalized = torch.stack([make_preprocess(PROCESSOR)(image) for image in images])
    crops = torch.stack([make_resize_crop(PROCESSOR)(image) for image in images])
    with torch.no_grad():
        expected = encoder.model.encode_image(normalized, normalize=True)  # open_clip's own forward of the saved model
        torch.testing.assert_close(backbone(normalized), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(backbone(crops), expected, rtol=1e-5, atol=1e-6)  # uint8: normalized inside
    assert backbone.feed_forward_modules() == ("visual.transformer.resblocks.0.mlp", "visual.transformer.resblocks.1.mlp")


def test_open_clip_tower_computes_what_transformers_computes_on_the_same_weights(architecture):
    """open_clip's tower (QuickGELU, as OpenAI's CLIP) with a transformers CLIP's weights gives its embeddings."""
    clip = tiny_clip()
    backbone = OpenClipImageEncoder(open_clip_visual(architecture), PROCESSOR)
    backbone.load_state_dict(open_clip_visual_state(to_open_clip(clip)))
    with torch.no_grad():
        expected = reference_embeds(clip, pixels())
        torch.testing.assert_close(backbone(pixels()), expected / expected.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_pickled_module_needs_the_opt_in_then_converts_once(architecture, tmp_path):
    encoder = ImageEncoder(architecture, seed=4).eval()
    path = save_tall_masks(encoder, tmp_path / "nonlinear_finetuned.pt", whole_module=True)
    with pytest.raises(MergebenchError, match="allow_pickle=True"):
        read_open_clip_checkpoint(path)
    with pytest.raises(MergebenchError, match="allow_pickle=True"):
        convert_open_clip_checkpoint(path, tmp_path / "out.safetensors")
    converted = convert_open_clip_checkpoint(path, tmp_path / "out.safetensors", allow_pickle=True)
    for key, value in encoder.state_dict().items():
        assert torch.equal(read_open_clip_checkpoint(converted)[key], value)
    with torch.no_grad():
        torch.testing.assert_close(backbone_from(converted, architecture)(pixels()), encoder.model.encode_image(pixels(), normalize=True))


def test_unknown_architecture_and_foreign_state_are_one_line_errors(architecture):
    with pytest.raises(MergebenchError, match=r"open_clip has no architecture 'ViT-B-33' \(open_clip.list_models\(\)"):
        open_clip_visual("ViT-B-33")
    with pytest.raises(MergebenchError, match="no 'visual.conv1.weight' key"):
        open_clip_visual_state({"model.token_embedding.weight": torch.zeros(3, 2)})


def test_vit_b_32_is_built_as_the_openai_tag_and_refuses_weights_of_another_size(architecture, tmp_path):
    """tall_masks builds ``create_model_and_transforms("ViT-B-32", pretrained="openai")``: QuickGELU, 12 blocks of width 768."""
    from open_clip.transformer import QuickGELU

    from mergebench.runner.kinds.clip import fitted

    visual = open_clip_visual("ViT-B-32")
    blocks = visual.transformer.resblocks
    assert len(blocks) == 12 and all(isinstance(block.mlp.gelu, QuickGELU) for block in blocks)
    assert tuple(visual.proj.shape) == (768, 512) and tuple(visual.conv1.weight.shape) == (768, 3, 32, 32)
    tiny = open_clip_visual_state(ImageEncoder(architecture).state_dict())
    backbone = OpenClipImageEncoder(visual, PROCESSOR)
    with pytest.raises(MergebenchError, match=r"tiny.pt does not fit the CLIP vision encoder: missing \['visual.transformer.resblocks.2.ln_1.weight'"):
        fitted(tiny, backbone, "tiny.pt")  # 2 blocks, not 12
    first_block_tiny = {**backbone.state_dict(), **{key: value for key, value in tiny.items() if ".resblocks.0." in key}}
    with pytest.raises(MergebenchError, match=r"tiny.pt: visual.transformer.resblocks.0.ln_1.weight has shape \(32,\), the encoder \(768,\)"):
        fitted(first_block_tiny, backbone, "tiny.pt")
