"""The reference table agrees with /work/shared/reference-numbers.md and rejects malformed rows."""

import pytest

from mergebench.errors import MergebenchError
from mergebench.reports.leaderboard import COLUMNS, load_reference


def find(rows, **criteria):
    matches = [row for row in rows if all(row[key] == value for key, value in criteria.items())]
    assert len(matches) == 1, (criteria, matches)
    return matches[0]


def test_published_numbers():
    rows = load_reference()
    iso_cts = find(rows, suite="vit-20", model="ViT-L-14", method="iso_cts", checkpoint_family="tall_masks")
    assert (iso_cts["absolute_accuracy"], iso_cts["normalized_accuracy"]) == (90.1, 94.9)
    assert "buggy DTD" in iso_cts["note"]
    ta = find(rows, suite="vit-8", model="ViT-B-32", method="task_arithmetic", checkpoint_family="tall_masks")
    assert (ta["absolute_accuracy"], ta["normalized_accuracy"]) == (70.8, 76.5)
    emr = find(rows, model="ViT-B-16", method="emr", checkpoint_family="task_vectors")
    assert emr["absolute_accuracy"] == 91.3 and emr["normalized_accuracy"] is None
    dtd = find(rows, model="ViT-B-32", method="ties", task="DTD", checkpoint_family="task_vectors")
    assert dtd["absolute_accuracy"] == 56.2
    breadcrumbs = find(rows, method="breadcrumbs")
    assert breadcrumbs["absolute_accuracy"] is None and breadcrumbs["normalized_accuracy"] == 83.35
    wemoe = find(rows, model="ViT-L-14", method="wemoe", checkpoint_family="fusion_bench")
    assert wemoe["absolute_accuracy"] == 93.8


def test_every_tall_masks_cell_is_present():
    rows = load_reference()
    table = [row for row in rows if row["source"].endswith("Table 1")]
    assert len(table) == 9 * 9
    assert all(row["normalized_accuracy"] is not None for row in table if row["method"] not in ("zero-shot", "individual"))


def write(tmp_path, *lines):
    path = tmp_path / "reference.csv"
    path.write_text("\n".join([",".join(COLUMNS), *lines]) + "\n")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("vit-9,ViT-B-32,ties,,70,,tall_masks,paper,", "suite"),
        ("vit-8,ViT-B-32,ties,,seventy,,tall_masks,paper,", "not a number"),
        ("vit-8,ViT-B-32,ties,,170,,tall_masks,paper,", r"outside \[0, 100\]"),
        ("vit-8,ViT-B-32,ties,,,,tall_masks,paper,", "absolute or a normalized"),
        ("vit-8,ViT-B-32,ties,,70,,other,paper,", "checkpoint_family"),
        ("vit-8,ViT-B-32,ties,Imagenet,70,,tall_masks,paper,", "unknown task"),
        ("vit-8,ViT-B-32,ties,,70,,tall_masks", "expected 9 fields"),
    ],
)
def test_malformed_rows_are_named(tmp_path, line, message):
    with pytest.raises(MergebenchError, match=message) as error:
        load_reference(write(tmp_path, line))
    assert "reference.csv:2" in str(error.value)


def test_wrong_header(tmp_path):
    (tmp_path / "bad.csv").write_text("suite,model\nvit-8,ViT-B-32\n")
    with pytest.raises(MergebenchError, match="columns must be"):
        load_reference(tmp_path / "bad.csv")
