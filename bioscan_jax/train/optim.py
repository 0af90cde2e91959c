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
=================== ========== ===================================================================

``onecycle`` is ``optax.cosine_onecycle_schedule``, the same curve as PyTorch's
``OneCycleLR(anneal_strategy='cos', pct_start=warmup_frac)`` (momentum is not cycled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None and default is not None else value


def peak_lr(optim_config: Any, global_batch: int) -> float:
    """``lr * global_batch / lr_ref_batch`` (linear scaling), or ``lr`` when no reference batch."""
    lr = float(_get(optim_config, "lr", 1e-4))
    ref = _get(optim_config, "lr_ref_batch", 64)
    if ref:
        lr *= global_batch / float(ref)
    return lr


def make_schedule(optim_config: Any, *, total_steps: int, global_batch: int) -> optax.Schedule:
    """The learning-rate schedule over ``total_steps`` optimiser updates."""
    if total_steps <= 0:
        raise ValueError(f"the number of training steps must be positive, got {total_steps}")
    peak = peak_lr(optim_config, global_batch)
    kind = str(_get(optim_config, "schedule", "onecycle")).lower()
    warmup_frac = float(_get(optim_config, "warmup_frac", 0.3))
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"config.optim.warmup_frac must be in [0, 1), got {warmup_frac}")
    div = float(_get(optim_config, "div_factor", 25.0))
    final_div = float(_get(optim_config, "final_div_factor", 1e4))
    if kind == "onecycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=total_steps, peak_value=peak, pct_start=warmup_frac,
            div_factor=div, final_div_factor=final_div)
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
    """AdamW (+ optional global-norm clipping) driven by :func:`make_schedule`."""
    schedule = make_schedule(optim_config, total_steps=total_steps, global_batch=global_batch)
    tx = optax.adamw(
        learning_rate=schedule,
        b1=float(_get(optim_config, "b1", 0.9)),
        b2=float(_get(optim_config, "b2", 0.999)),
        eps=float(_get(optim_config, "eps", 1e-8)),
        weight_decay=float(_get(optim_config, "weight_decay", 0.0)),
    )
    clip = float(_get(optim_config, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule
