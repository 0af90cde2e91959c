"""Optimiser and learning-rate schedule (optax AdamW + OneCycle).

``config.optim`` fields (all optional; defaults are BarcodeBERT's recipe):

=================== ========== ===================================================================
field               default    meaning
=================== ========== ===================================================================
``lr``              1e-4       peak learning rate at ``lr_ref_batch`` samples per step
``lr_ref_batch``    64         the peak lr is ``lr * global_batch / lr_ref_batch`` (0/None: unscaled)
``weight_decay``    0.0        decoupled (AdamW) weight decay, applied to every parameter
``b1``, ``b2``      0.9, 0.999 Adam betas (PyTorch defaults)
``eps``             1e-8       Adam epsilon (PyTorch default)
``schedule``        onecycle   ``onecycle`` | ``warmup_cosine`` | ``constant``
``warmup_frac``     0.3        fraction of the steps spent warming up
``div_factor``      25.0       OneCycle: initial lr = peak / div_factor
``final_div_factor`` 1e4       OneCycle: final lr = initial lr / final_div_factor
``grad_clip``       0.0        clip by global norm when > 0
``cycle_momentum``  False      OneCycle only: cycle Adam's beta1 inversely to the lr, as torch's
                               ``OneCycleLR(cycle_momentum=True)`` (its default, and BarcodeBERT's)
``base_momentum``   0.85       the lowest beta1 (reached at the lr peak)
``max_momentum``    0.95       the highest beta1 (at the start and the end); ``b1`` is then unused
=================== ========== ===================================================================

``onecycle`` is PyTorch's ``torch.optim.lr_scheduler.OneCycleLR(anneal_strategy='cos',
three_phase=False, pct_start=warmup_frac)`` step for step (:func:`onecycle`): the warm-up phase
ends at step ``pct_start * total - 1`` and the annealing phase at ``total - 1``, as in its
``get_lr``. BarcodeBERT (``barcodebert/pretraining.py``, ``finetuning.py``) builds it with the
default ``cycle_momentum=True``, so Adam's beta1 goes 0.95 → 0.85 → 0.95; CLIBD turns it off.
With momentum cycling the Adam bias correction uses the current beta1, as ``torch.optim.AdamW``
does (``optax.inject_hyperparams``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from bioscan_jax import config_access

SCHEDULES = ("onecycle", "warmup_cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """A stage's ``optim`` section, read once (:meth:`read`) and checked when built; its field
    defaults (the table above) are the only ones: ``loop.default_config()`` and
    ``configs/common.adamw_onecycle`` take theirs from here."""

    lr: float = 1e-4
    lr_ref_batch: int = 64
    weight_decay: float = 0.0
    warmup_frac: float = 0.3
    schedule: str = "onecycle"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    grad_clip: float = 0.0
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"config.optim.schedule={self.schedule!r} is unknown; use "
                             + ", ".join(repr(x) for x in SCHEDULES[:-1]) + f" or {SCHEDULES[-1]!r}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"config.optim.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.cycle_momentum and self.schedule != "onecycle":
            raise ValueError("config.optim.cycle_momentum=True needs config.optim.schedule='onecycle'")

    @classmethod
    def read(cls, section: Any) -> OptimSettings:
        """The settings of an ``optim`` section (a ConfigDict, a dict, None or settings); an
        unknown field (a typo) raises instead of being ignored. ``None`` for ``lr_ref_batch`` or
        ``grad_clip`` means 0 (unscaled, no clipping)."""
        if isinstance(section, cls):
            return section
        values = dict(config_access.to_dict(section) or {})
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ValueError(f"config.optim has no field {', '.join(unknown)}; its fields: {', '.join(kinds)}")
        for name in ("lr_ref_batch", "grad_clip"):
            if values.get(name, 0) is None:
                values[name] = 0
        values = {k: _as(kinds[k], k, v) for k, v in values.items()}
        if "schedule" in values:
            values["schedule"] = values["schedule"].lower()
        return cls(**values)

    def as_section(self) -> dict[str, Any]:
        """The fields as a config section (a plain dict)."""
        return dataclasses.asdict(self)


def _as(kind: type, name: str, value: Any) -> Any:
    if kind is int and float(value) != int(float(value)):
        raise ValueError(f"config.optim.{name} must be a whole number, got {value!r}")
    return kind(float(value)) if kind is int else kind(value)


def peak_lr(optim_config: Any, global_batch: int) -> float:
    """``lr * global_batch / lr_ref_batch`` (linear scaling), or ``lr`` when no reference batch."""
    o = OptimSettings.read(optim_config)
    return o.lr * global_batch / float(o.lr_ref_batch) if o.lr_ref_batch else o.lr


def _cos_anneal(start, end, pct):
    """torch ``OneCycleLR._annealing_cos``: ``end + (start - end) / 2 * (cos(pi * pct) + 1)``."""
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def onecycle(total_steps: int, *, start: float, peak: float, end: float, pct_start: float) -> optax.Schedule:
    """torch's two-phase cosine OneCycle curve from ``start`` to ``peak`` to ``end`` over
    ``total_steps`` (the same function gives the lr, with start = peak/div, end = start/final_div,
    and the momentum, with start = max, peak = base, end = max)."""
    warm_end = float(pct_start * total_steps) - 1.0
    last = float(total_steps - 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        # torch divides by (end_step - start_step); a warm-up of 0 or 1 steps divides by <= 0 there.
        warm = _cos_anneal(start, peak, step / warm_end) if warm_end > 0 else jnp.asarray(peak, jnp.float32)
        anneal = _cos_anneal(peak, end, (step - warm_end) / (last - warm_end)) if last > warm_end else jnp.asarray(end, jnp.float32)
        return jnp.where(step <= warm_end, warm, anneal)

    return schedule


def make_schedule(optim_config: Any, *, total_steps: int, global_batch: int) -> optax.Schedule:
    """The learning-rate schedule over ``total_steps`` optimiser updates."""
    if total_steps <= 0:
        raise ValueError(f"the number of training steps must be positive, got {total_steps}")
    o = OptimSettings.read(optim_config)
    peak = peak_lr(o, global_batch)
    start, end = peak / o.div_factor, peak / o.div_factor / o.final_div_factor
    if o.schedule == "onecycle":
        return onecycle(total_steps, start=start, peak=peak, end=end, pct_start=o.warmup_frac)
    if o.schedule == "warmup_cosine":
        warmup = int(round(o.warmup_frac * total_steps))
        return optax.warmup_cosine_decay_schedule(
            init_value=start, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=end)
    return optax.constant_schedule(peak)


def make_optimizer(
    optim_config: Any, *, total_steps: int, global_batch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) driven by :func:`make_schedule` (and, with
    ``cycle_momentum``, beta1 driven by the matching OneCycle momentum curve)."""
    o = OptimSettings.read(optim_config)
    schedule = make_schedule(o, total_steps=total_steps, global_batch=global_batch)
    b1: Any = o.b1
    adamw = optax.adamw
    if o.cycle_momentum:
        b1 = onecycle(total_steps, start=o.max_momentum, peak=o.base_momentum, end=o.max_momentum,
                      pct_start=o.warmup_frac)
        adamw = optax.inject_hyperparams(optax.adamw)
    tx = adamw(learning_rate=schedule, b1=b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx, schedule
