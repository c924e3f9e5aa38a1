"""The ``mergebench`` command line: run sweeps, print reports and plots, list methods and suites."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from mergebench.errors import MergebenchError
from mergebench.runner.kinds import positive_int

DEFAULT_OUT = Path("results")
DEFAULT_LEADERBOARD = Path("leaderboard")


def _names(text: str, what: str = "name") -> list[str]:
    """Comma-separated names, each given once; an empty name (``a,,b``, a trailing comma) is an error."""
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise MergebenchError(f"empty {what} in {text!r}: give comma-separated names without empty entries")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MergebenchError(f"{what} {repeated[0]!r} given twice in {text!r}")
    return names


def _suite_names(args: argparse.Namespace) -> list[str]:
    return _names(",".join(args.suite), "suite") if args.suite else []


def parse_hparams(entries: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``ties.k=30,dare.p=0.3`` (or ``k=30`` when one method is run) → ``{method: {name: value}}``."""
    overrides: dict[str, dict[str, str]] = {}
    for entry in (item for text in entries for item in text.split(",")):
        name, equals, value = entry.strip().partition("=")
        if not equals or not value.strip() or not name.strip():
            raise MergebenchError(f"--hparams entry {entry!r} is not of the form method.name=value")
        method, dot, hparam = name.strip().rpartition(".")
        if not dot:
            if len(methods) != 1:
                raise MergebenchError(f"--hparams entry {entry!r} must name its method (method.{name}=...) when several run")
            method = methods[0]
        if hparam in overrides.get(method, {}):
            raise MergebenchError(f"--hparams gives {method}.{hparam} twice ({overrides[method][hparam]!r} and {value.strip()!r})")
        overrides.setdefault(method, {})[hparam] = value.strip()
    return overrides


def _shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not slash or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= I < N")
    return shard


def command_merge_stores(args: argparse.Namespace) -> None:
    from mergebench.store.database import ResultStore, export_rows, import_rows

    sources = [ResultStore(folder) for folder in args.stores]  # every source opened (and checked) before writing
    into = ResultStore(args.into)
    for folder, store in zip(args.stores, sources):
        added = import_rows(into, export_rows(store), str(store.path))
        print(f"{folder}: {added} new results")


def command_export(args: argparse.Namespace) -> None:
    from mergebench.store.bundle import write_bundle
    from mergebench.store.database import ResultStore

    _existing_store(args.source)
    counts = write_bundle(ResultStore(args.source), args.out, _suite_names(args))
    print(f"wrote {args.out}: {counts['results']} results, {counts['selections']} selections, {counts['runs']} runs")


def _existing_store(folder: Path) -> None:
    """Reading commands refuse a folder without a store rather than create an empty one."""
    from mergebench.store.database import DATABASE_NAME

    if not (folder / DATABASE_NAME).is_file():
        raise MergebenchError(f"no results store in {folder} (no {DATABASE_NAME}): run `mergebench run --out {folder}` first")


def command_leaderboard_add(args: argparse.Namespace) -> None:
    from mergebench.store.bundle import admit, read_bundle, relabel
    from mergebench.store.database import ResultStore

    bundle = read_bundle(args.bundle)  # checked whole before the leaderboard's store is opened
    if args.family:
        bundle = relabel(bundle, _names(args.family, "family")[0])
    admitted = admit(ResultStore(args.into), bundle)
    print(f"{args.bundle}: {admitted.new_results} new results in {args.into}")
    for (suite, model, family), status in sorted(admitted.families.items()):
        print(f"  {suite} on {model}, checkpoints {family}: {status}")


def command_leaderboard_build(args: argparse.Namespace) -> None:
    from mergebench.runner.publish import build_leaderboard

    pages = build_leaderboard(args.sources, args.out)
    print(f"wrote {len(pages)} pages to {args.out}: open {pages[0]}")


def _models(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--model a,b`` (or ``all``) as a tuple; None for each suite's default."""
    return tuple(_names(args.model, "model")) if args.model is not None else None


def _kind_options(args: argparse.Namespace) -> dict:
    """The values of every kind option (``--checkpoints``, ``--limit``…) given on the command line."""
    from mergebench.runner.kinds import all_options

    return {name: getattr(args, name, None) for name in all_options()}


def _sweep_request(args: argparse.Namespace):
    from mergebench.runner.sweep import SweepRequest

    methods = _names(args.methods, "method")
    return SweepRequest(
        suites=_suite_names(args), methods=methods, overrides=parse_hparams(args.hparams, methods), device=args.device,
        out=args.out, cache=args.cache, models=_models(args), seed=args.seed, examples=args.examples,
        options=_kind_options(args), executor=args.executor, address=args.ray_address, shard=args.shard,
    )


def command_run(args: argparse.Namespace) -> None:
    from mergebench.runner.executors import run_sweep

    request = _sweep_request(args)
    run_sweep(request)
    print()
    _report(args.out, request.suites, _models(args), args.seed)


def command_continual(args: argparse.Namespace) -> None:
    from mergebench.reports.continual import load_arrivals, plot_arrivals, summarize, to_markdown
    from mergebench.runner.continual import ContinualRequest, run_continual
    from mergebench.store.database import ResultStore

    request = _sweep_request(args)
    run_continual(ContinualRequest(request, args.orders))
    store = ResultStore(args.out)
    for suite in request.suites:
        for model in _stored_models(store, suite, _models(args)):
            summary = summarize(load_arrivals(store, suite, model))
            print(to_markdown(suite, summary))
            print(f"wrote {plot_arrivals(suite, summary, args.out / 'plots' / f'{suite}-{model}-continual.png')}")


def command_report(args: argparse.Namespace) -> None:
    if args.format == "reference":
        from importlib.metadata import version

        from mergebench.reports.tables import to_reference
        from mergebench.store.database import ResultStore

        tables = list(_tables(ResultStore(args.out), _suite_names(args), _models(args), args.seed))
        print(to_reference(tables, args.source or f"mergebench {version('mergebench')}, store {args.out}", args.tolerance), end="")
    elif args.format:
        _print_tables(args.out, _suite_names(args), _models(args), args.seed, args.format, not args.no_costs)
    else:
        _report(args.out, _suite_names(args), _models(args), args.seed, costs=not args.no_costs)


def _tables(store, suites: Sequence[str], models: Sequence[str] | None, seed: int):
    """The stored tables of ``suites`` (every suite with results if none is named), on every stored model
    or the ``models`` named, suite by suite."""
    from mergebench.reports.tables import available, load_table

    suites = list(suites) or sorted({suite for suite, _ in available(store)})
    if not suites:
        raise MergebenchError(f"no results in {store.path}: run `mergebench run` first")
    return [load_table(store, suite, model, seed) for suite in suites for model in _stored_models(store, suite, models) or [None]]


def _print_tables(out: Path, suites: Sequence[str], models: Sequence[str] | None, seed: int, form: str, costs: bool) -> None:
    """``mergebench report --format md``: the tables alone, on standard output (nothing written)."""
    from mergebench.reports.tables import FORMATS
    from mergebench.store.database import ResultStore

    print("\n".join(FORMATS[form](table, costs) for table in _tables(ResultStore(out), suites, models, seed)), end="")


def _stored_models(store, suite: str, models: Sequence[str] | None) -> list[str]:
    """The models of ``suite`` with stored results: all of them, or those named (``all``: every one)."""
    from mergebench.reports.tables import available

    stored = [model for name, model in available(store) if name == suite]
    if not models or tuple(models) == ("all",):
        return stored
    return list(models)


def _report(out: Path, suites: Sequence[str], models: Sequence[str] | None, seed: int, *, tables: bool = True,
            costs: bool = True) -> None:
    """Print and write the tables (unless ``tables`` is False) and the plots of ``suites`` on every stored model
    (or the ``models`` named)."""
    from mergebench.reports.plots import plot_per_task, plot_scale, plot_task_count
    from mergebench.reports.tables import suite_family, to_markdown, to_scale_markdown, write_reports
    from mergebench.store.database import PRETRAINED, ResultStore

    store = ResultStore(out)
    written = []
    by_family: dict[str, dict[str, list]] = {}
    for table in _tables(store, suites, models, seed):
        by_family.setdefault(suite_family(table.suite), {}).setdefault(table.model, []).append(table)
    for family, by_model in by_family.items():
        for model, family_tables in by_model.items():
            for table in family_tables:
                if tables:
                    print(to_markdown(table, costs))
                    written += write_reports(table, out / "reports", costs)
                written.append(plot_per_task(table, out / "plots" / f"{table.suite}-{table.model}-per-task.png"))
            normalizable = [table.suite for table in family_tables if table.row(PRETRAINED).normalized_accuracy is not None]
            if len(normalizable) > 1:  # a suite whose expert scores 0 on its task has no normalized score to plot
                written.append(plot_task_count(store, normalizable, model, out / "plots" / f"{family}-{model}-task-count.png"))
        family_tables = [table for tables in by_model.values() for table in tables]
        if len({table.model for table in family_tables if table.base_parameters}) > 1:  # the scale axis
            scale = to_scale_markdown(family_tables)
            if tables:
                print(f"### {family}: models and task counts, test avg. (normalized), %\n\n{scale}")
                written.append(_write(out / "reports" / f"{family}-scale.md", scale))
            written.append(plot_scale(family_tables, out / "plots" / f"{family}-scale.png"))
    print("wrote " + ", ".join(str(path) for path in written))


def _write(path: Path, text: str) -> Path:
    from mergebench.core.atomic import write_text

    try:
        write_text(path, text)
    except OSError as error:
        raise MergebenchError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def command_plot(args: argparse.Namespace) -> None:
    _report(args.out, _suite_names(args), _models(args), args.seed, tables=False)


def command_reproduce(args: argparse.Namespace) -> int:
    from mergebench.runner.references import all_tables
    from mergebench.runner.reproduce import OUTSIDE, ReproduceRequest, reproduce, selected, to_markdown
    from mergebench.runner.sweep import SweepRequest

    if args.list or not args.table:
        for table_id, table in all_tables().items():
            print(f"{table_id:<42} {len(table.cells):>4} cells  {table.checkpoint_family:<18} {table.title}")
        return 0
    sweep = SweepRequest(suites=(), methods=(), overrides={}, device=args.device, out=args.out, cache=args.cache,
                         seed=args.seed, options=_kind_options(args))
    methods = tuple(_names(args.methods, "method")) if args.methods is not None else None
    for method in methods or ():
        from mergebench.methods.registry import get_method

        get_method(method)
    request = ReproduceRequest(args.table, sweep, run=not args.no_run, methods=methods, models=_models(args))
    found = reproduce(request)
    print(to_markdown(selected(request), found))
    return 1 if any(item.verdict == OUTSIDE for item in found) else 0


def command_methods(args: argparse.Namespace) -> None:
    from mergebench.core.data_access import DATA_ACCESS
    from mergebench.methods.registry import BUILTIN, all_methods

    methods = sorted(all_methods().values(), key=lambda method: (DATA_ACCESS.index(method.data), method.name))
    if args.json:
        print(json.dumps([_method_json(method) for method in methods], indent=2, default=str))
        return
    if args.markdown:
        print("| method | data | paper | hyperparameters: default (sweep) |")
        print("|---|---|---|---|")
        for method in methods:
            hparams = "; ".join(
                f"{name}={h.default}" + (f" ({', '.join(map(str, h.grid))})" if h.grid else "") for name, h in method.hparams.items()
            )
            print(f"| `{method.name}` | {method.data} | {method.citation} | {hparams or '—'} |")
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
    from mergebench.core.checkpoints import cache_directory
    from mergebench.runner.catalog import all_suites
    from mergebench.runner.kinds import kind_of

    requested = _models(args)
    suites = [suite for suite in all_suites().values() if not requested or set(requested) <= set(suite.model_names)]
    if not suites:
        raise MergebenchError(f"no suite offers model {args.model!r}")
    by_file: dict[Path, list] = {}
    for suite in suites:  # with --model, only the suites that offer it
        by_file.setdefault(suite.source_file, []).append(suite)
    hints: list[str] = []
    for path, members in by_file.items():
        first = members[0]
        kind = kind_of(first)
        for model in requested or (first.model_default,):
            others = ", ".join(name for name in first.model_names if name != model) or "-"
            print(f"{path.name} (kind {kind.name}, family {first.family}): model {model} (also {others})")
            for suite in members:
                print(f"  {suite.name:<16} {len(suite.tasks)} tasks: {', '.join(suite.task_names)}")
            widest = max(len(task.name) for task in first.tasks) if first.tasks else 8
            longest = max(members, key=lambda suite: len(suite.tasks))
            options = kind.accepted(_kind_options(args), longest, strict=False)
            for row in kind.status(longest, model, cache_directory(args.cache), **options):
                print(f"    {row.task:<{max(widest, 10)}} {row.source:<28} {row.status}")
                if row.hint and row.hint not in hints:
                    hints.append(row.hint)
    if hints:
        print("\nto get what is missing:")
        for hint in hints:
            print(f"  {hint}")


def command_build(args: argparse.Namespace) -> None:
    from mergebench.core.checkpoints import cache_directory
    from mergebench.runner.catalog import get_suite
    from mergebench.runner.kinds import kind_of
    from mergebench.runner.sweep import resolve_device

    device = resolve_device(args.device)
    suites = [get_suite(name) for name in _suite_names(args)]  # every name checked before anything is built
    plans = [(suite, kind_of(suite), suite.resolve_models(_models(args))) for suite in suites]
    for suite, kind, models in plans:
        for model in models:
            print(f"{suite.name} ({model}): experts in {kind.build(suite, model, cache_directory(args.cache), device)}")


def _add_kind_options(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every kind's options, one argument group per set of kinds that take them."""
    from mergebench.runner.kinds import all_options

    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for option, kinds in all_options().values():
        if kinds not in groups:
            groups[kinds] = sub.add_argument_group(f"options of {', '.join(kinds)} suites")
        groups[kinds].add_argument(option.flag, help=option.help, default=None, **option.argparse)
    return sub


class Parser(argparse.ArgumentParser):
    """argparse with its errors as the command line's one-line errors (not a usage block and exit 2 of its own)."""

    def error(self, message: str):
        raise MergebenchError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mergebench", description=__doc__,
                                     epilog=f"{DEBUG_FLAG} anywhere on the command line shows the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def with_common(sub: argparse.ArgumentParser, suite_required: bool) -> argparse.ArgumentParser:
        sub.add_argument("--suite", action="append", default=[], required=suite_required, help="suite name(s), comma-separated or repeated")
        sub.add_argument("--model", default=None, help="model(s): comma-separated, or 'all' (default: each suite's own)")
        sub.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: results/)")
        sub.add_argument("--seed", type=int, default=0, help="seed of randomized methods")
        return with_tasks(sub)

    def with_tasks(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--tasks", action="append", type=Path, default=[], metavar="DIR",
                         help="a folder of your own suite files, added to mergebench's (also $MERGEBENCH_TASKS)")
        return sub

    def with_merging(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_common(sub, True)
        sub.add_argument("--methods", required=True, help="comma-separated method names (see `mergebench methods`)")
        sub.add_argument("--hparams", action="append", default=[], help="fix hyperparameters: ties.k=30,dare.p=0.3")
        sub.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
        sub.add_argument("--examples", type=positive_int, default=None, help="examples per task for train-samples methods (default: each paper's)")
        sub.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: $MERGEBENCH_CACHE or ~/.cache/mergebench)")
        sub.add_argument("--executor", default="serial", help="where jobs run: serial (default, this process) or ray")
        sub.add_argument("--ray-address", default=None, help="--executor ray: the cluster to join (ray://head:10001, auto); "
                                                             "default: start a local one")
        sub.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                         help="run the I-th of N disjoint parts of the method jobs (0-based; for scheduler job arrays), "
                              "then join the stores with mergebench merge-stores")
        return _add_kind_options(sub)

    with_merging(commands.add_parser("run", help="sweep methods on suites, store and report")).set_defaults(handler=command_run)
    continual = with_merging(commands.add_parser(
        "continual", help="merge models one arrival at a time (e.g. opcm); score after each arrival over several orders",
    ))
    continual.add_argument("--orders", type=positive_int, default=3, help="orders of arrival: the suite's, then seeded permutations (default 3)")
    continual.set_defaults(handler=command_continual)

    report = with_common(commands.add_parser("report", help="print and write the results tables"), False)
    report.add_argument("--format", choices=("md", "csv", "tex", "reference"), default=None,
                        help="print only the tables in this format to standard output, writing nothing (for docs); "
                             "reference: as a reference table of tasks/references (the store's runs as the numbers to reproduce)")
    report.add_argument("--source", default=None, help="--format reference: the command that produced the store")
    report.add_argument("--tolerance", type=float, default=1.5, help="--format reference: percentage points (default 1.5)")
    report.add_argument("--no-costs", action="store_true",
                        help="leave out the cost columns (seconds, memory), which differ from run to run: the tables then "
                             "repeat byte for byte")
    report.set_defaults(handler=command_report)
    with_common(commands.add_parser("plot", help="write PNG plots of the stored results"), False).set_defaults(handler=command_plot)
    reproduce = with_tasks(commands.add_parser(
        "reproduce", help="run what a published table needs and compare it cell by cell (exit 1 if a cell is outside its tolerance)",
    ))
    reproduce.add_argument("table", nargs="?", help="a reference table id, e.g. iso/table1 (none: list them)")
    reproduce.add_argument("--list", action="store_true", help="list the reference tables")
    reproduce.add_argument("--methods", default=None, help="only these of the table's methods (comma-separated)")
    reproduce.add_argument("--model", default=None, help="only the table's cells of these models (comma-separated)")
    reproduce.add_argument("--no-run", action="store_true", help="compare what the store holds, run nothing")
    reproduce.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: results/)")
    reproduce.add_argument("--seed", type=int, default=0, help="seed of randomized methods")
    reproduce.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    reproduce.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: $MERGEBENCH_CACHE or ~/.cache/mergebench)")
    _add_kind_options(reproduce).set_defaults(handler=command_reproduce)
    merge = commands.add_parser("merge-stores", help="join results stores (shards of a sweep) into one, refusing conflicting cells")
    merge.add_argument("stores", nargs="+", type=Path, help="results folders to read")
    merge.add_argument("--into", type=Path, required=True, help="results folder to add them to")
    merge.set_defaults(handler=command_merge_stores)
    export = commands.add_parser("export", help="write a results store as a bundle (JSON Lines) to publish or submit")
    export.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="the bundle file to write (.jsonl)")
    export.add_argument("--from", dest="source", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="results folder to export (default: results/)")
    export.add_argument("--suite", action="append", default=[], help="only these suite(s), comma-separated or repeated")
    export.set_defaults(handler=command_export)
    leaderboard = commands.add_parser("leaderboard", help="submit bundles to a leaderboard and build its static site")
    actions = leaderboard.add_subparsers(dest="action", required=True, parser_class=Parser)
    add = actions.add_parser("add", help="check a bundle (schema, checkpoints, duplicate and conflicting cells) and add it")
    add.add_argument("bundle", type=Path, help="a bundle written by mergebench export")
    add.add_argument("--into", type=Path, default=DEFAULT_LEADERBOARD, metavar="DIR",
                     help=f"the leaderboard's results folder (default: {DEFAULT_LEADERBOARD}/)")
    add.add_argument("--family", default=None, metavar="NAME",
                     help="record the bundle's experts as checkpoint family NAME (experts other than the family its runs named)")
    add.set_defaults(handler=command_leaderboard_add)
    site = actions.add_parser("build", help="render results folders and bundles as a static site (HTML, opens from the file system)")
    site.add_argument("--from", dest="sources", type=Path, nargs="+", required=True, metavar="STORE_OR_BUNDLE",
                       help="results folders (a leaderboard's) and bundles to publish")
    site.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write the site to")
    site.set_defaults(handler=command_leaderboard_build)
    methods = commands.add_parser("methods", help="list registered methods, grouped by the data they use")
    methods.add_argument("--json", action="store_true", help="print the methods as JSON")
    methods.add_argument("--markdown", action="store_true", help="print the methods as a Markdown table (for docs)")
    methods.set_defaults(handler=command_methods)
    suites = with_tasks(commands.add_parser("suites", help="list suites, their tasks, and whether data and checkpoints are here"))
    suites.add_argument("--model", default=None, help="model(s) whose checkpoints to look for (default: each suite's)")
    suites.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: $MERGEBENCH_CACHE or ~/.cache/mergebench)")
    _add_kind_options(suites).set_defaults(handler=command_suites)
    build = with_common(commands.add_parser("build", help="fine-tune (or fetch) and cache a suite's experts"), True)
    build.add_argument("--cache", type=Path, default=None)
    build.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    build.set_defaults(handler=command_build)
    return parser


@contextmanager
def _task_folders(folders: Sequence[Path]):
    """``--tasks DIR``: the folders join ``$MERGEBENCH_TASKS`` while the command runs."""
    from mergebench.runner.catalog import TASKS_VARIABLE

    before = os.environ.get(TASKS_VARIABLE)
    if folders:
        existing = [part for part in (before or "").split(os.pathsep) if part]
        os.environ[TASKS_VARIABLE] = os.pathsep.join([*existing, *map(str, folders)])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TASKS_VARIABLE, None)
        else:
            os.environ[TASKS_VARIABLE] = before


DEBUG_FLAG = "--debug"
BUG = 70  # sysexits' EX_SOFTWARE: an error inside mergebench, not in what it was asked


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. What the user can cause or fix (input, files, disk, a damaged store) ends in one line
    ``mergebench: error: …`` and exit status 2; ``--debug`` (anywhere on the line) shows its traceback. A
    traceback without ``--debug`` means a bug in mergebench, and says so."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [argument for argument in argv if argument != DEBUG_FLAG]
    try:
        args = build_parser().parse_args(argv)
        with _task_folders(getattr(args, "tasks", [])):
            status = args.handler(args)
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 0
    except (MergebenchError, OSError, sqlite3.Error) as error:
        if debug:
            traceback.print_exc()
        print(f"mergebench: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergebench: interrupted; finished cells are stored — run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (a bug: shown in full, with where to report it)
        traceback.print_exc()
        print(f"mergebench: internal error: {type(error).__name__}: {_one_line(error)} — a bug in mergebench; please report it "
              "with the command line and the traceback above", file=sys.stderr)
        return BUG
    return status or 0


def _one_line(error: BaseException) -> str:
    """An error as one line: an operating-system error with its file, anything else by its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
