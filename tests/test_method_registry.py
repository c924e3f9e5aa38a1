"""Methods are declared once, by their signature; modules and plugins are found without a hand-kept list."""

import json
import sys
import textwrap
from typing import Annotated

import pytest
import torch

from mergebench import cli
from mergebench.methods import registry
from mergebench.methods.registry import HParam, lam_grid, register
from method_helpers import stack


@pytest.fixture
def empty_registry(monkeypatch):
    """A registry that has loaded nothing yet (and forgets whatever a test registers)."""
    monkeypatch.setattr(registry, "METHODS", {})
    monkeypatch.setattr(registry, "POST_SCALERS", {})
    monkeypatch.setattr(registry, "_loaded", False)


def test_signature_declares_hyperparameters_defaults_seed_and_data(empty_registry):
    @register("scaled_drop", citation="test", lam=lam_grid(0.5, (0.5, 1.0)))
    def scaled_drop(task_vectors, *, p: Annotated[float, HParam("drop", (0.1, 0.2), low=0.0, high=1.0)] = 0.1, seed: int):
        """Test method."""
        return task_vectors.vectors.sum(dim=0) * (1 - p)

    method = registry.METHODS["scaled_drop"]
    assert list(method.hparams) == ["p", "lam"] and method.defaults() == {"p": 0.1, "lam": 0.5}
    assert method.randomized and method.data == "none"
    assert method.origin == __name__  # registered outside mergebench.methods: named by its module
    assert len(method.settings()) == 4
    # θ0 + λ(1 − p) Σ τ = 0 + 0.5 · 0.9 · (4, 6)
    merged = method.merge(stack([[1.0, 2.0], [3.0, 4.0]]), {"p": 0.1, "lam": 0.5})
    assert torch.allclose(merged, torch.tensor([1.8, 2.7]))


@pytest.mark.parametrize(
    "define, message",
    [
        ("def f(tv, *, k): pass", "needs one Annotated"),
        ("def f(tv, *, k: Annotated[float, HParam('k')]): pass", "has no default"),
        ("def f(tv, *, k: Annotated[float, HParam('k', low=0.0, high=1.0)] = 2.0): pass", r"declared hyperparameter k=2.0 .* must be in \[0.0, 1.0\]"),
        ("def f(tv, *, k: Annotated[float, HParam('k', (0.5, 3.0), low=0.0, high=1.0)] = 0.5): pass", "k=3.0"),
        ("def f(tv, *, s: Annotated[str, HParam('s', choices=('a', 'b'))] = 'c'): pass", "must be one of a, b"),
        ("def f(tv, k: Annotated[float, HParam('k')] = 1.0): pass", "must be keyword-only"),
        ("def f(tv, *, model): pass", "takes 'model' exactly when it declares data access"),
        ("def f(tv, *, lam: Annotated[float, HParam('l')] = 1.0): pass", "'lam' is the post-scaler"),
    ],
)
def test_registration_fails_when_the_signature_and_the_declaration_differ(empty_registry, define, message):
    namespace = {"Annotated": Annotated, "HParam": HParam}
    exec(define, namespace)
    with pytest.raises(ValueError, match=message):
        register("bad", citation="test", lam=lam_grid(1.0, (1.0,)))(namespace["f"])


def test_data_access_is_declared_and_received_as_model(empty_registry):
    with pytest.raises(ValueError, match="takes 'model' exactly when"):
        register("needs_model", citation="test", data="train-samples")(lambda tv: tv)


def test_every_module_of_the_package_is_discovered():
    import pkgutil

    import mergebench.methods as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__)} - {"registry"}
    origins = {method.function.__module__.rsplit(".", 1)[-1] for method in registry.all_methods().values()}
    assert modules <= origins | {"lines"}  # lines registers a post-scaler, listed under its own name
    assert "lines" in registry.all_methods()


PLUGIN = '''
"""A third-party merging method."""
from typing import Annotated

from mergebench.methods.registry import HParam, lam_grid, register


@register("median_merge", citation="Plugin et al., 2026", lam=lam_grid(1.0, (0.5, 1.0)))
def median_merge(task_vectors, *, shrink: Annotated[float, HParam("shrinkage", (0.0, 0.5), low=0.0, high=1.0)] = 0.0):
    """Element-wise median of the task vectors, shrunk toward zero."""
    return task_vectors.vectors.median(dim=0).values * (1 - shrink)
'''


@pytest.fixture
def reloaded_registry(monkeypatch):
    """The built-in methods, with entry points read again; plugin modules imported by the test are forgotten."""
    monkeypatch.setattr(registry, "METHODS", {n: m for n, m in registry.METHODS.items() if m.origin == registry.BUILTIN})
    monkeypatch.setattr(registry, "POST_SCALERS", dict(registry.POST_SCALERS))
    monkeypatch.setattr(registry, "_loaded", False)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def install_plugin(root, monkeypatch):
    """A distribution ``mergebench-median`` whose ``mergebench.methods`` entry point names its module."""
    (root / "median_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "mergebench_median-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mergebench-median\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mergebench.methods]\nmedian = median_plugin\n")
    monkeypatch.syspath_prepend(str(root))


def test_plugin_registers_through_the_entry_point_group(tmp_path, monkeypatch, capsys, reloaded_registry):
    install_plugin(tmp_path, monkeypatch)
    method = registry.get_method("median_merge")
    assert method.origin == "mergebench-median" and list(method.hparams) == ["shrink", "lam"]
    merged = method.merge(stack([[1.0, -2.0], [3.0, 4.0], [2.0, 0.0]]), {"shrink": 0.5, "lam": 1.0})
    assert torch.equal(merged, torch.tensor([1.0, 0.0]))  # medians (2, 0), halved
    assert registry.get_method("ties").origin == registry.BUILTIN

    assert cli.main(["methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "median_merge" in line)
    assert "(plugin: mergebench-median)" in line
    assert cli.main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["median_merge"]["origin"] == "mergebench-median" and listed["ties"]["origin"] == "builtin"
    assert listed["median_merge"]["hparams"]["shrink"]["grid"] == [0.0, 0.5]


def test_a_broken_plugin_is_one_line(tmp_path, monkeypatch, capsys, reloaded_registry):
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a package that is not installed')\n")
    info = tmp_path / "broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mergebench.methods]\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["methods"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method plugin 'broken'" in err[0] and "needs a package" in err[0]
