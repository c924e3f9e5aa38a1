"""Results bundles (mergebench export) and leaderboard submissions (mergebench leaderboard add): a lossless round
trip, and each refusal in one line with nothing written."""

from __future__ import annotations

import base64
import json

import pytest

from leaderboard_helpers import fill
from mergebench.cli import main
from mergebench.store.bundle import SCHEMA, VERSION, read_bundle
from mergebench.store.database import ResultStore, decode_examples, export_rows

TASKS = ["mnist", "fashion", "letters", "shapes"]


def sorted_rows(store: ResultStore):
    rows = export_rows(store)
    return sorted(rows.runs), sorted(rows.results), sorted(rows.selections)


@pytest.fixture
def results(tmp_path):
    store = ResultStore(tmp_path / "results")
    fill(store, "mini-vision-4", TASKS, "efficientnet-lite0")
    fill(store, "mini-vision-4", TASKS, "efficientnet-lite1", run_id="run-2", parameters=5_400_000)
    return store


def export(store: ResultStore, path, *extra: str) -> int:
    return main(["export", "--from", str(store.path.parent), "--out", str(path), *extra])


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_export_then_add_into_a_fresh_store_gives_identical_rows(results, tmp_path, capsys):
    bundle = tmp_path / "bundle.jsonl"
    assert export(results, bundle) == 0
    assert main(["leaderboard", "add", str(bundle), "--into", str(tmp_path / "board")]) == 0
    assert sorted_rows(ResultStore(tmp_path / "board")) == sorted_rows(results)
    runs, cells, selections = sorted_rows(results)
    out = capsys.readouterr().out
    assert f"{len(cells)} new results" in out and "mini-vision-4 on efficientnet-lite1, checkpoints mergebench: new" in out
    # the same bundle again adds nothing and refuses nothing: every cell is already there, identical
    assert main(["leaderboard", "add", str(bundle), "--into", str(tmp_path / "board")]) == 0
    out = capsys.readouterr().out
    assert "0 new results" in out and "checkpoints mergebench: matches" in out


def test_a_gzip_bundle_round_trips_too(results, tmp_path):
    bundle = tmp_path / "bundle.jsonl.gz"
    assert export(results, bundle) == 0
    assert bundle.read_bytes()[:2] == b"\x1f\x8b"
    assert main(["leaderboard", "add", str(bundle), "--into", str(tmp_path / "board")]) == 0
    assert sorted_rows(ResultStore(tmp_path / "board")) == sorted_rows(results)


def test_a_bundle_is_readable_json_lines_with_everything_of_a_cell(results, tmp_path):
    bundle = tmp_path / "bundle.jsonl"
    export(results, bundle)
    header, *records = lines_of(bundle)
    assert header["schema"] == SCHEMA and header["version"] == VERSION
    runs, cells, selections = sorted_rows(results)
    assert header["counts"] == {"runs": len(runs), "results": len(cells), "selections": len(selections)}
    result = next(r for r in records if r["record"] == "result" and r["method"] == "ties" and r["split"] == "test")
    assert result["config"]["checkpoint_family"] == "mergebench" and result["hparams"] == {"k": 20, "lam": 1.0}
    assert set(result["checkpoints"]) == {"pretrained", *TASKS}
    assert result["merge_seconds"] == 2.0 and result["merge_peak_mb"] == 310.5 and result["parameters"] in (4_700_000, 5_400_000)
    outcomes = decode_examples(base64.b64decode(result["examples"])).values  # the stored bits, as base64
    assert len(outcomes) == result["total"] and outcomes.sum() == result["correct"]
    run = next(r for r in records if r["record"] == "run")
    assert run["versions"] == {"mergebench": "0.1.0", "torch": "2.13.0"} and run["git_commit"] == "0123abcd"


def test_export_of_one_suite_and_from_a_missing_store(results, tmp_path, capsys):
    fill(results, "mini-vision-8", TASKS + ["digits", "textures", "counting", "arrows"], "efficientnet-lite0")
    bundle = tmp_path / "four.jsonl"
    assert export(results, bundle, "--suite", "mini-vision-4") == 0
    assert {r["suite"] for r in lines_of(bundle)[1:] if "suite" in r} == {"mini-vision-4"}
    assert main(["export", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "no results store in" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def refused(bundle, board, capsys, *extra: str) -> str:
    """The one-line error of adding ``bundle``, checking that the leaderboard did not change."""
    before = sorted_rows(ResultStore(board)) if board.exists() else None
    assert main(["leaderboard", "add", str(bundle), "--into", str(board), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergebench: error: ") and err.count("\n") == 1
    if before is not None:
        assert sorted_rows(ResultStore(board)) == before
    return err


@pytest.fixture
def bundle(results, tmp_path):
    path = tmp_path / "bundle.jsonl"
    export(results, path)
    return path


def test_refuses_another_schema_version(bundle, tmp_path, capsys):
    header, *records = lines_of(bundle)
    write_lines(bundle, [header | {"version": VERSION + 1}, *records])
    assert "schema version 2; this mergebench reads version 1" in refused(bundle, tmp_path / "board", capsys)
    assert not (tmp_path / "board").exists()
    write_lines(bundle, [{"hello": 1}, *records])
    assert "is not a mergebench results bundle" in refused(bundle, tmp_path / "board", capsys)


def test_refuses_a_cell_given_twice(bundle, tmp_path, capsys):
    header, *records = lines_of(bundle)
    cell = next(r for r in records if r["record"] == "result")
    header["counts"]["results"] += 1
    write_lines(bundle, [header, *records, cell])
    err = refused(bundle, tmp_path / "board", capsys)
    assert "gives cell" in err and err.rstrip().endswith("twice")


def test_refuses_an_edited_cell_and_a_truncated_bundle(bundle, tmp_path, capsys):
    header, *records = lines_of(bundle)
    edited = [dict(r, task="svhn") if r is next(x for x in records if x["record"] == "result") else r for r in records]
    write_lines(bundle, [header, *edited])
    assert "does not match the cell" in refused(bundle, tmp_path / "board", capsys)
    write_lines(bundle, [header, *records[:-3]])
    assert "the bundle is incomplete" in refused(bundle, tmp_path / "board", capsys)


def test_refuses_other_checkpoints_under_a_held_family_unless_flagged(results, tmp_path, capsys):
    board = tmp_path / "board"
    first = tmp_path / "first.jsonl"
    export(results, first)
    assert main(["leaderboard", "add", str(first), "--into", str(board)]) == 0
    other = ResultStore(tmp_path / "other")
    fill(other, "mini-vision-4", TASKS, "efficientnet-lite0", salt="retrained", run_id="run-3")
    second = tmp_path / "second.jsonl"
    export(other, second)
    capsys.readouterr()
    err = refused(second, board, capsys)
    assert "'mergebench' checkpoints of suite mini-vision-4 on efficientnet-lite0 are not the leaderboard's" in err
    assert "--family NAME" in err
    assert main(["leaderboard", "add", str(second), "--into", str(board), "--family", "retrained"]) == 0
    assert "checkpoints retrained: another checkpoint family than the leaderboard's mergebench" in capsys.readouterr().out
    families = {json.loads(row["config"])["checkpoint_family"] for row in ResultStore(board).query("SELECT config FROM results")}
    assert families == {"mergebench", "retrained"}


def test_refuses_a_bundle_holding_two_sets_of_experts_of_one_family(results, tmp_path, capsys):
    fill(results, "mini-vision-4", TASKS, "efficientnet-lite0", salt="rebuilt", run_id="run-3")
    bundle = tmp_path / "bundle.jsonl"
    export(results, bundle)
    assert "with two sets of 'mergebench' checkpoints" in refused(bundle, tmp_path / "board", capsys)


def test_refuses_a_cell_the_leaderboard_holds_with_other_results(results, bundle, tmp_path, capsys):
    board = tmp_path / "board"
    assert main(["leaderboard", "add", str(bundle), "--into", str(board)]) == 0
    header, *records = lines_of(bundle)
    cell = next(r for r in records if r["record"] == "result" and r["method"] == "ties" and r["split"] == "test")
    cell["correct"] -= 1
    write_lines(bundle, [header, *records])
    capsys.readouterr()
    assert "with other results than" in refused(bundle, board, capsys)
    assert read_bundle(bundle).rows.results  # the bundle itself is well formed: only the leaderboard refuses it


def test_refuses_malformed_columns_and_a_run_it_does_not_describe(bundle, tmp_path, capsys):
    header, *records = lines_of(bundle)
    first = next(index for index, record in enumerate(records) if record["record"] == "result")
    broken = [dict(record, correct="many") if index == first else record for index, record in enumerate(records)]
    write_lines(bundle, [header, *broken])
    assert f"{bundle}:{first + 2}: correct of a result record must be a number, not 'many'" in refused(bundle, tmp_path / "board", capsys)
    broken = [dict(record, config="mergebench") if index == first else record for index, record in enumerate(records)]
    write_lines(bundle, [header, *broken])
    assert "config of a result record must be a JSON object, not 'mergebench'" in refused(bundle, tmp_path / "board", capsys)
    runs = [record for record in records if record["record"] == "run"]
    header["counts"]["runs"] -= 1
    write_lines(bundle, [header, *(record for record in records if record is not runs[0])])
    assert f"names run {runs[0]['run_id']} without describing it" in refused(bundle, tmp_path / "board", capsys)


def test_build_refuses_sources_that_disagree_on_a_cell(results, bundle, tmp_path, capsys):
    header, *records = lines_of(bundle)
    cell = next(r for r in records if r["record"] == "result" and r["method"] == "ties")
    cell["score"] = 0.01
    changed = tmp_path / "changed.jsonl"
    write_lines(changed, [header, *records])
    assert main(["leaderboard", "build", "--from", str(bundle), str(changed), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert "changed.jsonl holds cell" in err and "other results than the sources before it: refusing to merge" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "site").exists()
