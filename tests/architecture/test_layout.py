"""Layout rules, checked by parsing files (no torch, no project imports).

* No code folder has an ``__init__.py`` at its top: the folders are the ``dspark.<folder>``
  namespace portions, so the repository root can never shadow the standard library's
  ``platform`` (or PyPI's ``kernels``).
* ``[tool.setuptools] packages`` lists exactly the package directories on disk.
* Our modules are imported only as ``dspark.<folder>...``, never by their bare folder name.
* ``scheduler`` imports no torch; ``drafter_service`` and ``verifier_service`` never import
  each other.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("platform", "drafter_service", "verifier_service", "scheduler", "kernels")
REQUIRED_TOP = ("pyproject.toml", "README.md", *CODE_FOLDERS, "clusters", "tests")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _py_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_required_top_level_entries_exist():
    missing = [n for n in REQUIRED_TOP if not (ROOT / n).exists()]
    assert not missing, f"missing top-level entries: {missing}"


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_no_init_at_top_of_code_folders(folder):
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow an import name"


def test_package_dir_maps_every_code_folder():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert mapping == {f"dspark.{f}": f for f in CODE_FOLDERS}


def test_packages_list_matches_folders():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = set()
    for folder in CODE_FOLDERS:
        top = ROOT / folder
        if any(top.glob("*.py")):
            on_disk.add(f"dspark.{folder}")
        for init in top.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(top).parts
            on_disk.add(".".join(("dspark", folder, *rel)))
        # a subfolder holding modules must be a regular package
        for py in top.rglob("*.py"):
            if py.parent != top and not (py.parent / "__init__.py").exists() and "__pycache__" not in py.parts:
                raise AssertionError(f"{py.parent} holds modules but has no __init__.py")
    assert listed == on_disk, f"only listed: {sorted(listed - on_disk)}; only on disk: {sorted(on_disk - listed)}"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _all_sources() -> list[Path]:
    files = [p for f in CODE_FOLDERS for p in _py_files(f)]
    return files + sorted(p for p in (ROOT / "tests").rglob("*.py") if "__pycache__" not in p.parts)


def test_no_bare_imports_of_our_folders():
    # `platform` alone is the standard library and is allowed; `platform.x` is not stdlib.
    bad = []
    for path in _all_sources():
        for name in _imports(path):
            head, _, rest = name.partition(".")
            if head == "platform" and rest:
                bad.append((path, name))
            elif head in CODE_FOLDERS[1:]:
                bad.append((path, name))
    assert not bad, "import our code only as dspark.<folder>: " + ", ".join(f"{p.relative_to(ROOT)}: {n}" for p, n in bad)


def test_scheduler_imports_no_torch():
    bad = [(p, n) for p in _py_files("scheduler") for n in _imports(p) if n.split(".")[0] in ("torch", "triton")]
    assert not bad, f"scheduler policies must stay torch-free: {bad}"


@pytest.mark.parametrize("src,dst", [("drafter_service", "verifier_service"), ("verifier_service", "drafter_service")])
def test_services_do_not_import_each_other(src, dst):
    bad = [(p, n) for p in _py_files(src) for n in _imports(p) if n.startswith(f"dspark.{dst}")]
    assert not bad, f"{src} must not import {dst}: {bad}"


@pytest.mark.parametrize(
    "how",
    [
        ["-c", "import platform, sys; print(platform.__file__); platform.system()"],
        ["-m", "pytest", "--version"],
    ],
)
def test_stdlib_platform_resolves_from_repo_root(how):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # as Ray's working_dir does
    r = subprocess.run([sys.executable, *how], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if how[0] == "-c":
        stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
        assert Path(r.stdout.strip()).resolve().is_relative_to(stdlib), r.stdout


def test_uuid_and_dspark_import_from_repo_root():
    # uuid calls platform.system() at import: the classic symptom of a shadowing `platform`.
    code = "import uuid, dspark.platform.config as c; print(c.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == (ROOT / "platform" / "config.py").resolve()
