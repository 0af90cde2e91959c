"""The layers import downwards only (docs/architecture.md).

data → models → train / eval → tasks → run.py / cli; ``bioscan_jax.sharding`` sits below models,
train and eval. This walks every module's imports (module level and inside functions) and fails
on an import that runs back up or sideways:

* a task importing another task's modules (it may use the registry, ``bioscan_jax.tasks.get``,
  and through it the other task's spec);
* a module of ``train`` or ``eval`` named after a task (they are generic: a task's own training
  and evaluation live in its package, ``tasks/<name>/``);
* ``data`` importing ``tfds_builder`` at module level (the builder imports ``data``; the one place
  that registers and opens it does so lazily: :mod:`bioscan_jax.data.registration`);
* ``data`` importing ``models``, ``train``, ``eval`` or ``tasks``;
* ``models`` importing ``train``, ``eval`` or ``tasks``;
* ``eval`` importing ``train`` or ``tasks``, and ``train`` importing ``eval`` or ``tasks``;
* ``sharding``, ``checkpoint`` (orbax behind one module) and ``config_access`` importing any
  other part of the package (but ``sharding`` may use ``config_access``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bioscan_jax"

#: layer -> layers it must not import from
FORBIDDEN = {
    "data": {"models", "train", "eval", "tasks", "convert"},
    "models": {"train", "eval", "tasks"},
    "eval": {"train", "tasks"},
    "train": {"eval", "tasks"},
    "sharding": {"data", "models", "train", "eval", "tasks", "convert"},
    "config_access": {"data", "models", "train", "eval", "tasks", "convert", "sharding"},
    "checkpoint": {"data", "models", "train", "eval", "tasks", "convert", "sharding"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _task(module: str) -> str | None:
    """The task package a module belongs to (``bioscan_jax.tasks.<task>...``), else None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "tasks" and parts[2] in TASK_NAMES else None


#: The task packages (``tasks/<name>/__init__.py``); the registry's own names are not tasks.
TASK_NAMES = frozenset(p.parent.name for p in (PACKAGE / "tasks").glob("*/__init__.py"))


def imports(path: pathlib.Path):
    """``(imported module, at module level?)`` for every import in the file; ``from X import y``
    counts as ``X.y`` (``y`` may be a module)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", id(node) in top


def violations() -> list[str]:
    found = []
    for module, path in _modules():
        layer = _layer(module)
        named = [t for t in TASK_NAMES if t in module.split(".")[-1]]
        if layer in ("train", "eval") and named:
            found.append(f"{module} ({layer}) is named after the task {named[0]}")
        for name, module_level in imports(path):
            if name.startswith("tfds_builder") and layer == "data" and module_level:
                found.append(f"{module} imports {name} at module level")
            if not name.startswith("bioscan_jax."):
                continue
            target = _layer(name)
            if layer == "tasks" and _task(name) is not None and _task(name) != _task(module):
                found.append(f"{module} imports the task {name}")
            if target in FORBIDDEN.get(layer, ()):
                found.append(f"{module} ({layer}) imports {name} ({target})")
    return sorted(set(found))


def test_no_import_runs_up_or_sideways():
    assert violations() == []


def test_the_task_packages_are_found():
    assert TASK_NAMES == {"barcodebert", "clibd", "zsc"}


@pytest.mark.parametrize("module, source, expected", [
    ("tasks/zsc/x.py", "from bioscan_jax.tasks import clibd\n", "imports the task"),
    ("tasks/zsc/x.py", "def f():\n    from bioscan_jax.tasks.clibd import training\n", "imports the task"),
    ("data/x.py", "from tfds_builder.bioscan5m import fields\n", "at module level"),
    ("models/x.py", "import bioscan_jax.train.loop\n", "(train)"),
    ("eval/x.py", "def f():\n    from bioscan_jax.tasks.barcodebert import evaluation\n", "(tasks)"),
    ("eval/clibd_x.py", "import numpy\n", "named after the task clibd"),
    ("train/zsc.py", "import numpy\n", "named after the task zsc"),
])
def test_the_check_sees_each_kind(tmp_path, monkeypatch, module, source, expected):
    """Each rule fires on a module that breaks it (so the test above cannot pass vacuously)."""
    fake = tmp_path / "bioscan_jax"
    (fake / module).parent.mkdir(parents=True)
    (fake / module).write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(expected in v for v in violations()), violations()


def test_a_task_may_use_another_through_the_registry(tmp_path, monkeypatch):
    fake = tmp_path / "bioscan_jax"
    (fake / "tasks" / "zsc").mkdir(parents=True)
    (fake / "tasks" / "zsc" / "x.py").write_text("from bioscan_jax import tasks\nfrom bioscan_jax.tasks import get\n"
                                                 "from bioscan_jax.tasks.zsc import encoders\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == []


def test_tfds_finds_bioscan5m_after_import_bioscan_jax():
    """``import bioscan_jax`` stays light, and TFDS knows ``bioscan5m`` once it is imported."""
    import subprocess
    import sys

    code = ("import sys, bioscan_jax\n"
            "assert 'tensorflow_datasets' not in sys.modules and 'jax' not in sys.modules\n"
            "import tensorflow_datasets as tfds\n"
            "assert 'bioscan5m' in tfds.list_builders(with_community_datasets=False)\n"
            "print(tfds.builder('bioscan5m/cropped_256').info.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("bioscan5m")
