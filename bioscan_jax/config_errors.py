"""One line for a bad ``--config`` / ``--config.x=y`` flag, instead of chained tracebacks.

``ml_collections.config_flags`` reports an unknown field as a KeyError/AttributeError whose text
embeds the traceback of the config file's loader; :func:`one_line` keeps the cause ("unknown
config field 'finetune_splt'; did you mean 'finetune_split'?"). Used by ``run.py`` and the
planner (``python -m bioscan_jax.plan``), which parse the same flags.

:func:`check_config` checks the values of a parsed config (``lr`` finite and > 0, probabilities in
[0, 1], sizes positive integers, ... by field name: :data:`FIELD_RULES`) and each training stage's
batch, mesh and schedule settings, naming every field by its full path
(``config.pretrain.optim.lr = nan: must be a finite number > 0``); run.py calls it before anything
is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping


def one_line(error: Exception) -> str:
    """The cause of a flag-parsing error, in one line."""
    text = str(error).replace("\\n", " ").replace("\n", " ").strip()
    if text[:1] in "'\"":  # a repr-quoted KeyError / AttributeError message
        text = text.strip("'\" ")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    inner = re.findall(r"\b\w*Error: (.+?)(?=\s+File \"|$)", text)  # the last error of an embedded traceback
    if hint:
        return f"unknown config field {hint.group(2)!r}; did you mean {hint.group(1)!r}?"
    if isinstance(error, (KeyError, AttributeError)) and " " not in text:
        return f"unknown config field {text!r}"
    if inner:
        return inner[-1].strip()
    return text.splitlines()[0] if text else type(error).__name__


# ============================================================================= value checks
#
# ``--config.pretrain.optim.lr=nan`` parses (it is a float) and would only show as a NaN loss
# after the data are built and the model compiled. :func:`check_config` checks every value
# against the rule of its field name, anywhere in the config tree (a stage nested in another
# task's config included), and names the field by its full path. run.py calls it before the
# workdir is locked and before any data are built.


class ConfigValueError(ValueError):
    """A config value out of its valid range; the message names the full field path."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(low=None, high=None, *, low_open=False, high_open=False, integer=False):
    """A rule: a finite number (an integer with ``integer``) within the bounds; returns
    ``(check, description)``."""
    if integer and low == 1 and high is None:
        what = "a positive integer"
    elif integer and low == 0 and high is None:
        what = "an integer >= 0"
    elif low is not None and high is not None:
        what = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        what = "a finite number"

    def check(value) -> bool:
        if not _is_number(value):
            return False
        if integer:
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                return False
        elif not math.isfinite(value):
            return False
        if low is not None and (value < low or (low_open and value == low)):
            return False
        if high is not None and (value > high or (high_open and value == high)):
            return False
        return True

    return check, what


_POSITIVE = _number(0, low_open=True)
_NON_NEGATIVE = _number(0)
_FINITE = _number()
_PROBABILITY = _number(0, 1)
_FRACTION_OPEN = _number(0, 1, high_open=True)
_POSITIVE_INT = _number(1, integer=True)
_COUNT = _number(0, integer=True)

#: field name -> (check, valid range), wherever the field sits in the config tree.
FIELD_RULES = {
    # learning rates, epsilons and schedule factors: > 0
    **dict.fromkeys(("lr", "linear_lr", "eps", "div_factor", "final_div_factor", "temperature"), _POSITIVE),
    # decays, clipping and clamps: >= 0 (0 = off); layer_norm_eps 0 = the weights' default (zsc)
    **dict.fromkeys(("weight_decay", "linear_weight_decay", "grad_clip", "max_scale", "min_dist", "layer_norm_eps"),
                    _NON_NEGATIVE),
    # the contrastive loss's logit scale starts at exp(init_log_scale): any finite number
    **dict.fromkeys(("init_log_scale", "logit_scale_init"), _FINITE),
    # probabilities and fractions
    **dict.fromkeys(("mask_prob", "dropout", "dropout_rate", "attention_dropout", "drop_path", "test_fraction",
                     "unseen_fraction"), _PROBABILITY),
    **dict.fromkeys(("warmup_frac", "b1", "b2", "base_momentum", "max_momentum", "linear_momentum"), _FRACTION_OPEN),
    # sizes and counts that must be at least 1
    **dict.fromkeys(("batch_size", "eval_batch_size", "linear_batch_size", "accum_steps", "log_every", "linear_epochs",
                     "embed_dim", "hidden_size", "intermediate_size", "mlp_dim", "num_heads", "num_layers",
                     "patch_size", "max_length", "max_nucleotides", "n_components", "n_neighbors",
                     "kmer_baseline_k", "vocab_size", "frames"), _POSITIVE_INT),
    # counts where 0 means "off" or "the default"
    **dict.fromkeys(("steps", "eval_every", "every", "keep", "num_records", "worker_count", "min_length", "prefetch",
                     "read_threads", "chunk_size", "cache_max_records", "silhouette_samples", "lr_ref_batch", "seed",
                     "stride"),
                    _COUNT),
    # epochs may be fractional (steps = ceil(epochs * steps_per_epoch)); 0 = use steps
    "epochs": _NON_NEGATIVE,
}


def _show(value) -> str:
    return str(value) if _is_number(value) else repr(value)


def value_problems(config, prefix: str = "config") -> list[str]:
    """One line per value that breaks its field's rule (:data:`FIELD_RULES`), each naming the
    full field path, the value and the valid range, e.g.
    ``config.pretrain.optim.lr = nan: must be a finite number > 0``. ``None`` (unset) passes."""
    problems = []
    for name, value in config.items():
        path = f"{prefix}.{name}"
        if isinstance(value, Mapping) or hasattr(value, "items"):  # a section
            problems.extend(value_problems(value, path))
            continue
        rule = FIELD_RULES.get(name)
        if rule is None or value is None:
            continue
        check, what = rule
        if not check(value):
            problems.append(f"{path} = {_show(value)}: must be {what}")
    return problems


_STAGE_SECTIONS = ("train", "optim", "checkpoint")


def _stages(config, prefix: str = "config", ancestors=()):
    """``(path, stage section, its ancestors)`` of every training stage in the tree: a section
    with ``train`` and ``optim`` sections of its own (``config`` itself for CLIBD)."""
    if all(hasattr(config.get(s), "items") for s in ("train", "optim")):
        yield prefix, config, ancestors
    for name, value in config.items():
        if hasattr(value, "items") and name not in _STAGE_SECTIONS:
            yield from _stages(value, f"{prefix}.{name}", (*ancestors, (prefix, config)))


def qualify(message: str, stage_path: str, root_path: str = "config") -> str:
    """A message of the train loop's checks, which name a stage's fields as ``config.train.x``
    (the loop's own view of a stage), with the full path of the field instead:
    ``config.pretrain.train.x``; the mesh and sharding rules as ``<root>.mesh``."""
    message = re.sub(r"\bconfig\.(train|optim|checkpoint)\b", rf"{stage_path}.\1", message)
    if root_path != "config":
        message = re.sub(r"\bconfig\.(mesh|sharding_rules)\b", rf"{root_path}.\1", message)
    return message


def _enabled(path: str, ancestors) -> bool:
    """Whether a task that lists its stages (``config.stages``, BarcodeBERT) runs this one."""
    if not ancestors:
        return True
    _, parent = ancestors[-1]
    stages = parent.get("stages")
    if not isinstance(stages, str):
        return True
    return path.rsplit(".", 1)[-1] in {s.strip() for s in stages.split(",")}


def check_config(config, *, structure: bool = True) -> None:
    """Raise :class:`ConfigValueError` (one line, the full field path) for the first bad value
    (:func:`value_problems`), then, with ``structure``, run the train loop's own checks of each
    stage that will run (batch vs mesh, accumulation, schedule, checkpoints:
    :func:`bioscan_jax.train.loop.validate_config`) with the fields named by their full path.
    Cheap: no data are read and nothing is compiled."""
    problems = value_problems(config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigValueError(problems[0] + more)
    if not structure:
        return
    from bioscan_jax.train import loop  # pylint: disable=import-outside-toplevel  (a layer above this module)

    for path, stage, ancestors in _stages(config):
        if not _enabled(path, ancestors):
            continue
        owner_path, owner = next(((p, a) for p, a in reversed((*ancestors, (path, stage))) if a.get("mesh") is not None),
                                 ("config", config))
        view = loop.default_config()
        view.seed = owner.get("seed") or 0
        view.mesh = owner.get("mesh")
        if owner.get("sharding_rules") is not None:
            view.sharding_rules = owner.get("sharding_rules")
        for section in _STAGE_SECTIONS:
            if stage.get(section) is not None:
                view[section] = stage.get(section)
        try:
            loop.validate_config(view, steps_per_epoch=1)
        except ValueError as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigValueError(qualify(text, path, owner_path)) from None
