"""``mergebench leaderboard build``: stores and bundles joined into one store, rendered as the static site of
:mod:`mergebench.reports.site` with the published numbers of the reference tables beside ours."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from mergebench.errors import MergebenchError
from mergebench.reports.site import PublishedNumber, build_site
from mergebench.runner.references import all_tables
from mergebench.store.bundle import read_bundle
from mergebench.store.database import DATABASE_NAME, ResultStore, export_rows, import_rows


def published_numbers() -> list[PublishedNumber]:
    """Every cell of every reference table (``tasks/references`` and the user's), as the site shows it."""
    return [
        PublishedNumber(table.id, table.source, table.checkpoint_family, cell.row, cell.method, cell.suite, cell.model, cell.task,
                        cell.metric, cell.absolute, cell.normalized)
        for table in all_tables().values() for cell in table.cells
    ]


def build_leaderboard(sources: Sequence[Path], out: Path) -> list[Path]:
    """The site of the results of ``sources`` (results folders or bundles), joined in one store (cells that two
    sources hold with other results are refused in one line) and written to ``out``; returns the pages."""
    rows = []
    for source in sources:  # every source read and checked before anything is joined
        if source.is_file():
            rows.append((read_bundle(source).rows, str(source)))
        elif (source / DATABASE_NAME).is_file():
            rows.append((export_rows(ResultStore(source)), str(source)))
        else:
            raise MergebenchError(f"{source} is neither a results bundle nor a results folder (no {DATABASE_NAME})")
    with tempfile.TemporaryDirectory(prefix="mergebench-leaderboard-") as folder:
        joined = ResultStore(folder)
        for source_rows, name in rows:
            try:
                import_rows(joined, source_rows, name)
            except MergebenchError as error:  # named after the sources, not the temporary store joining them
                raise MergebenchError(str(error).replace(str(joined.path), "the sources before it")) from None
        return build_site(joined, published_numbers(), out)
