"""The suite files ship inside the package: a built wheel, installed into a fresh environment, finds every suite."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import mergebench

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "mergebench").rglob("__init__.py")}
    assert listed == found | {"mergebench.tasks"}


def test_a_wheel_installed_elsewhere_finds_every_suite(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    probe = (
        "import mergebench.runner.catalog as c; import json; "
        "print(json.dumps({'tasks': str(c.packaged_tasks()), 'module': c.__file__, 'suites': sorted(c.all_suites())}))"
    )
    environment = {key: value for key, value in os.environ.items() if key != "MERGEBENCH_TASKS"}
    done = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=environment)
    import json

    found = json.loads(done.stdout)
    assert str(venv) in found["module"] and str(venv) in found["tasks"]  # the installed copy, not this checkout
    assert Path(mergebench.__file__).resolve().parents[1] != Path(found["tasks"]).parents[1]
    assert {"mini-vision-8", "mini-text-6", "vit-20", "glue-8", "llm-math-code", "mini-llm"} <= set(found["suites"])
