"""The test tree itself: no folder or helper shadows a package, and the markers skip what they mark.

pytest puts ``tests/`` and every test folder on ``sys.path`` (rootdir-based, no ``__init__.py``), so a
folder named ``tensorrt`` imports as a namespace package called ``tensorrt`` where TensorRT is missing,
and a helper module named like a package hides it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

from virchow_rt import _deps
from virchow_rt.backends.cuda.api import device_count
from virchow_rt.backends.engine_cache import RUNTIME_MODULES
from virchow_rt.backends.tensorrt_module import is_real_tensorrt

TESTS = Path(__file__).parent
PACKAGE = TESTS.parent / "virchow_rt"
LAZY_IMPORTERS = {"optional_import", "is_importable", "is_real_tensorrt", "import_module"}


def names_on_the_test_path() -> dict[str, Path]:
    """Top-level names importable from ``tests/`` and its test folders: sub-folders and modules."""
    folders = [TESTS, *(d for d in TESTS.rglob("*") if d.is_dir() and any(d.glob("test_*.py")))]
    names: dict[str, Path] = {}
    for folder in folders:
        for entry in folder.iterdir():
            if entry.name.startswith((".", "__")) or entry.name == "conftest.py":
                continue
            if entry.is_dir():
                names[entry.name] = entry
            elif entry.suffix == ".py":
                names[entry.stem] = entry
    return names


def names_the_project_imports() -> set[str]:
    """Top-level modules virchow_rt imports, eagerly, lazily (by a string) or only for type checking."""
    names = set(RUNTIME_MODULES) | set(_deps._KNOWN)
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in LAZY_IMPORTERS and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value.split(".")[0])
    return names


def test_the_scan_sees_lazy_and_type_only_imports() -> None:
    imported = names_the_project_imports()
    # tensorrt: only under TYPE_CHECKING and as a string to optional_import / import_module
    assert {"tensorrt", "tensorrt_lean", "torch", "onnxruntime", "numpy", "cuda", "h5py"} <= imported
    assert "virchow_rt" in imported and "sim_cuda" not in imported


def test_no_test_folder_or_helper_shadows_a_package() -> None:
    packages = (
        names_the_project_imports()
        | set(sys.stdlib_module_names)
        | set(importlib.metadata.packages_distributions())
    )
    shadowing = {name: str(path.relative_to(TESTS)) for name, path in names_on_the_test_path().items()}
    shadowing = {name: path for name, path in shadowing.items() if name in packages}
    assert shadowing == {}, f"rename these: on sys.path during tests they hide the package: {shadowing}"


PLANTED = """
import pytest

@pytest.mark.{marker}
def test_marked():
    pass

def test_unmarked():
    pass
"""


def test_markers_skip_what_they_mark_not_what_their_folder_is_called(pytester: pytest.Pytester) -> None:
    """Folders named like the markers (and a package): only the marked tests may skip, with the reason,
    and a ``tensorrt`` folder on the path must not pass for TensorRT."""
    pytester.makeconftest((TESTS / "conftest.py").read_text(encoding="utf-8"))
    pytester.makeini("[pytest]\nmarkers =\n    slow: s\n    gpu: g\n    tensorrt: t\n")
    why = {"tensorrt": "TensorRT is not importable", "slow": "run with --runslow", "gpu": "no CUDA GPU"}
    runs = {"tensorrt": is_real_tensorrt(), "slow": False, "gpu": device_count() > 0}
    for marker in why:
        folder = pytester.mkdir(marker)
        (folder / f"test_planted_{marker}.py").write_text(PLANTED.format(marker=marker), encoding="utf-8")
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    skipped = sorted(marker for marker in why if not runs[marker])  # the order pytest reports them in
    result.assert_outcomes(passed=6 - len(skipped), skipped=len(skipped))
    result.stdout.fnmatch_lines(
        [f"SKIPPED*test_planted_{m}.py*{why[m]}*" for m in skipped], consecutive=False
    )
