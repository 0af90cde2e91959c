"""The layers import downwards only (docs/architecture.md).

data → models → train / eval → tasks → run.py / cli; ``bioscan_jax.sharding`` sits below models,
train and eval. This walks every module's imports (module level and inside functions) and fails
on an import that runs back up or sideways:

* a task importing another task;
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
        for name, module_level in imports(path):
            if name.startswith("tfds_builder") and layer == "data" and module_level:
                found.append(f"{module} imports {name} at module level")
            if not name.startswith("bioscan_jax."):
                continue
            target = _layer(name)
            if layer == "tasks" and target == "tasks" and name.split(".")[:3] != module.split(".")[:3] \
                    and len(name.split(".")) > 2:
                found.append(f"{module} imports the task {name}")
            if target in FORBIDDEN.get(layer, ()):
                found.append(f"{module} ({layer}) imports {name} ({target})")
    return sorted(set(found))


def test_no_import_runs_up_or_sideways():
    assert violations() == []


@pytest.mark.parametrize("source, expected", [
    ("from bioscan_jax.tasks import barcodebert\n", "imports the task"),
    ("def f():\n    from bioscan_jax.tasks import clibd\n", "imports the task"),
    ("from tfds_builder.bioscan5m import fields\n", "at module level"),
    ("import bioscan_jax.train.loop\n", "(train)"),
])
def test_the_check_sees_each_kind(tmp_path, monkeypatch, source, expected):
    """Each rule fires on a module that breaks it (so the test above cannot pass vacuously)."""
    fake = tmp_path / "bioscan_jax"
    layer = {"imports the task": "tasks", "at module level": "data", "(train)": "models"}[expected]
    (fake / layer).mkdir(parents=True)
    (fake / layer / "x.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(expected in v for v in violations()), violations()


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
