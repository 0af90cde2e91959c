"""ViT checkpoints (HF ``ViTModel`` and timm ``vit_*``) ↔ the NNX :class:`~bioscan_jax.models.vit.ViT`.

HF layouts accepted (optionally under ``vit.``): the hub layout
(``encoder.layer.{i}.attention.attention.query``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``, ``layernorm_before/after``, ``layernorm``) and the
in-memory layout of transformers ≥ 5 (``layers.{i}.attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``).
``pooler.*`` is ignored; ``classifier.*`` loads into the model's head when it has one (with the
same number of classes) and is skipped and reported under ``'ignored'`` when it has none.
Export writes the hub layout (what ``save_pretrained`` writes and every version loads).

timm layout (``vit_base_patch16_224`` etc.): ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1, attn.qkv (fused [3D, D]), attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``
(or ``fc_norm`` for average-pooled models), ``head`` (skipped and reported when the model has no
head, e.g. an ImageNet checkpoint for a feature tower). timm models use LayerNorm eps 1e-6:
build the model with ``layer_norm_eps=1e-6``.

Position embeddings stored for another resolution are resampled to the model's grid with
:func:`~bioscan_jax.models.vit.resample_posemb` (bilinear) unless ``resample=False``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from bioscan_jax.convert.hf_bert import (
    ConversionError,
    KeyReader,
    StateDict,
    assign,
    check_unrolled,
    export_linear,
    export_norm,
    export_qkv,
    finish,
    get,
    load_state_dict,
    set_linear,
    set_norm,
    set_qkv,
)
from bioscan_jax.models.vit import ViT, resample_posemb

_HF_V5_RENAMES = (
    (re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
_CLS = "embeddings.cls_token"
_POS = "embeddings.position_embeddings"


def hf_canonical(sd: Mapping[str, np.ndarray]) -> StateDict:
    out = {}
    for k, v in sd.items():
        if _HF_V5_RENAMES[0][0].search(k):
            for pat, rep in _HF_V5_RENAMES:
                k = pat.sub(rep, k)
        out[k] = v
    return out


def _find_prefix(sd: Mapping[str, np.ndarray], anchor: str) -> str:
    cands = [k[: -len(anchor)] for k in sd if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    if len(cands) != 1:
        raise ConversionError(
            f"expected exactly one '*{anchor}' key, found {len(cands)}; first keys: {sorted(sd)[:20]}")
    return cands[0]


def _set_posemb(model: ViT, pos: np.ndarray | None, name: str, resample: bool) -> None:
    if pos is None:
        return
    c = model.config
    want = model.pos_embedding[...].shape
    prefix = c.num_prefix_tokens
    if pos.ndim == 2:
        pos = pos[None]
    if pos.shape != want:
        if not resample:
            raise ConversionError(f"{name}: checkpoint shape {pos.shape} != model shape {want} (resample=False)")
        n_grid = pos.shape[1] - prefix
        if n_grid <= 0 or int(round(np.sqrt(n_grid))) ** 2 != n_grid:
            raise ConversionError(f"{name}: cannot resample shape {pos.shape} (prefix tokens {prefix}) to {want}")
        pos = np.asarray(resample_posemb(pos, c.grid, num_prefix_tokens=prefix))
    assign(model.pos_embedding, pos, name)


def _set_patch(model: ViT, read: KeyReader, key: str) -> None:
    w, b = read(key + ".weight"), read(key + ".bias")
    if w is not None:  # torch conv [D, C, P, P] → HWIO [P, P, C, D]
        assign(model.patch.kernel, w.transpose(2, 3, 1, 0), read.prefix + key + ".weight")
    if b is not None:
        assign(model.patch.bias, b, read.prefix + key + ".bias")


def _set_head(model: ViT, sd, read: KeyReader, key: str, load_head: bool | None) -> None:
    if model.head is None:
        return
    present = read.has(key + ".weight")
    if load_head is False or (load_head is None and not present):
        return
    if load_head is None:
        w = sd[read.prefix + key + ".weight"]
        if tuple(w.shape) != tuple(model.head.kernel[...].shape[::-1]):
            return  # a different label set: keep the fresh head
    set_linear(model.head.kernel, model.head.bias, read, key)


# ---------------------------------------------------------------------------------------------
# HF ViTModel
# ---------------------------------------------------------------------------------------------


def load_hf_vit(
    model: ViT,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    resample: bool = True,
    load_head: bool | None = None,
) -> dict[str, list[str]]:
    """Load an HF ``ViTModel`` / ``ViTForImageClassification`` checkpoint into ``model``."""
    sd = hf_canonical(load_state_dict(source))
    prefix = _find_prefix(sd, "embeddings.patch_embeddings.projection.weight")
    read = KeyReader(sd, prefix)
    _set_patch(model, read, "embeddings.patch_embeddings.projection")
    if model.cls is not None:
        v = read(_CLS)
        if v is not None:
            assign(model.cls, v, prefix + _CLS)
    elif read.has(_CLS):
        raise ConversionError("checkpoint has a CLS token but the model was built without one (class_token=False)")
    _set_posemb(model, read(_POS), prefix + _POS, resample)
    check_unrolled(model.encoder)
    for i, blk in enumerate(model.encoder.layers):
        p = f"encoder.layer.{i}."
        set_norm(blk.norm1, read, p + "layernorm_before")
        set_qkv(blk.attn, read, tuple(p + f"attention.attention.{n}" for n in ("query", "key", "value")))
        set_linear(blk.attn.out.kernel, blk.attn.out.bias, read, p + "attention.output.dense")
        set_norm(blk.norm2, read, p + "layernorm_after")
        set_linear(blk.mlp.fc1.kernel, blk.mlp.fc1.bias, read, p + "intermediate.dense")
        set_linear(blk.mlp.fc2.kernel, blk.mlp.fc2.bias, read, p + "output.dense")
    if model.norm is not None:
        set_norm(model.norm, read, "layernorm")
    outer = prefix[: -len("vit.")] if prefix.endswith("vit.") else prefix
    hread = KeyReader(sd, outer)
    _set_head(model, sd, hread, "classifier", load_head)
    read.used |= hread.used
    read.missing += hread.missing
    extra = () if model.head is not None else (re.compile(r"(^|\.)classifier\.(weight|bias)$"),)
    return finish(read, strict=strict, extra_ignorable=extra, what="ViT")


def export_hf_vit(model: ViT, *, prefix: str = "") -> StateDict:
    """Hub-layout ``ViTModel`` state dict (no pooler); ``classifier.*`` if the model has a head."""
    out: StateDict = {
        "embeddings.patch_embeddings.projection.weight": np.ascontiguousarray(get(model.patch.kernel).transpose(3, 2, 0, 1)),
        "embeddings.patch_embeddings.projection.bias": get(model.patch.bias),
        _POS: get(model.pos_embedding),
    }
    if model.cls is not None:
        out[_CLS] = get(model.cls)
    check_unrolled(model.encoder)
    for i, blk in enumerate(model.encoder.layers):
        p = f"encoder.layer.{i}."
        out.update(export_norm(blk.norm1, p + "layernorm_before"))
        out.update(export_qkv(blk.attn, tuple(p + f"attention.attention.{n}" for n in ("query", "key", "value"))))
        out.update(export_linear(blk.attn.out, p + "attention.output.dense"))
        out.update(export_norm(blk.norm2, p + "layernorm_after"))
        out.update(export_linear(blk.mlp.fc1, p + "intermediate.dense"))
        out.update(export_linear(blk.mlp.fc2, p + "output.dense"))
    if model.norm is not None:
        out.update(export_norm(model.norm, "layernorm"))
    out = {prefix + k: v for k, v in out.items()}
    if model.head is not None:
        outer = prefix[: -len("vit.")] if prefix.endswith("vit.") else ""
        out.update(export_linear(model.head, outer + "classifier"))
    return out


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def load_timm_vit(
    model: ViT,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    resample: bool = True,
    load_head: bool | None = None,
) -> dict[str, list[str]]:
    """Load a timm ViT state dict (``vit_base_patch16_224`` style) into ``model``."""
    sd = load_state_dict(source)
    prefix = _find_prefix(sd, "patch_embed.proj.weight")
    read = KeyReader(sd, prefix)
    c = model.config
    _set_patch(model, read, "patch_embed.proj")
    if model.cls is not None:
        v = read("cls_token")
        if v is not None:
            assign(model.cls, v, prefix + "cls_token")
    elif read.has("cls_token"):
        raise ConversionError("checkpoint has a CLS token but the model was built without one (class_token=False)")
    _set_posemb(model, read("pos_embed"), prefix + "pos_embed", resample)
    check_unrolled(model.encoder)
    for i, blk in enumerate(model.encoder.layers):
        p = f"blocks.{i}."
        set_norm(blk.norm1, read, p + "norm1")
        set_qkv(blk.attn, read, p + "attn.qkv")
        set_linear(blk.attn.out.kernel, blk.attn.out.bias, read, p + "attn.proj")
        set_norm(blk.norm2, read, p + "norm2")
        set_linear(blk.mlp.fc1.kernel, blk.mlp.fc1.bias, read, p + "mlp.fc1")
        set_linear(blk.mlp.fc2.kernel, blk.mlp.fc2.bias, read, p + "mlp.fc2")
    if model.norm is not None:
        key = "fc_norm" if c.fc_norm else "norm"
        if c.fc_norm != read.has("fc_norm.weight"):
            raise ConversionError(
                "checkpoint " + ("has" if read.has("fc_norm.weight") else "lacks") +
                f" 'fc_norm' but the model has fc_norm={c.fc_norm}")
        set_norm(model.norm, read, key)
    _set_head(model, sd, read, "head", load_head)
    extra = () if model.head is not None else (re.compile(r"(^|\.)head\.(weight|bias)$"),)
    return finish(read, strict=strict, extra_ignorable=extra, what="ViT")


def export_timm_vit(model: ViT) -> StateDict:
    """timm-layout state dict of ``model`` (fused qkv)."""
    c = model.config
    out: StateDict = {
        "patch_embed.proj.weight": np.ascontiguousarray(get(model.patch.kernel).transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": get(model.patch.bias),
        "pos_embed": get(model.pos_embedding),
    }
    if model.cls is not None:
        out["cls_token"] = get(model.cls)
    check_unrolled(model.encoder)
    for i, blk in enumerate(model.encoder.layers):
        p = f"blocks.{i}."
        out.update(export_norm(blk.norm1, p + "norm1"))
        out.update(export_qkv(blk.attn, p + "attn.qkv"))
        out.update(export_linear(blk.attn.out, p + "attn.proj"))
        out.update(export_norm(blk.norm2, p + "norm2"))
        out.update(export_linear(blk.mlp.fc1, p + "mlp.fc1"))
        out.update(export_linear(blk.mlp.fc2, p + "mlp.fc2"))
    if model.norm is not None:
        out.update(export_norm(model.norm, "fc_norm" if c.fc_norm else "norm"))
    if model.head is not None:
        out.update(export_linear(model.head, "head"))
    return out
