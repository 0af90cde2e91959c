"""Helpers shared by the experiment configs (big_vision style variant parsing)."""

from __future__ import annotations

import ml_collections

from bioscan_jax.train.optim import OptimSettings


def parse_arg(arg: str | None, *, variants: tuple[str, ...], **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument such as ``"paper"`` or ``"variant=paper,steps=10"``.

    The first bare word (or ``variant=``) picks the variant, which must be one of ``variants``
    (the first is the default); ``key=value`` pairs override ``defaults`` with their type.
    """
    out = dict(defaults, variant=variants[0])
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "variant", item
        if key not in out:
            raise ValueError(f"Unknown config argument {key!r}; valid: {', '.join(sorted(out))}")
        default = out[key]
        if isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    if out["variant"] not in variants:
        raise ValueError(f"Unknown variant {out['variant']!r}; valid variants: {', '.join(variants)}")
    return ml_collections.ConfigDict(out)


def adamw_onecycle(*, lr: float, lr_ref_batch: int = 64, weight_decay: float = 0.0, grad_clip: float = 0.0,
                   cycle_momentum: bool = False) -> dict:
    """The optimiser section of every training stage: AdamW (betas 0.9/0.999, eps 1e-8) with
    torch's ``OneCycleLR`` defaults (cosine, 30% warm-up, ``div_factor`` 25, ``final_div_factor``
    1e4), peak lr = ``lr * batch / lr_ref_batch`` (``lr_ref_batch=0``: ``lr`` as given).

    The recipe of BarcodeBERT (``barcodebert/pretraining.py``, ``finetuning.py``: lr per 64
    samples, beta1 cycled 0.95 → 0.85 → 0.95 as OneCycleLR's ``cycle_momentum``) and CLIBD
    (``scripts/train_cl.py``: ``lr_ref_batch=500``, no momentum cycling); read by
    :mod:`bioscan_jax.train.optim`.
    """
    d = OptimSettings()  # the defaults' one home
    section = dict(lr=lr, lr_ref_batch=lr_ref_batch, weight_decay=weight_decay, warmup_frac=d.warmup_frac,
                   schedule=d.schedule, b1=d.b1, b2=d.b2, eps=d.eps, div_factor=d.div_factor,
                   final_div_factor=d.final_div_factor, grad_clip=grad_clip)
    if cycle_momentum:
        section.update(cycle_momentum=True, base_momentum=d.base_momentum, max_momentum=d.max_momentum)
    OptimSettings.read(section)  # checked when built
    return section
