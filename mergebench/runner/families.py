"""Preparing a suite for a sweep: one preparer per kind of suite, all returning a :class:`PreparedSuite`."""

from __future__ import annotations

from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.runner.experts import prepare_trained_suite, trained_suite_status
from mergebench.runner.prepared import PreparedSuite


def prepare_clip_suite(*args, **options) -> PreparedSuite:
    """:func:`mergebench.runner.clip_experts.prepare_clip_suite`, imported (with transformers) on first use."""
    from mergebench.runner.clip_experts import prepare_clip_suite

    return prepare_clip_suite(*args, **options)


def clip_suite_status(*args, **options) -> list[tuple[str, str, str]]:
    """:func:`mergebench.runner.clip_experts.clip_suite_status`, imported on first use."""
    from mergebench.runner.clip_experts import clip_suite_status

    return clip_suite_status(*args, **options)


def llm_suite_status(*args, **options) -> list[tuple[str, str, str]]:
    """:func:`mergebench.runner.llm_experts.llm_suite_status`, imported on first use."""
    from mergebench.runner.llm_experts import llm_suite_status

    return llm_suite_status(*args, **options)


def prepare_glue_suite(*args, **options) -> PreparedSuite:
    """:func:`mergebench.runner.glue_experts.prepare_glue_suite`, imported (with transformers) on first use."""
    from mergebench.runner.glue_experts import prepare_glue_suite

    return prepare_glue_suite(*args, **options)


def glue_suite_status(*args, **options) -> list[tuple[str, str, str]]:
    """:func:`mergebench.runner.glue_experts.glue_suite_status`, imported on first use."""
    from mergebench.runner.glue_experts import glue_suite_status

    return glue_suite_status(*args, **options)


PREPARERS = {"trained": prepare_trained_suite, "clip": prepare_clip_suite, "glue": prepare_glue_suite}
"""``kind: llm`` suites are not prepared into a :class:`PreparedSuite`: :mod:`mergebench.runner.llm_sweep` runs them."""
STATUS = {"trained": trained_suite_status, "clip": clip_suite_status, "llm": llm_suite_status, "glue": glue_suite_status}
OPTIONS = {
    "trained": frozenset(), "clip": frozenset({"checkpoints", "allow_pickle", "data"}),
    "llm": frozenset({"limit", "allow_code_execution"}), "glue": frozenset({"checkpoints", "data"}),
}
"""The options (``--checkpoints``, ``--allow-pickle``, ``--data``, ``--limit``, ``--allow-code-execution``) each
kind takes; a trained suite builds its own experts."""


def suite_options(suite, options: dict, *, strict: bool = True) -> dict:
    """The options that were given (not None or False) and that ``suite``'s kind takes.

    With ``strict``, an option the kind does not take is an error instead of being left out.
    """
    given = {name: value for name, value in options.items() if value is not None and value is not False}
    accepted = OPTIONS.get(suite.kind, frozenset())
    unused = sorted(set(given) - accepted)
    if strict and unused:
        flag = "--" + unused[0].replace("_", "-")
        raise MergebenchError(f"{flag} does not apply to suite {suite.name}: it is of kind {suite.kind!r}")
    return {name: value for name, value in given.items() if name in accepted}


def prepare_suite(suite, model: str | None, device: torch.device, cache: Path, **options) -> PreparedSuite:
    """Checkpoints, heads and evaluation data of ``suite`` with backbone ``model`` (the suite's default if None)."""
    model = suite.resolve_model(model)
    if suite.kind not in PREPARERS:
        raise MergebenchError(f"suite {suite.name} is of kind {suite.kind!r}, which this version cannot run")
    return PREPARERS[suite.kind](suite, model, device, cache, **suite_options(suite, options))


def suite_status(suite, model: str | None, cache: Path, **options) -> list[tuple[str, str, str]]:
    """``(task, source, availability)`` per task of ``suite``: its data and its checkpoints on this machine."""
    if suite.kind not in STATUS:
        raise MergebenchError(f"suite {suite.name} is of kind {suite.kind!r}, which this version cannot list")
    return STATUS[suite.kind](suite, suite.resolve_model(model), cache, **suite_options(suite, options, strict=False))
