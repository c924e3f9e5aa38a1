"""The suites this installation knows: the suite files shipped with mergebench, plus the user's folders.

Shipped suite files are package data (``mergebench.tasks``, the repository's ``tasks/``), so an
installed wheel finds them as a source checkout does. ``MERGEBENCH_TASKS`` (folders separated by
``os.pathsep``) or ``--tasks DIR`` adds a user's own folders; a suite defined twice is an error naming
both files. Each file's kind (:mod:`mergebench.runner.kinds`) turns it into suites.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import util
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.runner.kinds import all_kinds
from mergebench.suites.schema import SuiteBase, read_document, suite_files

TASKS_VARIABLE = "MERGEBENCH_TASKS"


def packaged_tasks() -> Path:
    """The suite files shipped with mergebench: package data when installed, ``tasks/`` in a source checkout."""
    try:
        spec = util.find_spec("mergebench.tasks")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:  # an editable install or a plain checkout
        return Path(__file__).resolve().parents[2] / "tasks"
    return Path(list(spec.submodule_search_locations)[0])


def user_folders() -> tuple[Path, ...]:
    return tuple(Path(part) for part in os.environ.get(TASKS_VARIABLE, "").split(os.pathsep) if part)


def folders() -> tuple[Path, ...]:
    return (packaged_tasks(), *user_folders())


def suites_in(path: Path) -> dict[str, SuiteBase]:
    """The suites of one suite file, read by its kind."""
    kinds = all_kinds()
    document = read_document(Path(path), {name: kind.settings for name, kind in kinds.items()})
    return {suite.name: suite for suite in kinds[document.kind].suites(document)}


@lru_cache(maxsize=None)
def _load(folders: tuple[Path, ...]) -> dict[str, SuiteBase]:
    suites: dict[str, SuiteBase] = {}
    for folder in folders:
        if not folder.is_dir():
            raise MergebenchError(f"suite folder not found: {folder} (check {TASKS_VARIABLE} or --tasks)")
        for path in suite_files(folder):
            for name, suite in suites_in(path).items():
                if name in suites:
                    raise MergebenchError(f"suite {name!r} defined twice ({suites[name].source_file}, {path})")
                suites[name] = suite
    return suites


def all_suites() -> dict[str, SuiteBase]:
    return dict(_load(folders()))


def get_suite(name: str) -> SuiteBase:
    suites = all_suites()
    if name not in suites:
        raise MergebenchError(f"unknown suite {name!r}; known suites: {', '.join(sorted(suites)) or 'none'}")
    return suites[name]
