"""CLIP loading, open_clip conversion, zero-shot heads and preprocessing on a tiny random CLIP (offline).

The tokenizer is a whitespace wrapper over a fixed vocabulary (no vocab/merges files needed): it only
has to produce ``input_ids``/``attention_mask`` the text model accepts. The text config keeps the legacy
``eos_token_id=2``, so CLIP pools at the largest id, which the wrapper reserves for end-of-text.
"""

import sys

import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

from mergebench.errors import MergebenchError
from mergebench.models.clip import (
    image_features,
    import_open_clip,
    load_hf_vision_encoder,
    make_preprocess,
    zero_shot_head,
)

VOCAB_SIZE = 100
END_OF_TEXT = VOCAB_SIZE - 1


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=VOCAB_SIZE, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def to_open_clip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """A transformers CLIP's weights under open_clip's names, mapped by hand, with tall_masks' ``model.`` wrapper prefix."""
    hf = model.state_dict()
    v = "vision_model."
    out = {
        "visual.conv1.weight": hf[v + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf[v + "embeddings.class_embedding"],
        "visual.positional_embedding": hf[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": hf[v + "post_layernorm.weight"],
        "visual.ln_post.bias": hf[v + "post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].t().clone(),
        "logit_scale": hf["logit_scale"],
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
    }
    for i in range(model.config.vision_config.num_hidden_layers):
        layer, block = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat([hf[layer + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[block + f"attn.out_proj.{kind}"] = hf[layer + f"self_attn.out_proj.{kind}"]
            out[block + f"ln_1.{kind}"] = hf[layer + f"layer_norm1.{kind}"]
            out[block + f"ln_2.{kind}"] = hf[layer + f"layer_norm2.{kind}"]
            out[block + f"mlp.c_fc.{kind}"] = hf[layer + f"mlp.fc1.{kind}"]
            out[block + f"mlp.c_proj.{kind}"] = hf[layer + f"mlp.fc2.{kind}"]
    return {"model." + key: value.clone() for key, value in out.items()}


def test_hub_style_folder_round_trip(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    encoder = load_hf_vision_encoder(tmp_path / "clip")
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=pixels()).image_embeds, reference_embeds(model, pixels()))


def test_vision_only_folder_takes_the_pretrained_projection(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    vision = CLIPVisionModel(model.config.vision_config)
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())  # flat in transformers 5
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(MergebenchError, match="projection_source"):
        load_hf_vision_encoder(tmp_path / "vision")
    encoder = load_hf_vision_encoder(tmp_path / "vision", projection_source=tmp_path / "clip")
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=pixels()).image_embeds, reference_embeds(model, pixels()))


def test_without_open_clip_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an environment without open_clip_torch imports
    with pytest.raises(MergebenchError) as error:
        import_open_clip()
    message = str(error.value)
    assert "\n" not in message and "pip install 'mergebench[clip]'" in message and "ModuleNotFoundError" in message


class WhitespaceTokenizer:
    """Words → fixed ids; ``[bos] words [eos]`` right-padded with 0 under a zero attention mask."""

    def __init__(self, words):
        self.ids = {word: index + 2 for index, word in enumerate(sorted(set(words)))}

    def encode(self, text):
        return [1] + [self.ids[word] for word in text.split()] + [END_OF_TEXT]

    def __call__(self, texts, padding=True, return_tensors="pt"):
        encoded = [self.encode(text) for text in texts]
        width = max(map(len, encoded))
        return {
            "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]),
        }


def test_zero_shot_head_rows_are_scaled_normalized_template_means(tmp_path):
    model = tiny_clip()
    classnames, templates = ["cat", "dog", "small bird"], ["a photo of a {c} .", "{c}"]
    tokenizer = WhitespaceTokenizer("a photo of . cat dog small bird".split())
    head = zero_shot_head(model, tokenizer, classnames, templates, "cpu")
    assert head.bias is None and head.weight.shape == (3, 16)
    for row, classname in zip(head.weight, classnames):
        embeddings = []
        for template in templates:
            ids = torch.tensor([tokenizer.encode(template.replace("{c}", classname))])
            with torch.no_grad():
                embedding = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
            embeddings.append(embedding / embedding.norm())
        mean = torch.stack(embeddings).mean(0)
        torch.testing.assert_close(row, mean / mean.norm() * model.logit_scale.exp().detach(), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "clip")
    encoder = load_hf_vision_encoder(tmp_path / "clip")
    with torch.no_grad():
        features = image_features(encoder, pixels())
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert head(features).shape == (3, 3)


# where torchvision is installed (the [clip] extra), transformers 5's CLIPImageProcessor resizes with torchvision;
# make_preprocess reimplements the PIL one, CLIPImageProcessorPil there (CLIPImageProcessor itself in transformers 4)
PIL_IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor)


@pytest.mark.parametrize("shape", [(50, 37, 3), (29, 61), (40, 40, 3)])
def test_preprocess_matches_clip_image_processor(shape):
    processor = PIL_IMAGE_PROCESSOR(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24})
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    expected = processor(images=image if image.ndim == 3 else np.stack([image] * 3, -1), return_tensors="pt")["pixel_values"][0]
    ours = make_preprocess(processor.to_dict())(image)
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_preprocess_rejects_float_images():
    preprocess = make_preprocess(CLIPImageProcessor().to_dict())
    with pytest.raises(MergebenchError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32))
