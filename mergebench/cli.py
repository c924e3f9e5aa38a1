"""The ``mergebench`` command line: run sweeps, print reports and plots, list methods and suites."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from mergebench.errors import MergebenchError

DEFAULT_OUT = Path("results")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _suite_names(args: argparse.Namespace) -> list[str]:
    return [name for text in args.suite for name in _names(text)]


def parse_hparams(entries: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``ties.k=30,dare.p=0.3`` (or ``k=30`` when one method is run) → ``{method: {name: value}}``."""
    overrides: dict[str, dict[str, str]] = {}
    for entry in (item for text in entries for item in _names(text)):
        name, equals, value = entry.partition("=")
        if not equals or not value:
            raise MergebenchError(f"--hparams entry {entry!r} is not of the form method.name=value")
        method, dot, hparam = name.rpartition(".")
        if not dot:
            if len(methods) != 1:
                raise MergebenchError(f"--hparams entry {entry!r} must name its method (method.{name}=...) when several run")
            method = methods[0]
        overrides.setdefault(method, {})[hparam] = value
    return overrides


def _sweep_request(args: argparse.Namespace):
    from mergebench.runner.sweep import SweepRequest

    methods = _names(args.methods)
    return SweepRequest(
        suites=_suite_names(args), methods=methods, overrides=parse_hparams(args.hparams, methods), device=args.device,
        out=args.out, cache=args.cache, model=args.model, seed=args.seed, examples=args.examples,
        checkpoints=args.checkpoints, allow_pickle=args.allow_pickle, data=args.data,
        limit=args.limit, allow_code_execution=args.allow_code_execution,
    )


def command_run(args: argparse.Namespace) -> None:
    from mergebench.runner.sweep import run_sweep

    request = _sweep_request(args)
    run_sweep(request)
    print()
    _report(args.out, request.suites, args.model, args.seed)


def command_continual(args: argparse.Namespace) -> None:
    from mergebench.reports.continual import load_arrivals, plot_arrivals, summarize, to_markdown
    from mergebench.runner.continual import ContinualRequest, run_continual
    from mergebench.store.database import ResultStore

    request = _sweep_request(args)
    run_continual(ContinualRequest(request, args.orders))
    store = ResultStore(args.out)
    for suite in request.suites:
        summary = summarize(load_arrivals(store, suite, args.model))
        print(to_markdown(suite, summary))
        print(f"wrote {plot_arrivals(suite, summary, args.out / 'plots' / f'{suite}-continual.png')}")


def command_report(args: argparse.Namespace) -> None:
    _report(args.out, _suite_names(args), args.model, args.seed)


def _report(out: Path, suites: Sequence[str], model: str | None, seed: int, *, tables: bool = True) -> None:
    """Print and write the tables (unless ``tables`` is False) and the plots of ``suites``."""
    from mergebench.reports.plots import plot_per_task, plot_task_count
    from mergebench.reports.tables import available, load_table, to_markdown, write_reports
    from mergebench.store.database import PRETRAINED, ResultStore

    store = ResultStore(out)
    suites = list(suites) or sorted({suite for suite, _ in available(store)})
    if not suites:
        raise MergebenchError(f"no results in {store.path}: run `mergebench run` first")
    written = []
    for family, members in _families(suites).items():
        family_tables = [load_table(store, suite, model, seed) for suite in members]
        for table in family_tables:
            if tables:
                print(to_markdown(table))
                written += write_reports(table, out / "reports")
            written.append(plot_per_task(table, out / "plots" / f"{table.suite}-{table.model}-per-task.png"))
        normalizable = [table.suite for table in family_tables if table.row(PRETRAINED).normalized_accuracy is not None]
        if len(normalizable) > 1:  # a suite whose expert scores 0 on its task has no normalized score to plot
            written.append(plot_task_count(store, normalizable, model, out / "plots" / f"{family}-task-count.png"))
    print("wrote " + ", ".join(str(path) for path in written))


def _families(suites: Sequence[str]) -> dict[str, list[str]]:
    """Group suites that differ only by their trailing task count (``mini-vision-4``, ``mini-vision-8``)."""
    families: dict[str, list[str]] = {}
    for suite in suites:
        stem, _, count = suite.rpartition("-")
        families.setdefault(stem if count.isdigit() else suite, []).append(suite)
    return families


def command_plot(args: argparse.Namespace) -> None:
    _report(args.out, _suite_names(args), args.model, args.seed, tables=False)


def command_methods(args: argparse.Namespace) -> None:
    from mergebench.core.data_access import DATA_ACCESS
    from mergebench.methods.registry import BUILTIN, all_methods

    methods = sorted(all_methods().values(), key=lambda method: (DATA_ACCESS.index(method.data), method.name))
    if args.json:
        print(json.dumps([_method_json(method) for method in methods], indent=2, default=str))
        return
    for access in DATA_ACCESS:
        group = [method for method in methods if method.data == access]
        if group:
            print(f"data: {access} ({len(group)} methods)")
        for method in group:
            plugin = "" if method.origin == BUILTIN else f"  (plugin: {method.origin})"
            print(f"  {method.name:<18} {method.summary}  [{method.citation}]{plugin}")
            for name, hparam in method.hparams.items():
                grid = ", ".join(map(str, hparam.sweep_values()))
                print(f"      {name:<14} default {hparam.default!s:<10} sweep {{{grid}}}  {hparam.doc}")


def _method_json(method) -> dict:
    """A method as ``mergebench methods --json`` prints it."""
    return {
        "name": method.name, "summary": method.summary, "citation": method.citation, "data": method.data,
        "randomized": method.randomized, "streamable": method.tensorwise, "origin": method.origin,
        "hparams": {
            name: {"default": h.default, "grid": list(h.sweep_values()), "doc": h.doc, "low": h.low, "high": h.high,
                   "high_inclusive": h.high_inclusive, "choices": None if h.choices is None else list(h.choices)}
            for name, h in method.hparams.items()
        },
    }


def command_suites(args: argparse.Namespace) -> None:
    from mergebench.runner.families import suite_status
    from mergebench.core.checkpoints import cache_directory
    from mergebench.suites.registry import all_suites

    suites = [suite for suite in all_suites().values() if args.model is None or args.model in suite.model_names]
    if not suites:
        raise MergebenchError(f"no suite offers model {args.model!r}")
    for suite in suites:  # with --model, only the suites that offer it
        default = suite.resolve_model(args.model)
        others = ", ".join(name for name in suite.model_names if name != default) or "-"
        print(f"{suite.name:<16} {len(suite.tasks)} tasks, model {default} (also {others}), {suite.source_file.name}")
        options = {"checkpoints": args.checkpoints, "allow_pickle": args.allow_pickle, "data": args.data}
        for task, source, status in suite_status(suite, args.model, cache_directory(args.cache), **options):
            print(f"    {task:<14} {source:<24} {status}")


def command_build(args: argparse.Namespace) -> None:
    from mergebench.runner.experts import build_missing_experts, expert_folder
    from mergebench.core.checkpoints import cache_directory
    from mergebench.runner.sweep import resolve_device
    from mergebench.suites.registry import get_suite

    for name in _suite_names(args):
        suite = get_suite(name)
        model = suite.resolve_model(args.model)
        if suite.kind == "llm":
            from mergebench.runner.llm_experts import expert_folders

            folders = expert_folders(suite, model, cache_directory(args.cache), resolve_device(args.device))
            print(f"{name}: experts in {', '.join(str(folder) for folder in folders.values())}")
            continue
        folder = expert_folder(suite, model, cache_directory(args.cache))
        build_missing_experts(suite, model, folder, resolve_device(args.device))
        print(f"{name}: experts in {folder}")


def _with_clip_options(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where the published experts and the datasets of ``kind: clip`` suites come from."""
    sub.add_argument("--checkpoints", default=None, metavar="PATH|hub",
                     help="kind: clip suites: 'hub' (default: Hugging Face ids of the suite file, via the HF cache) or a folder "
                          "with tall_masks open_clip files (PATH/ViT-B-32/<Task>Val/nonlinear_finetuned.pt) or "
                          "Hub-style folders named like the repositories (PATH/clip-vit-base-patch32_dtd)")
    sub.add_argument("--allow-pickle", action="store_true",
                     help="unpickle tall_masks .pt files (runs their code) once, converting each to .safetensors beside it")
    sub.add_argument("--data", type=Path, default=None,
                     help="kind: clip suites: folder of local datasets, <data>/<Task> saved by DatasetDict.save_to_disk "
                          "(default: $MERGEBENCH_DATA; tasks without one load the suite file's Hub dataset)")
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergebench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_common(sub: argparse.ArgumentParser, suite_required: bool) -> argparse.ArgumentParser:
        sub.add_argument("--suite", action="append", default=[], required=suite_required, help="suite name(s), comma-separated or repeated")
        sub.add_argument("--model", default=None, help="backbone (default: the suite's)")
        sub.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: results/)")
        sub.add_argument("--seed", type=int, default=0, help="seed of randomized methods")
        return sub

    def with_merging(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_common(sub, True)
        sub.add_argument("--methods", required=True, help="comma-separated method names (see `mergebench methods`)")
        sub.add_argument("--hparams", action="append", default=[], help="fix hyperparameters: ties.k=30,dare.p=0.3")
        sub.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
        sub.add_argument("--examples", type=_positive, default=None, help="examples per task for train-samples methods (default: each paper's)")
        sub.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: $MERGEBENCH_CACHE or ~/.cache/mergebench)")
        sub.add_argument("--limit", type=_positive, default=None,
                         help="kind: llm suites: documents per lm-eval task, for quick runs (stored apart from full runs)")
        sub.add_argument("--allow-code-execution", action="store_true",
                         help="kind: llm suites: run tasks that execute model-generated code (HumanEval, MBPP); needs HF_ALLOW_CODE_EVAL=1 too")
        return _with_clip_options(sub)

    with_merging(commands.add_parser("run", help="sweep methods on suites, store and report")).set_defaults(handler=command_run)
    continual = with_merging(commands.add_parser(
        "continual", help="merge models one arrival at a time (e.g. opcm); score after each arrival over several orders",
    ))
    continual.add_argument("--orders", type=_positive, default=3, help="orders of arrival: the suite's, then seeded permutations (default 3)")
    continual.set_defaults(handler=command_continual)

    with_common(commands.add_parser("report", help="print and write the results tables"), False).set_defaults(handler=command_report)
    with_common(commands.add_parser("plot", help="write PNG plots of the stored results"), False).set_defaults(handler=command_plot)
    methods = commands.add_parser("methods", help="list registered methods, grouped by the data they use")
    methods.add_argument("--json", action="store_true", help="print the methods as JSON")
    methods.set_defaults(handler=command_methods)
    suites = commands.add_parser("suites", help="list suites, their tasks, and whether data and checkpoints are here")
    suites.add_argument("--model", default=None, help="backbone whose checkpoints to look for (default: each suite's)")
    suites.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: $MERGEBENCH_CACHE or ~/.cache/mergebench)")
    _with_clip_options(suites).set_defaults(handler=command_suites)
    build = with_common(commands.add_parser("build", help="fine-tune and cache a suite's experts"), True)
    build.add_argument("--cache", type=Path, default=None)
    build.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    build.set_defaults(handler=command_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MergebenchError as error:
        print(f"mergebench: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mergebench: interrupted; finished cells are stored — run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
