"""benchmarks/gpu_check.py: its device-dependent checks run on the CPU, and without CUDA it exits 0."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the script runs its checks")
def test_without_cuda_it_says_so_and_exits_0(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_checks_pass_on_the_cpu(gpu_check, capsys):
    device = torch.device("cpu")
    assert gpu_check.check_placement(device)
    assert gpu_check.check_autocast(device, images=64)
    assert gpu_check.check_memory(device)
    out = capsys.readouterr().out
    assert "head output torch.float32" in out and "FAILED" not in out


def test_a_wrong_result_is_reported_as_failed(gpu_check, capsys):
    assert not gpu_check.report("x", False, "measured")
    assert capsys.readouterr().out.startswith("FAILED")
