"""A slice of the embedded suites' own reference table, reproduced here within its tolerance.

``tasks/references/mergebench/mini-vision-4.yaml`` holds the numbers that
``mergebench run --suite mini-vision-4 ...`` measured (its ``source`` says the command). This builds the
four EfficientNet-Lite0 experts from their seeded recipe (or reuses them from the checkpoint cache),
sweeps Task Arithmetic on validation as the table did, and checks every cell of that model and method,
and the two reference rows, against the paper-style tolerance: experts built on another processor or
torch build differ slightly, which the tolerance is for.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_mini_vision_4_task_arithmetic_reproduces_within_tolerance(tmp_path):
    command = [sys.executable, "-m", "mergebench.cli", "reproduce", "mergebench/mini-vision-4",
               "--methods", "task_arithmetic", "--model", "efficientnet-lite0", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("| ") and "efficientnet-lite0" in line]
    rows = {line.split(" | ")[0].lstrip("| ") for line in verdicts if "| within |" in line}
    assert {"pretrained", "individual", "task_arithmetic"} <= rows
    assert not any("| outside" in line for line in verdicts)
