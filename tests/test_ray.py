"""Sweeps on Ray: a local cluster on the CI's two CPUs gives the same store as a serial run, also when a
worker dies half-way (its job runs again on the restarted worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_crash_safety import RUN, SUITE, cells, environment, mergebench, report

ray = pytest.importorskip("ray", reason='pip install "mergebench[ray]"')
pytestmark = pytest.mark.slow

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-tasks")
    (folder / "crash.yaml").write_text(SUITE)
    return folder


@pytest.fixture(scope="module")
def serial(tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    done = mergebench(tasks, root / "cache", *RUN, "--out", str(root / "out"))
    assert done.returncode == 0, done.stderr
    return root, cells(root / "out"), report(tasks, root / "cache", root / "out")


@pytest.fixture
def local_cluster(tasks, serial, tmp_path, monkeypatch):
    """A local Ray cluster on two CPUs whose workers see the test's suites and cache."""
    root, *_ = serial
    marker = tmp_path / "worker-died"
    variables = environment(tasks, root / "cache") | {"MERGEBENCH_TEST_MARKER": str(marker),
                                                     "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    for name in ("MERGEBENCH_TASKS", "MERGEBENCH_CACHE"):
        monkeypatch.setenv(name, variables[name])
    yield variables, marker
    ray.shutdown()


def run_on_ray(variables, out, hook=None):
    from mergebench import cli

    runtime = {"env_vars": {key: variables[key] for key in ("MERGEBENCH_TASKS", "MERGEBENCH_CACHE", "MERGEBENCH_TEST_MARKER", "PYTHONPATH",
                                                            "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    if hook:
        runtime["worker_process_setup_hook"] = hook
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime, log_to_driver=False)
    return cli.main([*RUN, "--out", str(out), "--executor", "ray"])


def test_a_ray_sweep_stores_what_a_serial_one_does(local_cluster, serial, tmp_path):
    variables, _ = local_cluster
    root, expected_cells, expected_report = serial
    assert run_on_ray(variables, tmp_path / "out") == 0
    assert cells(tmp_path / "out") == expected_cells
    assert report(Path(variables["MERGEBENCH_TASKS"]), root / "cache", tmp_path / "out") == expected_report


def test_a_dead_worker_job_runs_again(local_cluster, serial, tmp_path):
    variables, marker = local_cluster
    root, expected_cells, _ = serial
    assert run_on_ray(variables, tmp_path / "out", hook="ray_worker_dies_once.install") == 0
    assert marker.exists()  # a worker did die
    assert cells(tmp_path / "out") == expected_cells


def test_shards_merged_equal_the_whole_sweep(tasks, serial, tmp_path):
    root, expected_cells, expected_report = serial
    for index in range(2):
        done = mergebench(tasks, root / "cache", *RUN, "--out", str(tmp_path / f"shard{index}"), "--shard", f"{index}/2")
        assert done.returncode == 0, done.stderr
    merged = mergebench(tasks, root / "cache", "merge-stores", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--into", str(tmp_path / "all"))
    assert merged.returncode == 0, merged.stderr
    assert cells(tmp_path / "all") == expected_cells
    assert report(tasks, root / "cache", tmp_path / "all") == expected_report
