"""Published ``*ForSequenceClassification`` checkpoints split into a mergeable encoder and a task head.

transformers' sequence classifiers are an encoder (``model.base_model``: ``RobertaModel`` without
pooler, ``GPT2Model``) and a head read off one token's last hidden state:

* RoBERTa (``RobertaForSequenceClassification``): ``classifier`` (dense, tanh, out_proj) on the first
  token ``<s>``; the attention mask is ``ids != pad``.
* GPT-2 (``GPT2ForSequenceClassification``): the bias-free ``score`` on the last non-padding token, the
  position ``argmax(arange(L) · (ids != pad))`` that transformers takes; padding is on the right.

:class:`SequenceEncoder` runs the encoder and returns that token's hidden state ``[N, hidden]``;
:func:`task_head` wraps the expert's own head to take it, so ``head(encoder(ids))`` equals the
published model's logits. Only the encoder is merged; every task keeps its expert's head.
"""

from __future__ import annotations

import torch
from torch import nn

from mergebench.errors import MergebenchError
from mergebench.models.text_encoder import feed_forward_module_names, without_padding_columns

POOLED_TOKEN = {"roberta": "first", "gpt2": "last"}
"""The token each supported model type's head reads."""


class SequenceEncoder(nn.Module):
    """Token ids ``[N, L]`` (right-padded with ``pad_token_id``) → the hidden state ``[N, hidden]`` the head reads."""

    def __init__(self, encoder: nn.Module, model_type: str, pad_token_id: int):
        super().__init__()
        if model_type not in POOLED_TOKEN:
            raise MergebenchError(f"{model_type!r} sequence classifiers are not supported; supported: {', '.join(POOLED_TOKEN)}")
        self.encoder = encoder
        self.pooled = POOLED_TOKEN[model_type]
        self.pad_token_id = int(pad_token_id)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids, mask = without_padding_columns(token_ids, self.pad_token_id)
        hidden = self.encoder(input_ids=token_ids, attention_mask=mask.long()).last_hidden_state
        if self.pooled == "first":
            return hidden[:, 0]
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def feed_forward_modules(self) -> tuple[str, ...]:
        return feed_forward_module_names(self)


class FirstTokenHead(nn.Module):
    """A RoBERTa ``classifier``, which indexes the first token itself, fed the pooled state as a one-token sequence."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.unsqueeze(1))


def task_head(model: nn.Module) -> nn.Module:
    """The expert's own head as a module over :class:`SequenceEncoder` features, in evaluation mode."""
    model_type = model.config.model_type
    if model_type == "roberta":
        return FirstTokenHead(model.classifier).eval()
    if model_type == "gpt2":
        return model.score.eval()
    raise MergebenchError(f"{model_type!r} sequence classifiers are not supported; supported: {', '.join(POOLED_TOKEN)}")
