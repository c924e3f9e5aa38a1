"""The published reference tables in tasks/references/ (one YAML file per table): every one reads, and a
malformed one is a one-line error naming the file and the entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mergebench.errors import MergebenchError
from mergebench.runner.references import all_tables, get_table, read_table

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "tasks" / "references"


def test_every_table_reads_and_is_listed_in_the_readme():
    tables = all_tables()
    assert {"iso/table1", "tsv/table3", "emr/table5", "fusion-bench/clip-vit-b32-ta8", "fusion-bench/gpt2-glue"} <= set(tables)
    readme = (REFERENCES / "README.md").read_text()
    assert [table for table in tables if f"`{table}`" not in readme] == []


def test_published_numbers_and_traps():
    iso = get_table("iso/table1")
    assert iso.checkpoint_family == "tall_masks" and iso.hyperparameters == "validation" and iso.tolerance == 1.0
    cell = next(c for c in iso.cells if (c.method, c.suite, c.model) == ("iso_cts", "vit-20", "ViT-L-14"))
    assert (cell.absolute, cell.normalized, cell.task) == (90.1, 94.9, None)
    assert any("DTD" in note for note in iso.traps_of(cell))
    ta = next(c for c in iso.cells if (c.method, c.suite, c.model) == ("task_arithmetic", "vit-8", "ViT-B-32"))
    assert (ta.absolute, ta.normalized) == (70.8, 76.5)
    emr = get_table("emr/table5")
    assert emr.checkpoint_family == "dare_roberta" and {c.suite for c in emr.cells} == {"glue-8"}


def broken(tmp_path, edit):
    path = tmp_path / "table.yaml"
    raw = yaml.safe_load((REFERENCES / "iso" / "table1.yaml").read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.pop("tolerance"), "missing key 'tolerance'"),
        (lambda raw: raw.update(colour="red"), "colour: unknown key"),
        (lambda raw: raw["methods"].update({"TIES": "ties_plus"}), "methods.TIES: unknown method 'ties_plus'"),
        (lambda raw: raw["cells"][0].update(suite="vit-9"), r"cells\[0\].suite: unknown suite 'vit-9'"),
        (lambda raw: raw["cells"][0].update(model="ViT-H-14"), r"cells\[0\].model: suite vit-8 has no model 'ViT-H-14'"),
        (lambda raw: raw["cells"][0].update(task="ImageNet"), r"cells\[0\].task: suite vit-8 has no task 'ImageNet'"),
        (lambda raw: raw["cells"][0].update(row="Nope"), r"cells\[0\].row: 'Nope' is not a row of methods"),
        (lambda raw: raw["cells"][0].update(absolute=170), r"cells\[0\].absolute: a percentage in \[-100, 100\]"),
        (lambda raw: raw["cells"][0].update(metric="f1"), r"cells\[0\].metric must be one of"),
        (lambda raw: raw["cells"].append(dict(raw["cells"][0])), "a second cell for"),
        (lambda raw: raw.update(hyperparameters={"ties": {"k": 300}}), r"hyperparameters.ties: hyperparameter k=300"),
        (lambda raw: raw["traps"].append({"note": "n", "where": {"task": "KMNIST", "suite": "vit-8"}}), r"traps\[3\]: touches no cell"),
        (lambda raw: raw["cells"][0].update(hparams={"lam": 0.3}), r"cells\[0\].hparams: hyperparameters given for a row without a merging method"),
    ],
)
def test_malformed_tables_are_one_line(tmp_path, edit, message):
    with pytest.raises(MergebenchError, match=message) as error:
        read_table(broken(tmp_path, edit), "iso/table1")
    assert str(tmp_path / "table.yaml") in str(error.value) and "\n" not in str(error.value)


def test_a_users_own_tables_join_through_its_suite_folder(tmp_path, monkeypatch):
    (tmp_path / "references" / "mine").mkdir(parents=True)
    shutil.copy(REFERENCES / "tsv" / "table3.yaml", tmp_path / "references" / "mine" / "t3.yaml")
    monkeypatch.setenv("MERGEBENCH_TASKS", str(tmp_path))
    assert get_table("mine/t3").cells == get_table("tsv/table3").cells
