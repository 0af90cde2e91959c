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

from typing import Any

import jax.numpy as jnp
import optax

from bioscan_jax import config_access


def peak_lr(optim_config: Any, global_batch: int) -> float:
    """``lr * global_batch / lr_ref_batch`` (linear scaling), or ``lr`` when no reference batch."""
    lr = float(config_access.get(optim_config, "lr", 1e-4))
    ref = config_access.get(optim_config, "lr_ref_batch", 64)
    if ref:
        lr *= global_batch / float(ref)
    return lr


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
    peak = peak_lr(optim_config, global_batch)
    kind = str(config_access.get(optim_config, "schedule", "onecycle")).lower()
    warmup_frac = float(config_access.get(optim_config, "warmup_frac", 0.3))
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"config.optim.warmup_frac must be in [0, 1), got {warmup_frac}")
    div = float(config_access.get(optim_config, "div_factor", 25.0))
    final_div = float(config_access.get(optim_config, "final_div_factor", 1e4))
    if kind == "onecycle":
        return onecycle(total_steps, start=peak / div, peak=peak, end=peak / div / final_div, pct_start=warmup_frac)
    if kind == "warmup_cosine":
        warmup = int(round(warmup_frac * total_steps))
        return optax.warmup_cosine_decay_schedule(
            init_value=peak / div, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=peak / div / final_div)
    if kind == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(
        f"config.optim.schedule={kind!r} is unknown; use 'onecycle', 'warmup_cosine' or 'constant'")


def make_optimizer(
    optim_config: Any, *, total_steps: int, global_batch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) driven by :func:`make_schedule` (and, with
    ``cycle_momentum``, beta1 driven by the matching OneCycle momentum curve)."""
    schedule = make_schedule(optim_config, total_steps=total_steps, global_batch=global_batch)
    b1: Any = float(config_access.get(optim_config, "b1", 0.9))
    adamw = optax.adamw
    if bool(config_access.get(optim_config, "cycle_momentum", False)):
        if str(config_access.get(optim_config, "schedule", "onecycle")).lower() != "onecycle":
            raise ValueError("config.optim.cycle_momentum=True needs config.optim.schedule='onecycle'")
        high, low = float(config_access.get(optim_config, "max_momentum", 0.95)), float(config_access.get(optim_config, "base_momentum", 0.85))
        b1 = onecycle(total_steps, start=high, peak=low, end=high,
                      pct_start=float(config_access.get(optim_config, "warmup_frac", 0.3)))
        adamw = optax.inject_hyperparams(optax.adamw)
    tx = adamw(
        learning_rate=schedule,
        b1=b1,
        b2=float(config_access.get(optim_config, "b2", 0.999)),
        eps=float(config_access.get(optim_config, "eps", 1e-8)),
        weight_decay=float(config_access.get(optim_config, "weight_decay", 0.0)),
    )
    clip = float(config_access.get(optim_config, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule
