"""CLIP ViT vision encoders, zero-shot text heads and image preprocessing.

* FusionBench experts (``tanganke/clip-vit-*_<task>``) are transformers ``CLIPVisionModel`` folders: the
  vision tower only. FusionBench scores them with the *pre-trained* CLIP's ``visual_projection``
  (fusion_bench ``HFCLIPClassifier``), so :func:`load_hf_vision_encoder` takes that projection from
  ``projection_source``; :class:`ClipImageEncoder` is their backbone (keys ``vision_model.*``,
  ``visual_projection.weight``).
* tall_masks experts (``<root>/<model>/<Task>Val/nonlinear_finetuned.pt``) are open_clip models, the
  ``ImageEncoder`` of tall_masks ``src/models/modeling.py`` (``self.model`` from
  ``open_clip.create_model_and_transforms(name, pretrained="openai")``, fine-tuned projection included).
  As their users do, the model is built by open_clip from its architecture name
  (:func:`open_clip_visual`, the ``[clip]`` extra) and the checkpoint's ``visual.*`` tensors are loaded
  into it: :class:`OpenClipImageEncoder`. Files saved as whole pickled modules are read only with
  ``allow_pickle=True`` (unpickling runs code) and :func:`convert_open_clip_checkpoint` writes their
  tensors once as safetensors.
* Zero-shot heads follow tall_masks ``src/models/heads.py build_classification_head``; the head scores
  L2-normalized image embeddings (its ``ClassificationHead(normalize=True)``), see :func:`image_features`.
* Preprocessing reimplements ``CLIPImageProcessor`` (bicubic shortest-side resize, center crop,
  rescale, normalize) with PIL and numpy, without torchvision. It splits in two exact halves: the
  resized, cropped ``uint8`` image (:func:`make_resize_crop`, what a data cache stores: 1 byte per
  value, lossless since PIL resizes ``uint8`` images to ``uint8``) and the rescale and normalization,
  which both backbones (:class:`ClipImageEncoder`, :class:`OpenClipImageEncoder`) apply on the device,
  folded into the weights of their patch embedding (:class:`_NormalizingImageEncoder`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from mergebench.core.checkpoints import StateDict, load_state_dict, save_state_dict
from mergebench.errors import MergebenchError

# ---------------------------------------------------------------------------------------- loading


def load_hf_vision_encoder(name_or_path: str | os.PathLike, *, projection_source: str | os.PathLike | None = None) -> CLIPVisionModelWithProjection:
    """A vision encoder with projection from a Hub id or ``save_pretrained`` folder.

    A full ``CLIPModel`` brings its own projection. A ``CLIPVisionModel`` (FusionBench experts) needs
    ``projection_source``, the pre-trained ``CLIPModel`` whose ``visual_projection`` it is scored with.
    """
    from transformers import AutoConfig, CLIPModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":
        clip = CLIPModel.from_pretrained(name_or_path)
        return _with_projection(clip.vision_model, clip.visual_projection, clip.config)
    if config.model_type == "clip_vision_model":
        if projection_source is None:
            raise MergebenchError(
                f"{name_or_path} is a CLIPVisionModel without projection: pass projection_source= the "
                "pre-trained CLIPModel (e.g. openai/clip-vit-base-patch32), as FusionBench does"
            )
        vision = _vision_tower(CLIPVisionModel.from_pretrained(name_or_path))
        clip = CLIPModel.from_pretrained(projection_source)
        return _with_projection(vision, clip.visual_projection, clip.config)
    raise MergebenchError(f"{name_or_path} is a {config.model_type!r} model, not a CLIP model")


def vision_encoder_of(clip_model: CLIPModel) -> CLIPVisionModelWithProjection:
    """The vision tower and projection of a loaded ``CLIPModel``, as an encoder with projection."""
    return _with_projection(clip_model.vision_model, clip_model.visual_projection, clip_model.config)


def load_vision_tower_state(name_or_path: str | os.PathLike) -> StateDict:
    """The vision tower of a ``CLIPVisionModel`` (FusionBench expert) or ``CLIPModel`` folder, as float32
    tensors under ``vision_model.*`` (the keys of :class:`ClipImageEncoder`); no projection."""
    from transformers import AutoConfig, CLIPModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":
        tower = CLIPModel.from_pretrained(name_or_path).vision_model
    elif config.model_type == "clip_vision_model":
        tower = _vision_tower(CLIPVisionModel.from_pretrained(name_or_path))
    else:
        raise MergebenchError(f"{name_or_path} is a {config.model_type!r} model, not a CLIP vision encoder")
    return {f"vision_model.{key}": _float32(value) for key, value in tower.state_dict().items()}


def vision_config_with_projection(clip_config: Any) -> CLIPVisionConfig:
    """A ``CLIPConfig``'s vision config with its ``projection_dim``: the config of an encoder with projection."""
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(**clip_config.vision_config.to_dict())
    config.projection_dim = clip_config.projection_dim
    return config


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _vision_tower(model: CLIPVisionModel) -> nn.Module:
    # transformers 5 flattened CLIPVisionModel (embeddings, encoder, ... at top level); 4.x nested
    # them under .vision_model. Both towers share the same state-dict keys.
    return getattr(model, "vision_model", model)


def _with_projection(vision: nn.Module, projection: nn.Linear, clip_config: Any) -> CLIPVisionModelWithProjection:
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(vision_config_with_projection(clip_config))
    encoder.vision_model.load_state_dict(vision.state_dict())
    encoder.visual_projection.load_state_dict(projection.state_dict())
    return encoder.eval()


OPEN_CLIP_EXTRA = "pip install 'mergebench[clip]'"
"""How to get open_clip_torch (and the torchvision it needs)."""
VISUAL = "visual."
"""The prefix of open_clip's image tower, the keys of :class:`OpenClipImageEncoder`."""


def import_open_clip():
    """The ``open_clip`` module, or one line naming the extra that installs it."""
    try:
        import open_clip
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError: a torchvision built for another torch
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise MergebenchError(f"tall_masks checkpoints are open_clip models and need open_clip_torch: {OPEN_CLIP_EXTRA} ({reason})") from None
    return open_clip


def open_clip_visual(architecture: str) -> nn.Module:
    """open_clip's image tower of ``architecture`` (``ViT-B-32``…), randomly initialized, in float32.

    Built as tall_masks builds its ``ImageEncoder``, ``open_clip.create_model_and_transforms(name,
    pretrained="openai")``, but without fetching OpenAI's weights: the ``openai`` tag's activation
    (QuickGELU, which OpenAI's CLIP was trained with) is taken from open_clip's pretrained table, and the
    checkpoint's weights are loaded afterwards. An architecture without an ``openai`` tag (a config added
    with ``open_clip.add_model_config``) keeps its config's ``quick_gelu``.
    """
    open_clip = import_open_clip()
    if architecture not in open_clip.list_models():
        raise MergebenchError(f"open_clip has no architecture {architecture!r} (open_clip.list_models(); e.g. ViT-B-32, ViT-B-16, ViT-L-14)")
    quick_gelu = bool(open_clip.get_pretrained_cfg(architecture, "openai").get("quick_gelu", False))
    root = logging.getLogger()
    root.addFilter(_without_random_init_notice)  # the checkpoint's weights replace the random ones next
    try:
        model = open_clip.create_model(architecture, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(_without_random_init_notice)
    return model.visual.float().eval()


def _without_random_init_notice(record: logging.LogRecord) -> bool:
    """Drops open_clip's root-logger warning "No pretrained weights loaded … initialized randomly"."""
    return not record.getMessage().startswith("No pretrained weights loaded")


def read_open_clip_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> StateDict:
    """The tensors of an open_clip checkpoint: safetensors, a plain state dict, or (opt-in) a pickled module.

    tall_masks' ``ImageEncoder.save`` writes the ``ImageEncoder``'s state dict (keys ``model.visual.*``
    and the text tower's embeddings), which loads with ``weights_only=True``; checkpoints saved as whole
    modules (``torch.save(image_encoder)``) are unpickled only with ``allow_pickle`` and need the pickled
    classes (open_clip, the training code's ``ImageEncoder``) importable.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    if not path.is_file():
        raise MergebenchError(f"checkpoint not found: {path}")
    try:
        return load_state_dict(path)
    except MergebenchError as plain_failure:
        if not allow_pickle:
            raise MergebenchError(
                f"{path} is not a plain state dict (a pickled module); unpickling runs code, so "
                "convert it once with mergebench.models.clip.convert_open_clip_checkpoint(src, dst, allow_pickle=True) "
                "in an environment with open_clip, then use the .safetensors file"
            ) from plain_failure
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, ModuleNotFoundError, AttributeError, RuntimeError, EOFError) as error:
        raise MergebenchError(f"cannot unpickle {path}: {error} (are open_clip and the pickled classes importable?)") from error
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise MergebenchError(f"{path} holds neither a module nor a state dict of tensors")
    return dict(state)


def convert_open_clip_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """Write the tensors of an open_clip checkpoint to ``dst`` (safetensors), keys unchanged.

    Plain state dicts are read with ``weights_only=True``; pickled modules only with ``allow_pickle``.
    """
    state = read_open_clip_checkpoint(src, allow_pickle=allow_pickle)
    return save_state_dict(state, dst)


def open_clip_visual_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The image tower's tensors of an open_clip state dict under ``visual.*``, whatever wrapper prefix
    they carry (tall_masks: ``model.``); the text tower's are dropped."""
    anchor = next((key for key in state if key.endswith(VISUAL + "conv1.weight")), None)
    if anchor is None:
        raise MergebenchError("not an open_clip ViT state dict: no 'visual.conv1.weight' key")
    prefix = anchor[: -len(VISUAL + "conv1.weight")]
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix + VISUAL)}


# ------------------------------------------------------------------------------ heads and features


def _text_embeddings(clip_model: CLIPModel, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    output = clip_model.get_text_features(**inputs)
    # transformers 5 returns a ModelOutput whose pooler_output is projected; 4.x returned the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def zero_shot_head(
    clip_model: CLIPModel,
    tokenizer: Callable[..., Mapping[str, torch.Tensor]],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """A bias-free head whose row c is ``normalize(mean_t normalize(text(template_t(c)))) · exp(logit_scale)``.

    ``tokenizer(texts, padding=True, return_tensors="pt")`` must return the text model's inputs (a
    ``CLIPTokenizer`` does); ``templates`` hold a ``{c}`` placeholder (see ``clip_templates``).
    """
    clip_model = clip_model.to(device).eval()
    rows = []
    for classname in classnames:
        texts = [template.replace("{c}", classname) for template in templates]
        inputs = {name: tensor.to(device) for name, tensor in tokenizer(texts, padding=True, return_tensors="pt").items()}
        embeddings = _text_embeddings(clip_model, inputs)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    weight = torch.stack(rows) * clip_model.logit_scale.exp()
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device)
    head.weight.copy_(weight)
    return head


def image_features(encoder: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalized projected image embeddings, the input a :func:`zero_shot_head` expects."""
    embeddings = encoder(pixel_values=pixel_values).image_embeds
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


class _NormalizingImageEncoder(nn.Module):
    """Pixels → the L2-normalized projected image embedding a :func:`zero_shot_head` scores.

    ``uint8`` input (``[B, 3, H, W]`` from :func:`make_resize_crop`) is rescaled and normalized as
    :func:`make_preprocess` does; float input is taken as already normalized. Mean and std are constants
    outside the state dict; subclasses embed the normalized pixels (:meth:`embed`).

    The rescale and normalization of ``uint8`` input are folded into the patch embedding, the first
    layer: a convolution whose stride is its kernel, without padding, so that each output is a linear
    function of one patch's pixels. With ``x̂_c = x_c · r / σ_c − μ_c / σ_c`` (``r`` the rescale factor),
    ``conv(x̂; W, b) = conv(x; W′, b′)`` for ``W′[o, c] = W[o, c] · r / σ_c`` and
    ``b′[o] = b[o] − Σ_{c,i,j} W[o, c, i, j] · μ_c / σ_c``. So a batch is converted from ``uint8`` once
    and the convolution runs on it with ``W′`` and ``b′``, derived from the current weights at each call
    (merged weights, :func:`torch.func.functional_call` parameters and gradients included) through
    :func:`torch.func.functional_call`; the state dict is unchanged, and so is every output but for float
    rounding. :meth:`normalized` is the explicit form, kept as the reference.
    """

    tower_name: str
    """The attribute holding the image tower, the module whose first layer is the patch embedding."""
    patch_embedding_path: str
    """Where the patch-embedding convolution sits in the tower (``nn.Conv2d``, stride = kernel)."""

    def __init__(self, processor_config: Mapping[str, Any]):
        super().__init__()
        mean, std, self.rescale = _normalization(processor_config)
        self.register_buffer("pixel_mean", torch.from_numpy(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.from_numpy(std).view(1, 3, 1, 1), persistent=False)
        self._pixel_buffer: torch.Tensor | None = None

    def tower(self) -> nn.Module:
        """The image tower (:attr:`tower_name`), called by :meth:`embed`."""
        return getattr(self, self.tower_name)

    def embed(self, pixels: torch.Tensor, tower: Callable[..., Any] | None = None) -> torch.Tensor:
        """Projected embeddings of normalized pixels; ``tower`` (default :meth:`tower`) stands in for the tower's call."""
        raise NotImplementedError

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels rescaled and normalized in float32, as :func:`make_preprocess` does."""
        return (pixels.float() * self.rescale - self.pixel_mean) / self.pixel_std

    def folded_patch_embedding(self) -> dict[str, torch.Tensor]:
        """``{"<path>.weight": W′, "<path>.bias": b′}``: the patch embedding taking ``uint8`` values as they are."""
        conv = self.tower().get_submodule(self.patch_embedding_path)
        if not isinstance(conv, nn.Conv2d) or conv.stride != conv.kernel_size or any(conv.padding) or conv.groups != 1 or conv.in_channels != 3:
            raise MergebenchError(f"cannot fold the normalization into {type(conv).__name__} {conv}: not a 3-channel patch embedding")
        weight = conv.weight
        scale = (self.rescale / self.pixel_std).to(weight.dtype).view(1, 3, 1, 1)
        shift = (self.pixel_mean / self.pixel_std).to(weight.dtype).view(1, 3)
        bias = -(weight.sum(dim=(2, 3)) * shift).sum(dim=1)
        if conv.bias is not None:
            bias = bias + conv.bias
        return {f"{self.patch_embedding_path}.weight": weight * scale, f"{self.patch_embedding_path}.bias": bias}

    def float_pixels(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``uint8`` pixels converted to ``dtype``; under ``torch.inference_mode`` (evaluation) into a buffer
        reused from batch to batch, which saves allocating (and page-faulting) a fresh float batch each time."""
        if not torch.is_inference_mode_enabled():
            return pixels.to(dtype)
        buffer = self._pixel_buffer
        if buffer is None or buffer.dtype != dtype or buffer.device != pixels.device or buffer.shape[1:] != pixels.shape[1:] or len(buffer) < len(pixels):
            buffer = self._pixel_buffer = torch.empty(pixels.shape, dtype=dtype, device=pixels.device)
        return buffer[: len(pixels)].copy_(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.is_floating_point():
            embeddings = self.embed(pixels)
        else:
            tower = self.tower()
            folded = self.folded_patch_embedding()
            pixels = self.float_pixels(pixels, folded[f"{self.patch_embedding_path}.weight"].dtype)
            embeddings = self.embed(pixels, lambda *args, **kwargs: functional_call(tower, folded, args, kwargs))
        return embeddings / embeddings.norm(dim=-1, keepdim=True)


class ClipImageEncoder(_NormalizingImageEncoder):
    """A transformers CLIP vision encoder as a backbone; its state dict is that of
    ``CLIPVisionModelWithProjection`` (``vision_model.*``, ``visual_projection.weight``)."""

    tower_name, patch_embedding_path = "vision_model", "embeddings.patch_embedding"

    def __init__(self, encoder: CLIPVisionModelWithProjection, processor_config: Mapping[str, Any]):
        super().__init__(processor_config)
        self.vision_model = encoder.vision_model
        self.visual_projection = encoder.visual_projection

    def embed(self, pixels: torch.Tensor, tower: Callable[..., Any] | None = None) -> torch.Tensor:
        return self.visual_projection((tower or self.vision_model)(pixel_values=pixels).pooler_output)

    def feed_forward_modules(self) -> tuple[str, ...]:
        """The MLP of every transformer layer (``fc1``, GELU, ``fc2``)."""
        return tuple(f"vision_model.encoder.layers.{i}.mlp" for i in range(len(self.vision_model.encoder.layers)))


class OpenClipImageEncoder(_NormalizingImageEncoder):
    """open_clip's image tower (:func:`open_clip_visual`) as a backbone; its state dict is the tower's
    under ``visual.*``, the keys of tall_masks' checkpoints without their ``model.`` prefix
    (:func:`open_clip_visual_state`), projection ``visual.proj`` included."""

    tower_name, patch_embedding_path = "visual", "conv1"

    def __init__(self, visual: nn.Module, processor_config: Mapping[str, Any]):
        super().__init__(processor_config)
        self.visual = visual

    def embed(self, pixels: torch.Tensor, tower: Callable[..., Any] | None = None) -> torch.Tensor:
        return (tower or self.visual)(pixels)

    def feed_forward_modules(self) -> tuple[str, ...]:
        """The MLP of every residual block (``c_fc``, GELU, ``c_proj``)."""
        return tuple(f"visual.transformer.resblocks.{i}.mlp" for i in range(len(self.visual.transformer.resblocks)))


# ---------------------------------------------------------------------------------- preprocessing


def read_image_processor_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``preprocessor_config.json`` of a model folder, legacy integer ``size``/``crop_size`` spelled out
    as ``CLIPImageProcessor`` reads them (``size: 224`` → shortest edge 224, ``crop_size: 224`` → 224×224)."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MergebenchError(f"cannot read the image preprocessing of {folder}: {path.name} ({error})") from error
    if isinstance(config.get("size"), int):
        config["size"] = {"shortest_edge": config["size"]}
    if isinstance(config.get("crop_size"), int):
        config["crop_size"] = {"height": config["crop_size"], "width": config["crop_size"]}
    return config


def make_preprocess(config: Mapping[str, Any]) -> Callable[[np.ndarray], torch.Tensor]:
    """``uint8`` HWC (or HW grayscale) array → normalized float CHW tensor, as ``CLIPImageProcessor`` does.

    ``config`` holds ``size.shortest_edge``, ``crop_size.height/width``, ``image_mean``, ``image_std``
    and optionally ``resample`` (PIL code, default bicubic) and ``rescale_factor`` (default 1/255).
    """
    resize_crop = make_resize_crop(config)
    mean, std, rescale = _normalization(config)

    def preprocess(image: np.ndarray) -> torch.Tensor:
        cropped = resize_crop(image).numpy().astype(np.float32)
        return torch.from_numpy((cropped * rescale - mean.reshape(3, 1, 1)) / std.reshape(3, 1, 1))

    return preprocess


def make_resize_crop(config: Mapping[str, Any]) -> Callable[[np.ndarray | Image.Image], torch.Tensor]:
    """Image (``uint8`` HWC/HW array or PIL image) → RGB, shortest side resized, center-cropped ``uint8`` CHW tensor.

    The first half of :func:`make_preprocess`; the rescale and normalization follow in :class:`ClipImageEncoder`.
    """
    try:
        shortest_edge = int(config["size"]["shortest_edge"])
        crop_height, crop_width = int(config["crop_size"]["height"]), int(config["crop_size"]["width"])
    except (KeyError, TypeError, ValueError) as error:
        raise MergebenchError(f"image processor config lacks size/crop_size/image_mean/image_std: {error}") from error
    if max(crop_height, crop_width) > shortest_edge:
        raise MergebenchError(f"crop {crop_height}x{crop_width} exceeds the resized shortest edge {shortest_edge}")
    resample = Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC)))

    def resize_crop(image: np.ndarray | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
        else:
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise MergebenchError(f"expected a uint8 HW or HWC image, got {image.dtype} with shape {image.shape}")
            pil = Image.fromarray(image).convert("RGB")
        width, height = pil.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest_edge, int(shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        resized = np.asarray(pil.resize(size, resample=resample), dtype=np.uint8).transpose(2, 0, 1)
        top = (resized.shape[1] - crop_height) // 2
        left = (resized.shape[2] - crop_width) // 2
        return torch.from_numpy(np.ascontiguousarray(resized[:, top : top + crop_height, left : left + crop_width]))

    return resize_crop


def _normalization(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """``(mean, std, rescale_factor)`` of an image processor config, mean and std as float32 ``[3]``."""
    try:
        mean = np.asarray(config["image_mean"], dtype=np.float32).reshape(3)
        std = np.asarray(config["image_std"], dtype=np.float32).reshape(3)
    except (KeyError, TypeError, ValueError) as error:
        raise MergebenchError(f"image processor config lacks size/crop_size/image_mean/image_std: {error}") from error
    return mean, std, float(config.get("rescale_factor", 1 / 255))
