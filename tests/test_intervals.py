"""Intervals and paired comparisons from per-example outcomes, checked against closed forms and peers."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, spearmanr

from mergebench.core.scores import PerExample, TaskScore
from mergebench.reports.intervals import Comparison, Interval, Resampler, clopper_pearson, compare, ranks, suite_interval
from mergebench.reports.tables import load_table, to_csv, to_markdown
from mergebench.store.database import Cell, ResultStore, decode_examples, encode_examples


def right(count, total):
    return PerExample(np.arange(total) < count)


def test_clopper_pearson_matches_scipy():
    for correct, total in [(5, 10), (0, 20), (20, 20), (731, 1000)]:
        expected = binomtest(correct, total).proportion_ci(0.95, method="exact")
        interval = clopper_pearson(correct, total)
        assert interval.low == pytest.approx(expected.low, abs=1e-12) and interval.high == pytest.approx(expected.high, abs=1e-12)


def test_bootstrap_of_one_accuracy_has_the_binomial_width():
    resampler = Resampler({"a": 1000}, {})
    interval = suite_interval(resampler, {"a": right(500, 1000)})
    half_width = 1.96 * (0.25 / 1000) ** 0.5  # normal approximation of the binomial: ±3.1 points
    assert interval.low == pytest.approx(0.5 - half_width, abs=0.006) and interval.high == pytest.approx(0.5 + half_width, abs=0.006)
    assert suite_interval(resampler, {"a": right(1000, 1000)}) == Interval(1.0, 1.0)


def test_normalized_interval_resamples_merged_and_expert_together():
    # the merged model is right exactly where the expert is: normalized accuracy is 1 on every resample
    expert = PerExample(np.random.default_rng(1).random(400) < 0.8)
    resampler = Resampler({"a": 400}, {})
    assert suite_interval(resampler, {"a": expert}, {"a": expert}) == Interval(1.0, 1.0)


def test_paired_comparison_separates_a_real_gap_from_noise():
    resampler = Resampler({"a": 500, "b": 500}, {})
    strong = {"a": right(450, 500), "b": right(450, 500)}
    weak = {"a": right(350, 500), "b": right(350, 500)}
    gap = compare(resampler, strong, weak)
    assert gap.difference == pytest.approx(0.2, abs=0.005) and gap.beyond_noise
    same = compare(resampler, strong, {"a": right(450, 500), "b": right(450, 500)})
    assert same.difference == 0 and not same.beyond_noise
    # one example apart on 1000: within noise
    close = compare(resampler, strong, {"a": right(449, 500), "b": right(450, 500)})
    assert not close.beyond_noise


def test_correlation_metrics_are_recomputed_on_each_resample():
    generator = np.random.default_rng(0)
    labels = generator.normal(size=300)
    predictions = labels + generator.normal(size=300)
    examples = {"stsb": PerExample(predictions.astype(np.float32), labels.astype(np.float32))}
    resampler = Resampler({"stsb": 300}, {"stsb": "spearman"})
    interval = suite_interval(resampler, examples)
    rho = spearmanr(predictions, labels).statistic
    assert interval.low < rho < interval.high and interval.high - interval.low < 0.2


def test_ranks_tie_within_noise():
    within = Comparison(0.01, Interval(-0.01, 0.03))
    beyond = Comparison(0.10, Interval(0.05, 0.15))
    table = {(0, 1): within, (0, 2): beyond, (1, 2): beyond}
    assert ranks(3, lambda a, b: table[(a, b)]) == [1, 1, 3]


def test_examples_round_trip_through_the_store(tmp_path):
    bits = PerExample(np.random.default_rng(0).random(1001) < 0.3)
    assert np.array_equal(decode_examples(encode_examples(bits)).values, bits.values)
    pairs = PerExample(np.array([0, 2, 1]), np.array([0, 1, 1]))
    decoded = decode_examples(encode_examples(pairs))
    assert np.array_equal(decoded.values, pairs.values) and np.array_equal(decoded.labels, pairs.labels)
    assert len(encode_examples(bits)) == 1 + 8 + 126  # a tag, the count, 1001 bits packed


def store_with(tmp_path, outcomes):
    """A store holding reference rows and merged methods given as ``{method: {task: (right, total)}}``."""
    store = ResultStore(tmp_path)
    store.start_run("r", "test", None, {}, "cpu")
    for method, tasks in outcomes.items():
        cell = Cell("ctx", "s-2", "m", method, {}, 0, "test")
        scores = {task: TaskScore.of_correct(np.arange(total) < count) for task, (count, total) in tasks.items()}
        store.record(cell, "r", scores, config={"tasks": ["a", "b"]}, checkpoints={})
        if method not in ("pretrained", "individual"):
            store.select(cell, 0.5, "criterion", "r")
    return store


def test_tables_show_intervals_and_paired_comparisons(tmp_path):
    store = store_with(tmp_path, {
        "pretrained": {"a": (200, 400), "b": (100, 400)},
        "individual": {"a": (380, 400), "b": (360, 400)},
        "ties": {"a": (370, 400), "b": (340, 400)},
        "task_arithmetic": {"a": (369, 400), "b": (341, 400)},
        "average": {"a": (300, 400), "b": (250, 400)},
    })
    table = load_table(store, "s-2")
    ties = table.row("ties")
    assert ties.interval.low < ties.normalized_accuracy < ties.interval.high
    markdown = to_markdown(table)
    assert "95% CI" in markdown and "Paired comparisons with task_arithmetic" in markdown  # 95.91 vs TIES 95.91
    assert "- ties: -0.0 points" in markdown and "within noise" in markdown
    assert "- average:" in markdown and "worse beyond noise" in markdown
    assert to_csv(table) == to_csv(load_table(store, "s-2"))  # the same report every time (seeded resamples)
