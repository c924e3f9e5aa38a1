"""The GLUE suites (``kind: glue``: glue-8, glue-7 in ``tasks/glue.yaml``): published sequence-classification experts.

Each model family names its pre-trained base and, per task, its fine-tuned expert's Hub location
(``owner/repo`` or ``owner/repo/sub/folder`` for a repository holding several experts); ``null`` where
the family publishes none. Tasks name their GLUE config, text columns, test split, number of head
outputs (1: regression) and metric. Validation is carved from train as DARE (yule-BUAA/MergeLM
``utils/glue_data_loader.py``) does: ``np.random.RandomState(seed).permutation(n)``, the examples after
the first ``int((1 - fraction)·n)`` of it, here capped at ``max_examples``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mergebench.errors import MergebenchError
from mergebench.suites.published import (
    PublishedSuite, ValidationPolicy, default_model, eval_batch_size, keyed_tasks, listed, mapping, require, string,
    suite_tasks, validation_policy,
)
from mergebench.core.scores import METRIC_LABELS


@dataclass(frozen=True)
class GlueTaskSpec:
    name: str
    dataset: str
    config: str
    text_columns: tuple[str, ...]
    """One column, or a sentence pair (tokenized as a pair)."""
    label_column: str
    test_split: str
    outputs: int
    """Head outputs: classes, or 1 for a regression task."""
    metric: str

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_columns, self.label_column)


@dataclass(frozen=True)
class GlueModelSpec:
    name: str
    base: str
    max_length: int
    experts: Mapping[str, str | None]

    def expert(self, task: str) -> tuple[str, str | None]:
        """``(repo id, subfolder or None)`` of a task's expert."""
        location = self.experts.get(task)
        if location is None:
            raise MergebenchError(f"model {self.name} has no published expert for task {task}: choose a suite without it")
        owner, repo, *sub = location.split("/")
        return f"{owner}/{repo}", "/".join(sub) or None


@dataclass(frozen=True)
class GlueSuite(PublishedSuite):
    name: str
    family: str
    tasks: tuple[GlueTaskSpec, ...]
    models: Mapping[str, GlueModelSpec]
    model_default: str
    validation: ValidationPolicy
    eval_batch_size: int
    source_file: Path
    kind: str = "glue"

    def describe(self) -> dict[str, Any]:
        """The suite's settings as recorded with every result."""
        return {
            "datasets": {t.name: [t.dataset, t.config, t.test_split, t.metric] for t in self.tasks},
            "validation": self.validation.__dict__, "suite_file": self.source_file.name,
        }

    def carve_validation(self, train_examples: int) -> tuple[list[int], list[int]]:
        """``(train, validation)`` indices as DARE draws them (module docstring), validation capped."""
        permutation = np.random.RandomState(seed=self.validation.seed).permutation(train_examples).tolist()
        kept = int((1 - self.validation.fraction) * train_examples)
        validation = permutation[kept:][: self.validation.max_examples]
        if not validation or kept <= 0:
            raise MergebenchError(f"cannot carve a validation split from {train_examples} training examples")
        return permutation[:kept], validation


def glue_suites_from(raw: Any, path: Path) -> dict[str, GlueSuite]:
    """The suites of an already parsed ``kind: glue`` file; every error names the file and the entry."""
    where = str(path)
    raw = mapping(raw, where)
    family = string(require(raw, "family", where), f"{where}: family")
    dataset = string(require(raw, "dataset", where), f"{where}: dataset")
    tasks = keyed_tasks(require(raw, "tasks", where), lambda entry, at: _task(entry, dataset, at), where)
    models = {
        name: _model(name, mapping(spec, f"{where}: models.{name}"), tasks, f"{where}: models.{name}")
        for name, spec in mapping(require(raw, "models", where), f"{where}: models").items()
    }
    model_default = default_model(raw, models, where)
    batch_size = eval_batch_size(raw, 64, where)
    validation = validation_policy(mapping(require(raw, "validation", where), f"{where}: validation"), f"{where}: validation")
    suites = {}
    for suite_name, names in mapping(require(raw, "suites", where), f"{where}: suites").items():
        suites[suite_name] = GlueSuite(
            suite_name, family, suite_tasks(names, tasks, suite_name, where), models, model_default, validation, batch_size, path
        )
    return suites


def _task(spec: Mapping[str, Any], dataset: str, where: str) -> GlueTaskSpec:
    name = string(require(spec, "name", where), f"{where}.name")
    where = f"{where} ({name})"
    text = [string(column, f"{where}.text") for column in listed(require(spec, "text", where), f"{where}.text")]
    if len(text) not in (1, 2):
        raise MergebenchError(f"{where}.text: one column or a pair of columns, got {len(text)}")
    outputs = require(spec, "outputs", where)
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs <= 0:
        raise MergebenchError(f"{where}.outputs must be a positive integer, got {outputs!r}")
    metric = string(require(spec, "metric", where), f"{where}.metric")
    if metric not in METRIC_LABELS:
        raise MergebenchError(f"{where}.metric: unknown metric {metric!r}; metrics are {', '.join(METRIC_LABELS)}")
    if (outputs == 1) != (metric == "spearman"):
        raise MergebenchError(f"{where}: a regression task (outputs: 1) is scored by spearman, and only it")
    return GlueTaskSpec(
        name=name,
        dataset=string(spec.get("dataset", dataset), f"{where}.dataset"),
        config=string(spec.get("config", name), f"{where}.config"),
        text_columns=tuple(text),
        label_column=string(spec.get("label", "label"), f"{where}.label"),
        test_split=string(require(spec, "test_split", where), f"{where}.test_split"),
        outputs=outputs,
        metric=metric,
    )


def _model(name: str, spec: Mapping[str, Any], tasks: Mapping[str, GlueTaskSpec], where: str) -> GlueModelSpec:
    max_length = require(spec, "max_length", where)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise MergebenchError(f"{where}.max_length must be an integer of at least 2, got {max_length!r}")
    experts = dict(mapping(require(spec, "experts", where), f"{where}.experts"))
    for task, location in experts.items():
        if task not in tasks:
            raise MergebenchError(f"{where}.experts: unknown task {task!r}")
        if location is not None and len(string(location, f"{where}.experts.{task}").split("/")) < 2:
            raise MergebenchError(f"{where}.experts.{task}: expected owner/repo[/subfolder], got {location!r}")
    return GlueModelSpec(name, string(require(spec, "base", where), f"{where}.base"), max_length, experts)
