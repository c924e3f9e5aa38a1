"""``kind: glue``: suites of published GLUE experts (glue-8 and glue-7 in ``tasks/glue.yaml``).

Kind-specific keys of a suite file
    ``dataset`` (the GLUE dataset on the Hub; a task's config is its name unless it gives ``config``);
    ``models.<name>``: ``base`` (the pre-trained model), ``max_length`` (tokens), ``experts`` (task →
    ``owner/repo[/sub/folder]``, or null where the family publishes none); ``tasks[i]``: ``text`` (one
    column or a pair), ``label``, ``test_split``, ``outputs`` (classes, 1: regression), ``metric``.
    Validation is carved from train by the file's ``validation`` policy (:meth:`GlueSuite.carve_validation`).

What is merged
    The encoder of each ``*ForSequenceClassification`` expert (``model.base_model``); every task keeps
    its expert's own head (:mod:`mergebench.models.sequence_classifier`). The pre-trained encoder is the
    family's base model (e.g. ``FacebookAI/roberta-base``, ``openai-community/gpt2``), loaded the same
    way, so its keys are the experts' encoder keys.

Checkpoints (``checkpoints=``, the command line's ``--checkpoints``)
    * ``None`` or ``"hub"``: the suite file's Hub locations, through :mod:`mergebench.runner.hub`
      (``owner/repo/sub/folder`` downloads only that folder of a repository of several experts).
    * ``PATH``: Hub-style folders named like the repositories, as ``hf download <repo> --local-dir
      PATH/<repo name>`` leaves them: ``PATH/gpt2`` (base; the Hub id when the folder is absent),
      ``PATH/gpt2_cola``, ``PATH/roberta_base_glue_ckpts/cola/roberta-base_lr1e-05``.

    The tokenizer is the base model's. A tokenizer without a padding token (GPT-2) pads with its unknown
    token, else its end-of-text token, as FusionBench's ``load_gpt2_tokenizer`` does; an expert whose
    config names another ``pad_token_id`` is refused, since its head reads the last non-padding token.

Data (``data=``, ``--data``, default ``$MERGEBENCH_DATA``)
    ``<data>/<task>`` (e.g. ``$MERGEBENCH_DATA/cola``), a ``DatasetDict.save_to_disk`` folder with the
    GLUE splits and columns, else ``datasets.load_dataset("nyu-mll/glue", "<task>")``. GLUE's test
    labels are hidden, so test is the task's validation split (``validation_matched`` for MNLI) and
    validation is carved from train (:meth:`GlueSuite.carve_validation`), as DARE and FusionBench
    do. Texts (a sentence or a sentence pair) are tokenized with the model's ``max_length`` (DARE: 128
    for RoBERTa; FusionBench: 512 for GPT-2) and right-padded. Training data (data-using methods) is
    the rest of train, in the order of the same permutation, tokenized as far as a method reads.

Scores
    Each task's metric: accuracy, Matthews correlation (CoLA) or Spearman's ρ (STS-B, a one-output
    regression head), :mod:`mergebench.evaluation.metrics`. Data-using methods that read the heads'
    outputs as class probabilities (Fisher, AdaMerging's entropy) get no signal from STS-B's single
    output; those that read inputs only (RegMean) are unaffected.
"""


from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mergebench.core.checkpoints import StateDict, check_compatible
from mergebench.core.task_vectors import buffer_names
from mergebench.errors import MergebenchError
from mergebench.models.sequence_classifier import SequenceEncoder, task_head
from mergebench.models.text_encoder import tokenize
from mergebench.core.scores import METRIC_LABELS
from mergebench.runner.evaluators import InMemoryEvaluator
from mergebench.runner.hub import (
    CHECKPOINTS, DATA, TaskDataSource, data_root, folder_sha256, hub_cached, hub_download_hint, hub_folder, repo_name,
)
from mergebench.runner.kinds import TV_DTYPE, Kind, TaskStatus, register_kind
from mergebench.runner.prepared import LazyInputs, PreparedSuite, TaskData
from mergebench.store.database import content_key
from mergebench.suites.schema import Fields, SuiteBase, SuiteDocument, ValidationPolicy

HUB = "hub"


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
    family: str
    """Who trained the experts (``dare_roberta``, ``fusion_bench_gpt2``): published numbers compare within one family."""

    def expert(self, task: str) -> tuple[str, str | None]:
        """``(repo id, subfolder or None)`` of a task's expert."""
        location = self.experts.get(task)
        if location is None:
            raise MergebenchError(f"model {self.name} has no published expert for task {task}: choose a suite without it")
        owner, repo, *sub = location.split("/")
        return f"{owner}/{repo}", "/".join(sub) or None


@dataclass(frozen=True)
class GlueSuite(SuiteBase):
    name: str
    family: str
    tasks: tuple[GlueTaskSpec, ...]
    models: Mapping[str, GlueModelSpec]
    model_default: str
    validation: ValidationPolicy
    eval_batch_size: int
    source_file: Path
    kind: str = "glue"

    def context(self) -> tuple:
        """What evaluation data and heads depend on, besides tasks, model and checkpoints."""
        return (self.validation,)

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


class GlueCheckpoints:
    """Where the base model and the experts of one suite and model come from (module docstring)."""

    def __init__(self, suite: GlueSuite, model: str, checkpoints: str | os.PathLike | None):
        self.suite = suite
        self.spec = suite.model(model)
        self.root = None if checkpoints is None or str(checkpoints) == HUB else Path(checkpoints)

    def _local(self, repo: str, subfolder: str | None) -> Path | None:
        return None if self.root is None else self.root / repo_name(repo) / (subfolder or "")

    def base_folder(self) -> Path:
        local = self._local(self.spec.base, None)
        return local if local is not None and local.is_dir() else hub_folder(self.spec.base, "pre-trained model", self.root)

    def expert_folder(self, task: str) -> Path:
        repo, subfolder = self.spec.expert(task)
        local = self._local(repo, subfolder)
        if local is None:
            return hub_folder(repo, f"expert for task {task}", None, subfolder)
        if not (local / "config.json").is_file():
            raise MergebenchError(
                f"expert for task {task} not found: expected a save_pretrained folder {local} "
                f"(`hf download {repo} --local-dir {self.root / repo_name(repo)}`)"
            )
        return local

    def status(self, repo: str, subfolder: str | None = None) -> tuple[str, str | None]:
        """``(status, how to get it)`` of a checkpoint on this machine (no network)."""
        local = self._local(repo, subfolder)
        if local is not None and (local / "config.json").is_file():
            return f"ready ({local})", None
        if hub_cached(repo, subfolder) is not None:
            return "ready (Hugging Face cache)", None
        return "missing", hub_download_hint(repo, self.root)


def load_classifier(folder: Path, what: str) -> nn.Module:
    """A ``*ForSequenceClassification`` model from a ``save_pretrained`` folder, float32, evaluation mode."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergebenchError(f"cannot load {what} from {folder}: {reason}") from None
    return model.float().eval()


def load_tokenizer(base: Path):
    """The base model's tokenizer, padding as FusionBench's ``load_gpt2_tokenizer`` where it has no padding token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise MergebenchError(f"the tokenizer of {base} has no padding, unknown or end-of-text token to pad with")
    return tokenizer


def encode(dataset, task: GlueTaskSpec, indices: Sequence[int], tokenizer, max_length: int, width: int | None = None) -> torch.Tensor:
    """Token ids of the examples at ``indices``: the task's sentence or sentence pair."""
    rows = dataset.select_columns(list(task.text_columns)).select(list(indices))
    pairs = rows[task.text_columns[1]] if len(task.text_columns) == 2 else None
    return tokenize(rows[task.text_columns[0]], tokenizer, max_length, pairs, width)


def labels_of(dataset, task: GlueTaskSpec, indices: Sequence[int]) -> torch.Tensor:
    """Float targets of a regression task, else integer classes checked against the head's outputs."""
    values = np.asarray(dataset[task.label_column])[np.asarray(indices, dtype=np.int64)]
    if task.outputs == 1:
        return torch.as_tensor(values, dtype=torch.float32)
    labels = torch.as_tensor(values, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= task.outputs):
        raise MergebenchError(
            f"task {task.name}: labels span {int(labels.min())}..{int(labels.max())} but its head has {task.outputs} outputs "
            "(GLUE's test splits hide their labels as -1: test on validation)"
        )
    return labels


class GlueData:
    """The tokenized splits of a suite's tasks for one model."""

    def __init__(self, suite: GlueSuite, root: Path | None, tokenizer, max_length: int):
        self.suite = suite
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sources = {task.name: TaskDataSource(task, root) for task in suite.tasks}

    def _split(self, task: GlueTaskSpec, split: str):
        source = self.sources[task.name]
        if split == "test":
            dataset = source.open(task.test_split)
            return dataset, list(range(len(dataset)))
        dataset = source.open("train")
        return dataset, self.suite.carve_validation(len(dataset))[1]

    def load(self, task: GlueTaskSpec, split: str) -> TaskData:
        dataset, indices = self._split(task, split)
        classes = tuple(getattr(dataset.features[task.label_column], "names", ()))
        inputs = encode(dataset, task, indices, self.tokenizer, self.max_length)
        return TaskData(inputs, labels_of(dataset, task, indices), classes, task.metric)

    def load_train(self, task: GlueTaskSpec) -> TaskData:
        """Train minus the carved validation, in permutation order, tokenized (to ``max_length`` columns) as far as read."""
        dataset = self.sources[task.name].open("train")
        indices = self.suite.carve_validation(len(dataset))[0]

        def tokens(chunk: Sequence[int]) -> torch.Tensor:
            return encode(dataset, task, chunk, self.tokenizer, self.max_length, width=self.max_length)

        classes = tuple(getattr(dataset.features[task.label_column], "names", ()))
        return TaskData(LazyInputs(tokens, indices), labels_of(dataset, task, indices), classes, task.metric)

    def key(self, task: GlueTaskSpec, split: str) -> str:
        source = self.sources[task.name]
        used, spec = (task.test_split, "split") if split == "test" else ("train", self.suite.validation)
        return content_key(
            task.dataset, task.config, task.columns, used, spec, source.fingerprint(used), self.max_length, self.tokenizer.pad_token_id
        )[:12]


def expert_state(model: nn.Module, task: GlueTaskSpec, base_type: str, pad_token_id: int, folder: Path) -> StateDict:
    """An expert's encoder weights under :class:`SequenceEncoder` keys, after checking it fits the task and base."""
    config = model.config
    if config.model_type != base_type:
        raise MergebenchError(f"expert {folder} is a {config.model_type!r} model, the base a {base_type!r} one")
    if config.num_labels != task.outputs:
        raise MergebenchError(f"expert {folder} has {config.num_labels} outputs, task {task.name} needs {task.outputs}")
    if config.pad_token_id is not None and config.pad_token_id != pad_token_id:
        raise MergebenchError(f"expert {folder} pads with token {config.pad_token_id}, the base tokenizer with {pad_token_id}")
    return {f"encoder.{key}": value.detach().float() if value.is_floating_point() else value for key, value in model.base_model.state_dict().items()}


def prepare_glue_suite(
    suite: GlueSuite,
    model: str,
    device: torch.device,
    cache: Path,
    checkpoints: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
) -> PreparedSuite:
    """Encoders, expert heads and tokenized evaluation data of a ``kind: glue`` suite (module docstring)."""
    source = GlueCheckpoints(suite, model, checkpoints)
    if source.root is not None and not source.root.is_dir():
        raise MergebenchError(f"--checkpoints {source.root}: no such folder (or pass --checkpoints hub)")
    base = source.base_folder()
    folders = {task.name: source.expert_folder(task.name) for task in suite.tasks}  # all found before any is loaded
    tokenizer = load_tokenizer(base)
    base_model = load_classifier(base, "pre-trained model")
    base_type = base_model.config.model_type
    backbone = SequenceEncoder(base_model.base_model, base_type, tokenizer.pad_token_id)
    pretrained = {key: value.detach().clone() for key, value in backbone.state_dict().items()}
    finetuned, heads = {}, {}
    for task in suite.tasks:
        expert = load_classifier(folders[task.name], f"expert for task {task.name}")
        finetuned[task.name] = expert_state(expert, task, base_type, tokenizer.pad_token_id, folders[task.name])
        heads[task.name] = task_head(expert).to(device)
    check_compatible(pretrained, finetuned)

    glue_data = GlueData(suite, data_root(data), tokenizer, source.spec.max_length)
    evaluation = {split: {task.name: glue_data.load(task, split) for task in suite.tasks} for split in ("validation", "test")}
    hashes = {"pretrained": folder_sha256(base, f"pre-trained model {source.spec.base}")}
    for task in suite.tasks:
        hashes[task.name] = folder_sha256(folders[task.name], f"expert for task {task.name}")
        for split in ("validation", "test"):
            hashes[f"{task.name}.{split}.data"] = glue_data.key(task, split)
    by_name = {task.name: task for task in suite.tasks}
    return PreparedSuite(
        suite, model, device, backbone.to(device).eval(), pretrained, finetuned, heads, evaluation, hashes,
        buffer_names(backbone), load_train=lambda name: glue_data.load_train(by_name[name]),
    )


def _task(entry: Fields, dataset: str) -> GlueTaskSpec:
    entry.only("name", "dataset", "config", "text", "label", "test_split", "outputs", "metric")
    name = entry.data["name"]
    text = entry.strings("text")
    if len(text) not in (1, 2):
        raise MergebenchError(f"{entry.at('text')}: one column or a pair of columns, got {len(text)}")
    outputs = entry.integer("outputs")
    metric = entry.choice("metric", tuple(METRIC_LABELS))
    if (outputs == 1) != (metric == "spearman"):
        raise MergebenchError(f"{entry.where}: a regression task (outputs: 1) is scored by spearman, and only it")
    return GlueTaskSpec(
        name=name, dataset=entry.string("dataset", dataset), config=entry.string("config", name), text_columns=text,
        label_column=entry.string("label", "label"), test_split=entry.string("test_split"), outputs=outputs, metric=metric,
    )


def _model(name: str, spec: Fields, tasks: Mapping[str, GlueTaskSpec]) -> GlueModelSpec:
    spec.only("base", "max_length", "experts", "checkpoint_family")
    experts = spec.fields("experts")
    for task, location in experts.data.items():
        if task not in tasks:
            raise MergebenchError(f"{experts.at(task)}: unknown task")
        if location is not None and len(experts.string(task).split("/")) < 2:
            raise MergebenchError(f"{experts.at(task)}: expected owner/repo[/subfolder], got {location!r}")
    return GlueModelSpec(name, spec.string("base"), spec.integer("max_length", minimum=2), dict(experts.data), spec.string("checkpoint_family"))


@register_kind
class GlueKind(Kind):
    """Published sequence-classification experts, each with its own head, scored by each GLUE task's metric."""

    name = "glue"
    settings = frozenset({"dataset"})
    options = (CHECKPOINTS, DATA, TV_DTYPE)

    def suites(self, document: SuiteDocument) -> list[GlueSuite]:
        dataset = document.settings.string("dataset")
        tasks = {entry.data["name"]: _task(entry, dataset) for entry in document.tasks}
        models = {name: _model(name, spec, tasks) for name, spec in document.models.items()}
        validation = document.validation_of(Fields({}, document.where))
        if not isinstance(validation, ValidationPolicy):
            raise MergebenchError(f"{document.where}: validation must be {{fraction, max_examples, seed}} (carved from train) for a GLUE suite")
        return [
            GlueSuite(
                name, document.family, tuple(tasks[task] for task in members), models, document.default_model, validation,
                document.eval_batch_size or 64, document.path,
            )
            for name, members in document.suites.items()
        ]

    def status(self, suite: GlueSuite, model: str, cache: Path, checkpoints=None, data=None, **options) -> list[TaskStatus]:
        """The base model first, then per task its expert and its data (no network)."""
        source = GlueCheckpoints(suite, model, checkpoints)
        if source.root is not None and not source.root.is_dir():
            return [TaskStatus("checkpoints", str(source.root), "missing: no such folder")]
        rows = [TaskStatus("pretrained", source.spec.base, *source.status(source.spec.base))]
        root = data_root(data)
        for task in suite.tasks:
            data_source = TaskDataSource(task, root)
            if source.spec.experts.get(task.name) is None:
                expert, expert_hint = f"none published for {model}", None
            else:
                expert, expert_hint = source.status(*source.spec.expert(task.name))
            data_status, data_hint = data_source.status()
            hint = "; ".join(filter(None, (expert_hint, data_hint))) or None
            rows.append(TaskStatus(task.name, data_source.describe(), f"expert {expert}; {data_status}", hint))
        return rows

    def checkpoint_family(self, suite: GlueSuite, model: str, **options) -> str:
        return suite.model(model).family

    def evaluator(self, suite: GlueSuite, model: str, device: torch.device, cache: Path, tv_dtype: str = "fp32", **options) -> InMemoryEvaluator:
        return InMemoryEvaluator(prepare_glue_suite(suite, model, device, cache, **options), tv_dtype)
