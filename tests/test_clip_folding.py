"""The CLIP backbones fold the uint8 rescale and normalization into the patch embedding: same logits as explicit.

:class:`~mergebench.models.clip._NormalizingImageEncoder` scores ``uint8`` crops through the patch
embedding with ``W′ = W · r / σ`` and ``b′ = b − Σ W · μ / σ``; :meth:`normalized` followed by the float
path is the explicit form. Both must give the same logits (float rounding aside), predictions, gradients
and :func:`torch.func.functional_call` behaviour, for the transformers and the open_clip tower.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers import CLIPImageProcessor

from mergebench.models.clip import ClipImageEncoder, OpenClipImageEncoder, open_clip_visual, open_clip_visual_state, vision_encoder_of
from tall_masks_files import register_tiny_architecture, skip_without_open_clip
from test_clip import tiny_clip, to_open_clip

pytestmark = pytest.mark.usefixtures("one_thread")
# CLIP's own mean and std (they differ per channel) and a rescale factor that is not 1/255
PROCESSOR = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, rescale_factor=1 / 250).to_dict()


def crops(count: int = 16, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def zero_shot_like_head() -> nn.Linear:
    torch.manual_seed(5)
    head = nn.Linear(16, 10, bias=False)
    with torch.no_grad():
        head.weight.copy_(100 * head.weight / head.weight.norm(dim=1, keepdim=True))  # exp(logit_scale) = 100
    return head


def hf_backbone() -> ClipImageEncoder:
    return ClipImageEncoder(vision_encoder_of(tiny_clip()), PROCESSOR).eval()


def open_clip_backbone(tmp_path_factory) -> OpenClipImageEncoder:
    skip_without_open_clip()
    architecture = register_tiny_architecture(tmp_path_factory.mktemp("open_clip_configs"))
    backbone = OpenClipImageEncoder(open_clip_visual(architecture), PROCESSOR)
    backbone.load_state_dict(open_clip_visual_state(to_open_clip(tiny_clip())))
    return backbone.eval()


@pytest.fixture(params=["transformers", "open_clip"])
def backbone(request, tmp_path_factory):
    return hf_backbone() if request.param == "transformers" else open_clip_backbone(tmp_path_factory)


def explicit(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """The reference: rescaled and normalized in float32, then the float (already normalized) path."""
    return backbone(backbone.normalized(pixels))


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    difference = float((actual - expected).abs().max())
    assert difference <= tolerance * float(expected.abs().max()), f"max |Δ| {difference:.3e} against max |x| {float(expected.abs().max()):.3e}"


def test_folded_logits_and_predictions_are_those_of_the_explicit_normalization(backbone):
    head, pixels = zero_shot_like_head(), crops()
    with torch.inference_mode():
        folded, reference = head(backbone(pixels)), head(explicit(backbone, pixels))
    assert_relative(folded, reference)
    assert torch.equal(folded.argmax(dim=1), reference.argmax(dim=1))


def test_the_state_dict_is_unchanged_and_the_fold_follows_loaded_weights(backbone):
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    with torch.no_grad():
        backbone(crops())
    assert all(torch.equal(value, before[key]) for key, value in backbone.state_dict().items())
    conv = backbone.tower().get_submodule(backbone.patch_embedding_path)
    assert conv.bias is None  # CLIP's patch embeddings have none: the fold adds one for the call only
    with torch.no_grad():
        conv.weight.mul_(-0.5)  # as a merged model's load_state_dict does, in place
        head = zero_shot_like_head()
        assert_relative(head(backbone(crops())), head(explicit(backbone, crops())))


def test_functional_call_parameters_and_gradients_go_through_the_fold(backbone):
    """Data-using methods call the backbone through functional_call and differentiate it (runner/access.py)."""
    name = f"{backbone.tower_name}.{backbone.patch_embedding_path}.weight"
    replaced = backbone.state_dict()[name] * 1.5
    head, pixels, labels = zero_shot_like_head(), crops(8), torch.arange(8)
    gradients = []
    for forward in (lambda params: functional_call(backbone, params, (pixels,)),
                    lambda params: functional_call(backbone, params, (backbone.normalized(pixels),))):
        weight = replaced.clone().requires_grad_()
        logits = head(forward({name: weight}))
        nn.functional.cross_entropy(logits, labels).backward()
        gradients.append((logits.detach(), weight.grad))
    (folded, folded_grad), (reference, reference_grad) = gradients
    assert_relative(folded, reference)
    assert_relative(folded_grad, reference_grad, 1e-4)
    assert not torch.allclose(folded, head(explicit(backbone, pixels)).detach())  # the replaced weight was used


def test_under_bfloat16_autocast_the_fold_agrees_with_the_explicit_form(backbone):
    """The GPU path's autocast, on the CPU: the patch embedding in bfloat16 either way."""
    pixels = crops(32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded, reference = backbone(pixels).float(), explicit(backbone, pixels).float()
    with torch.inference_mode():
        exact = explicit(backbone, pixels)
    cosine = nn.functional.cosine_similarity
    assert float(cosine(folded, exact).min()) > 0.99 and float(cosine(reference, exact).min()) > 0.99


def test_reused_float_buffer_gives_each_batch_its_own_embeddings(backbone):
    """Under inference mode uint8 batches are converted into one reused buffer: a smaller batch after a
    larger one, and the larger one again, embed exactly as each does alone outside inference mode."""
    large, small = crops(16, seed=3), crops(5, seed=4)
    with torch.no_grad():
        expected_large, expected_small = backbone(large), backbone(small)
    with torch.inference_mode():
        got = [backbone(large), backbone(small), backbone(large)]
    assert torch.equal(got[0], expected_large) and torch.equal(got[2], expected_large)
    assert torch.equal(got[1], expected_small)
