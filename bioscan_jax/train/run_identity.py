"""Run identity: what determines a training stage's result, recorded beside its checkpoints.

A stage's workdir holds ``run_identity.json``: the fields that determine what the stage computes
(seed, the ``train`` and ``optim`` sections without their cosmetic fields, and what the task adds:
model, data identity, stage options) and their fingerprint. Resuming checks it:

* ``resume='auto'`` (default): a workdir with checkpoints resumes only when the identity is the
  same; otherwise :class:`RunIdentityError` says which fields differ and the two remedies;
* ``resume='restart'``: the stage's previous run files (checkpoints, metrics, TensorBoard events,
  the identity) are deleted first; the run starts afresh;
* ``resume='force'``: continue from the checkpoints whatever they were trained with (a warning
  lists the differences; the new identity is recorded with the one it replaced).

Fields that do not change a stage's result (where and how often it logs and saves, the device
layout) are left out, so a run can be resumed on another mesh or with another log interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

from bioscan_jax import checkpoint

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "restart", "force")
FILE = "run_identity.json"
#: What a stage's train loop writes into its workdir (what ``resume='restart'`` deletes).
RUN_FILES = ("checkpoints", "checkpoints.corrupt", "metrics.jsonl", "tensorboard", "config.json", FILE)
#: ``train.*`` fields that change how a run reports, not what it computes.
COSMETIC_TRAIN_FIELDS = ("log_every", "eval_every", "progress_bar", "tensorboard")


class RunIdentityError(ValueError):
    """A workdir holds checkpoints of a run with another identity."""


def _plain(value: Any) -> Any:
    """JSON-able plain data of config sections, tuples and numpy scalars (sorted keys)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def stage_identity(config: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a train-loop stage: ``seed``, ``train`` (no cosmetic fields), ``optim``,
    plus ``extra`` (what the task knows determines the result: model, data, stage options)."""
    def section(name):
        s = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
        return _plain(s) if s is not None else None

    train = section("train") or {}
    train = {k: v for k, v in train.items() if k not in COSMETIC_TRAIN_FIELDS}
    out = {"seed": section("seed"), "train": train, "optim": section("optim")}
    if extra:
        out.update(_plain(dict(extra)))
    return out


def fingerprint(identity: Mapping[str, Any]) -> str:
    text = json.dumps(_plain(dict(identity)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """``a.b: old -> new`` for the first ``limit`` differing fields (and how many more)."""
    a, b = _flatten(_plain(dict(old))), _flatten(_plain(dict(new)))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]

    def short(v):
        text = json.dumps(v) if v != "<absent>" else v
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [f"{k}: {short(a.get(k, '<absent>'))} -> {short(b.get(k, '<absent>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


def has_checkpoints(workdir: str) -> bool:
    return bool(checkpoint.complete_steps(os.path.join(workdir, "checkpoints")))


def read(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write(workdir: str, identity: Mapping[str, Any], **more: Any) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint(identity), "identity": _plain(dict(identity)), **more}, f, indent=2)
    os.replace(tmp, path)


def clear(workdir: str) -> list[str]:
    """Deletes the stage's run files (:data:`RUN_FILES`) in ``workdir``; returns what it deleted."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def check(workdir: str, identity: Mapping[str, Any], resume: str = "auto", *, writer: bool = True) -> str:
    """Applies ``resume`` to ``workdir`` before the train loop opens its checkpoints.

    Returns the fingerprint of ``identity``. Raises :class:`RunIdentityError` (one line: what
    differs and the remedies) when ``workdir`` has checkpoints of another identity and ``resume``
    is ``'auto'``. ``writer`` is False on the processes of a multi-process run that do not write
    files (only process 0 deletes or records).
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"unknown config.resume {resume!r}; valid: {', '.join(RESUME_MODES)}")
    digest = fingerprint(identity)
    if resume == "restart":
        if writer:
            removed = clear(workdir)
            if removed:
                logger.warning("resume=restart: deleted the previous run in %s (%s)", workdir, ", ".join(removed))
            _write(workdir, identity)
        return digest
    if not has_checkpoints(workdir):
        if writer:
            _write(workdir, identity)
        return digest
    stored = read(workdir)
    if stored is not None and stored.get("fingerprint") == digest:
        return digest
    what = (differences(stored.get("identity", {}), identity) if stored is not None
            else f"its checkpoints have no {FILE} (written by an older bioscan-jax)")
    if resume == "force":
        logger.warning("resume=force: continuing the run in %s although it differs (%s)", workdir, what)
        if writer:
            _write(workdir, identity, forced_over=stored.get("fingerprint") if stored else None)
        return digest
    raise RunIdentityError(
        f"{workdir} holds checkpoints of a different run ({what}); use a new --workdir, or "
        f"--config.resume=restart to discard the old run (--config.resume=force continues it anyway)")
