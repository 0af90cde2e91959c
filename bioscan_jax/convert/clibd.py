"""A released CLIBD checkpoint (``best.pth``) → a :class:`~bioscan_jax.models.towers.ClibdModel`.

``load('best.pth')`` builds all the towers the file holds in ``tower_mode='reference'`` (CLIBD's
own forwards, :mod:`bioscan_jax.models.towers`) and copies every tensor in. Reference:
bioscan-ml/clibd (``bioscanclip/``).

What the file is. ``scripts/train_cl.py::main_process`` saves ``torch.save(original_model.
state_dict(), 'best.pth')``: the state dict of ``model/simple_clip.py::SimpleCLIP`` (DDP's
``module`` already unwrapped; a leftover ``module.`` prefix is accepted anyway). Its keys:

=============================================== ==================================================
``image_encoder.base_image_encoder.*``          a timm ``vit_base_patch16_224`` (``model/
                                                image_encoder.py::CLIBDImageEncoder``); ``head`` is
                                                ``reset_classifier(num_classes=768)``, the image
                                                projection; ``blocks.{i}.attn.qkv`` is the LoRA
                                                wrapper ``_LoRA_qkv_timm``: ``qkv.qkv.{weight,bias}``
                                                (the fused Linear) and ``qkv.linear_{a,b}_{q,v}.weight``
``dna_encoder.base_dna_encoder.*``              an HF ``BertForMaskedLM`` v1 BarcodeBERT (``model/
                                                dna_encoder.py::CLIBDDNAEncoder``): ``bert.*``,
                                                ``cls.predictions.transform.*`` and
                                                ``cls.predictions.decoder`` (replaced by
                                                ``Linear(hidden, 768)``: the DNA projection)
``language_encoder.base_language_encoder.*``    an HF ``BertModel`` (``prajjwal1/bert-small``,
                                                ``model/language_encoder.py::CLIBDLanguageEncoder``)
``language_encoder.proj.*``                     the text projection ``Linear(hidden, 768)``
``logit_scale``                                 ``SimpleCLIP.logit_scale`` (log of the scale; the
                                                forward returns ``logit_scale.exp()``)
=============================================== ==================================================

Older key names (:func:`rename_keys`): ``util/util.py::update_checkpoint_param_names`` replaces,
as substrings and in this order, ``LoRA_barcode_bert`` → ``CLIBDDNAEncoder``,
``lora_barcode_bert`` → ``base_dna_encoder``, ``LoRA_ViT_timm`` → ``CLIBDImageEncoder``,
``lora_vit`` → ``base_image_encoder``, ``LoRA_bert`` → ``CLIBDLanguageEncoder``, ``lora_bert`` →
``base_language_encoder`` (the attribute names before commit f9c7d7f "Naming refactor"), and
``initialize_model_and_load_from_checkpoint`` applies it to every checkpoint it loads.

LoRA (:func:`merge_lora`), merged into the base weights with scale 1 (there is no alpha/r):

* image (``image_encoder.py::_LoRA_qkv_timm.forward``): ``qkv = self.qkv(x)``, then
  ``qkv[..., :dim] += linear_b_q(linear_a_q(x))`` and ``qkv[..., -dim:] += linear_b_v(linear_a_v(x))``
  (q and v only, bias-free A/B), so ``qkv.weight[:d] += B_q @ A_q`` and ``qkv.weight[-d:] += B_v @ A_v``.
  ``CLIBDImageEncoder.__init__`` tests ``if lora_layer:``, so the ``lora_layer=[]`` that
  ``simple_clip.py::load_clip_model`` passes with ``disable_lora: true`` (the v1.0 5M configs)
  still wraps every block: released image towers carry LoRA tensors (trained, as
  ``disable_lora`` sets ``requires_grad=True`` on every parameter).
* DNA and text (``dna_encoder.py::_LoRALayer``, ``language_encoder.py::_LoRALayer``):
  ``self.w(x) + self.w_b(self.w_a(x))`` on ``attention.self.query`` and ``attention.self.value``:
  keys ``query.w.{weight,bias}``, ``query.w_a.weight``, ``query.w_b.weight`` (likewise value), so
  ``weight = w.weight + w_b.weight @ w_a.weight``. These towers test ``lora_layer is not None``,
  so with ``disable_lora`` (``lora_layer=[]``) they have no LoRA and plain
  ``query.{weight,bias}``; checkpoints of the LoRA configs (BIOSCAN-1M ``lora_*``) have it.

Tower forwards (``tower_mode='reference'``): the image tower is timm's CLS token after the final
LayerNorm (eps 1e-6) → ``head``; the DNA tower prepends id 0 to the v1 k-mer ids
(``dna_encoder.py::get_sequence_pipeline``), runs BERT without an attention mask, the MLM transform
and the decoder, then ``.logits.softmax(dim=-1).mean(dim=1)`` (``CLIBDDNAEncoder.forward``); the
text tower is ``proj(last_hidden_state.mean(dim=1))`` over all positions
(``CLIBDLanguageEncoder.forward``). The v1 word-embedding table (``<MASK>``, ``<CLS>``, ``<UNK>``,
k-mers) is moved row by row into our vocabulary
(:func:`bioscan_jax.convert.barcodebert.v1_rows_to_ours`), so our tokenizer's ids index it.

Sizes come from the tensors (widths, layers, vocabularies, patch and image size, the shared
dimension); what the tensors cannot say (attention heads, LayerNorm eps, activation, dropout)
comes from ``config`` when given, else from the paper towers (:func:`paper_config`, the towers of
``configs/clibd.py:paper``). With ``config`` the towers are built exactly as it says, and a tensor
that does not fit is a :class:`ConversionError` naming the tensor and both shapes.

Every tensor is consumed or matches :data:`IGNORED` (each with its reason); anything else is an
error listing the keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from bioscan_jax.convert import barcodebert as bb_load
from bioscan_jax.convert import hf_bert, hf_vit, torch_pickle
from bioscan_jax.convert.hf_bert import ConversionError, KeyReader
from bioscan_jax.models import kmer_bert, text, towers, vit

logger = logging.getLogger(__name__)

#: ``util/util.py::update_checkpoint_param_names``: substring replacements, applied in this order.
RENAMES: tuple[tuple[str, str], ...] = (
    ("LoRA_barcode_bert", "CLIBDDNAEncoder"),
    ("lora_barcode_bert", "base_dna_encoder"),
    ("LoRA_ViT_timm", "CLIBDImageEncoder"),
    ("lora_vit", "base_image_encoder"),
    ("LoRA_bert", "CLIBDLanguageEncoder"),
    ("lora_bert", "base_language_encoder"),
)

#: Top-level ``SimpleCLIP`` attributes → our modality (``model/simple_clip.py::SimpleCLIP``).
TOWER_ROOTS = {"image_encoder.": "image", "dna_encoder.": "dna", "language_encoder.": "text"}
#: Where each tower's network lies inside its CLIBD encoder (``CLIBD*Encoder.base_*_encoder``).
IMAGE_PREFIX = "image_encoder.base_image_encoder."
DNA_PREFIX = "dna_encoder.base_dna_encoder."
TEXT_PREFIX = "language_encoder.base_language_encoder."
LOGIT_SCALE = "logit_scale"

#: Tensors present in released files that no tower output depends on: (pattern, reason).
IGNORED: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.embeddings\.(position_ids|token_type_ids)$"),
     "BertEmbeddings index buffers (persistent in transformers 4.29.2, clibd's requirements.txt), not weights"),
    (re.compile(r"^language_encoder\.base_language_encoder\.pooler\."),
     "BertModel pooler: CLIBDLanguageEncoder.forward uses last_hidden_state, not pooler_output"),
    (re.compile(r"^dna_encoder\.base_dna_encoder\.bert\.pooler\."),
     "BERT pooler: CLIBDDNAEncoder.forward uses the MLM head's logits"),
    (re.compile(r"^dna_encoder\.base_dna_encoder\.cls\.predictions\.bias$"),
     "BertLMPredictionHead.bias, the bias of the vocabulary decoder that CLIBDDNAEncoder.__init__ "
     "replaces with a new Linear (its own bias); BertLMPredictionHead.forward never adds it"),
    (re.compile(r"^logit_bias$"),
     "SimpleCLIP.logit_bias (SigLIP-style, None in the released configs): enters the loss only"),
)


# ============================================================================= paper towers


def paper_config(embed_dim: int = 768) -> towers.ClibdConfig:
    """The towers of ``configs/clibd.py:paper`` (``tasks/clibd/training.py::model_config`` of it): timm
    ViT-B/16 at 224 px with LayerNorm eps 1e-6, v1 BarcodeBERT 5-12-12 (vocabulary 4**5 + 3),
    ``bert-small`` (vocabulary 30522), shared dimension 768, ``tower_mode='reference'``."""
    return towers.ClibdConfig(
        image=vit.get_variant("B/16", image_size=224, layer_norm_eps=1e-6),
        dna=kmer_bert.get_variant("5_12_12", vocab_size=4**5 + 3),
        text=text.get_variant("bert-small"),
        embed_dim=embed_dim, tower_mode="reference")


# ============================================================================= reading


def rename_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The current key names of a CLIBD state dict (``util/util.py::update_checkpoint_param_names``:
    each of :data:`RENAMES` replaced as a substring, in order). Two keys that end up with the same
    name (the reference keeps the last silently) are an error."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, tensor in sd.items():
        new = name
        for old, current in RENAMES:
            if old in new:
                new = new.replace(old, current)
        if new in out:
            raise ConversionError(f"keys {origin[new]!r} and {name!r} both become {new!r} under CLIBD's renames "
                                  f"(update_checkpoint_param_names)")
        out[new], origin[new] = tensor, name
    return out


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a CLIBD ``best.pth`` as numpy, key names normalised (:func:`rename_keys`,
    DDP's ``module.`` prefix removed), read through :mod:`bioscan_jax.convert.torch_pickle`."""
    obj = torch_pickle.load(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not (hasattr(v, "shape") and hasattr(v, "dtype")))
    tensors = {str(k): hf_bert.to_numpy(v) for k, v in obj.items() if str(k) not in not_tensors}
    sd = rename_keys(bb_load._strip_module(tensors))
    towers_found = [t for t in TOWER_ROOTS if any(k.startswith(t) for k in sd)]
    if not towers_found or not_tensors:
        raise ConversionError(
            f"{path}: not a CLIBD checkpoint (SimpleCLIP.state_dict() with image_encoder.*, dna_encoder.*, "
            f"language_encoder.*, logit_scale); keys found: {sorted(map(str, obj))[:20]}"
            + (f"; entries that are not tensors: {not_tensors[:10]}" if not_tensors else ""))
    return sd


# ============================================================================= LoRA

_TIMM_QKV = re.compile(r"^(?P<base>.+\.attn\.qkv)\.qkv\.weight$")
_BERT_LORA = re.compile(r"^(?P<base>.+\.attention\.self\.(query|value))\.w\.weight$")


def _need(sd: Mapping[str, np.ndarray], keys: list[str], what: str) -> list[np.ndarray]:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ConversionError(f"{what}: LoRA tensors missing: {missing}")
    return [np.asarray(sd[k], np.float32) for k in keys]


def _lora_delta(a: np.ndarray, b: np.ndarray, out_dim: int, in_dim: int, names: tuple[str, str]) -> np.ndarray:
    """``B @ A`` (``Linear(r, out).weight`` [out, r] @ ``Linear(in, r).weight`` [r, in]), shapes checked."""
    r = a.shape[0]
    if a.ndim != 2 or a.shape[1] != in_dim:
        raise ConversionError(f"{names[0]}: checkpoint shape {tuple(a.shape)} != expected ({r}, {in_dim})")
    if b.shape != (out_dim, r):
        raise ConversionError(f"{names[1]}: checkpoint shape {tuple(b.shape)} != expected ({out_dim}, {r})")
    return (b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)


def _replace_with_merged(sd: dict[str, np.ndarray], base: str, weight: np.ndarray, wrapper_keys, bias_key: str) -> None:
    """In ``sd``: the LoRA wrapper's tensors (``wrapper_keys``) become the plain Linear
    ``<base>.weight`` (the merged ``weight``) and ``<base>.bias`` (the wrapped Linear's bias)."""
    for k in wrapper_keys:
        del sd[k]
    sd[base + ".weight"] = weight
    if bias_key in sd:
        sd[base + ".bias"] = sd.pop(bias_key)


def merge_lora(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``(state dict with every LoRA wrapper merged into a plain Linear, merged Linear names)``.

    timm (``image_encoder.py::_LoRA_qkv_timm``): ``<base>.qkv.{weight,bias}`` +
    ``<base>.linear_{a,b}_{q,v}.weight`` → ``<base>.{weight,bias}`` with
    ``weight[:d] += B_q @ A_q`` and ``weight[-d:] += B_v @ A_v`` (d = ``qkv.in_features``; k
    untouched). BERT (``dna_encoder.py::_LoRALayer``, ``language_encoder.py::_LoRALayer``):
    ``<base>.w.{weight,bias}`` + ``<base>.w_{a,b}.weight`` → ``<base>.{weight,bias}`` with
    ``weight = w.weight + w_b.weight @ w_a.weight``. Scale 1 in both (no alpha/r in the reference).
    """
    out = dict(sd)
    merged: list[str] = []
    for key in sorted(sd):
        if m := _TIMM_QKV.match(key):
            base = m.group("base")
            parts = [f"{base}.linear_{ab}_{qv}.weight" for qv in ("q", "v") for ab in ("a", "b")]
            a_q, b_q, a_v, b_v = _need(sd, parts, key)
            w = np.array(sd[key], np.float32)
            if w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
                raise ConversionError(f"{key}: checkpoint shape {tuple(w.shape)} is not a fused qkv [3 * d, d]")
            d = w.shape[1]
            w[:d] += _lora_delta(a_q, b_q, d, d, (parts[0], parts[1]))
            w[-d:] += _lora_delta(a_v, b_v, d, d, (parts[2], parts[3]))
            _replace_with_merged(out, base, w, (key, *parts), base + ".qkv.bias")
            merged.append(base)
        elif m := _BERT_LORA.match(key):
            base = m.group("base")
            parts = [base + ".w_a.weight", base + ".w_b.weight"]
            a, b = _need(sd, parts, key)
            w = np.array(sd[key], np.float32)
            w += _lora_delta(a, b, w.shape[0], w.shape[1], (parts[0], parts[1]))
            _replace_with_merged(out, base, w, (key, *parts), base + ".w.bias")
            merged.append(base)
    return out, merged


# ============================================================================= sizes from the tensors


def _shape(sd: Mapping[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        root = key.split(".")[0] + "."
        raise ConversionError(f"CLIBD {what}: no {key!r}; keys found under {root}: "
                              f"{sorted(k for k in sd if k.startswith(root))[:20]}")
    return tuple(sd[key].shape)


def _layer_count(sd: Mapping[str, np.ndarray], pattern: str, what: str) -> int:
    found = sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})
    if not found or found != list(range(len(found))):
        raise ConversionError(f"CLIBD {what}: layers {found} are not 0..n-1")
    return len(found)


def _image_config(sd, template: vit.ViTConfig) -> vit.ViTConfig:
    p = IMAGE_PREFIX
    d, c, ph, pw = _shape(sd, p + "patch_embed.proj.weight", "image tower")
    if ph != pw:
        raise ConversionError(f"{p}patch_embed.proj.weight: non-square patches {(ph, pw)}")
    n_pos = _shape(sd, p + "pos_embed", "image tower")[-2]
    prefix = 1 if p + "cls_token" in sd else 0
    grid = int(round(np.sqrt(n_pos - prefix)))
    if grid * grid != n_pos - prefix:
        raise ConversionError(f"{p}pos_embed: {n_pos} positions are not {prefix} + a square grid")
    return dataclasses.replace(
        template, hidden_size=d, num_channels=c, patch_size=ph, image_size=grid * ph,
        num_layers=_layer_count(sd, re.escape(p) + r"blocks\.(\d+)\.", "image tower"),
        mlp_dim=_shape(sd, p + "blocks.0.mlp.fc1.weight", "image tower")[0],
        qkv_bias=p + "blocks.0.attn.qkv.bias" in sd, num_classes=0)


def _dna_config(sd, template: kmer_bert.KmerBertConfig, source: str) -> kmer_bert.KmerBertConfig:
    got, layout = bb_load._config_from_tensors(sd, DNA_PREFIX + "bert.", template.num_heads, source)
    if layout != "v1":
        raise ConversionError(f"{DNA_PREFIX}bert.embeddings.word_embeddings.weight: {got.vocab_size} rows; CLIBD's "
                              f"DNA tokenizer (dna_encoder.py::get_sequence_pipeline) needs a v1 table of 4**k + 3")
    fields = ("k", "hidden_size", "num_layers", "intermediate_size", "max_position_embeddings", "type_vocab_size",
              "vocab_size")
    return dataclasses.replace(template, **{f: getattr(got, f) for f in fields})


def _text_config(sd, template: text.TextConfig) -> text.TextConfig:
    p = TEXT_PREFIX
    rows, d = _shape(sd, p + "embeddings.word_embeddings.weight", "text tower")
    types = sd.get(p + "embeddings.token_type_embeddings.weight")
    return dataclasses.replace(
        template, vocab_size=rows, hidden_size=d,
        num_layers=_layer_count(sd, re.escape(p) + r"encoder\.layer\.(\d+)\.", "text tower"),
        intermediate_size=_shape(sd, p + "encoder.layer.0.intermediate.dense.weight", "text tower")[0],
        max_position_embeddings=_shape(sd, p + "embeddings.position_embeddings.weight", "text tower")[0],
        type_vocab_size=types.shape[0] if types is not None else template.type_vocab_size)


#: The projection of each tower: (weight key, in the reference).
PROJECTIONS = {"image": IMAGE_PREFIX + "head", "dna": DNA_PREFIX + "cls.predictions.decoder",
               "text": "language_encoder.proj"}


def config_from_tensors(sd: Mapping[str, np.ndarray], template: towers.ClibdConfig | None = None,
                        source: str = "checkpoint") -> towers.ClibdConfig:
    """The :class:`towers.ClibdConfig` of the towers in ``sd`` (normalised names, LoRA merged):
    sizes from the tensors, everything else from ``template`` (default :func:`paper_config`)."""
    template = template or paper_config()
    present = _modalities(sd)
    shapes = {m: _shape(sd, PROJECTIONS[m] + ".weight", f"{m} projection") for m in present}
    dims = {m: s[0] for m, s in shapes.items()}
    if len(set(dims.values())) != 1:
        raise ConversionError("the tower projections disagree on the shared dimension: "
                              + ", ".join(f"{PROJECTIONS[m]}.weight {shapes[m]}" for m in present))
    paper = paper_config()
    return dataclasses.replace(
        template, tower_mode="reference", embed_dim=next(iter(dims.values())),
        image=_image_config(sd, template.image or paper.image) if "image" in present else None,
        dna=_dna_config(sd, template.dna or paper.dna, source) if "dna" in present else None,
        text=_text_config(sd, template.text or paper.text) if "text" in present else None)


def _modalities(sd: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    return tuple(m for root, m in TOWER_ROOTS.items() if any(k.startswith(root) for k in sd))


# ============================================================================= load


def _ignored_reason(key: str) -> str | None:
    return next((why for pat, why in IGNORED if pat.search(key)), None)


def load_with_report(path: str | os.PathLike, config: towers.ClibdConfig | None = None, *, seed: int = 0
                     ) -> tuple[towers.ClibdModel, dict[str, Any]]:
    """``(model, report)``: :func:`load`, plus what was read: ``{'loaded': [keys], 'ignored':
    {key: reason}, 'lora_merged': [Linear names], 'modalities': [...]}``."""
    src = str(path)
    sd, merged = merge_lora(read(path))
    present = _modalities(sd)
    if config is None:
        cfg = config_from_tensors(sd, source=src)
        sized_by = "the checkpoint"
    else:
        lacking = [m for m in present if getattr(config, m) is None]
        fill = config_from_tensors(sd, config, src) if lacking else None  # towers the config lacks: from the file
        cfg = dataclasses.replace(config, tower_mode="reference", **{
            m: (getattr(fill, m) if m in lacking else getattr(config, m)) if m in present else None
            for m in towers.MODALITIES})
        sized_by = "the given config (load(path) without one sizes the towers from the file)"
    model = towers.ClibdModel(cfg, rngs=nnx.Rngs(seed))
    used: set[str] = set()
    try:
        if "image" in present:
            used |= _load_image(model, sd)
        if "dna" in present:
            used |= _load_dna(model, sd)
        if "text" in present:
            used |= _load_text(model, sd)
        if LOGIT_SCALE not in sd:
            raise ConversionError(f"no {LOGIT_SCALE!r} (SimpleCLIP.logit_scale)")
        hf_bert.assign(model.log_scale, np.asarray(sd[LOGIT_SCALE], np.float32).reshape(()), LOGIT_SCALE)
        used.add(LOGIT_SCALE)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e} [towers sized by {sized_by}]") from e
    ignored = {k: r for k in sorted(set(sd) - used) if (r := _ignored_reason(k)) is not None}
    unexpected = sorted(set(sd) - used - set(ignored))
    if unexpected:
        raise ConversionError(f"{src}: tensors no tower consumes ({len(unexpected)}): {unexpected[:20]}")
    report = {"loaded": sorted(used), "ignored": ignored, "lora_merged": merged, "modalities": list(present)}
    logger.info("CLIBD checkpoint %s: towers %s, %d tensors loaded, %d LoRA pairs merged, %d ignored",
                src, present, len(used), len(merged), len(ignored))
    return model, report


def load(path: str | os.PathLike, config: towers.ClibdConfig | None = None, *, seed: int = 0) -> towers.ClibdModel:
    """The :class:`towers.ClibdModel` (``tower_mode='reference'``) of a CLIBD ``best.pth`` (module
    docstring): the towers the file holds, sized from its tensors (``config`` None: heads, eps
    etc. of :func:`paper_config`) or built as ``config`` says (its ``tower_mode`` is set to
    ``'reference'``; its towers that the file lacks are left out, towers the file has and it
    lacks are sized from the file).

    Raises :class:`~bioscan_jax.convert.hf_bert.ConversionError` naming the tensor and both
    shapes on a mismatch, the keys found for an unknown layout, and any tensor left unconsumed.
    """
    return load_with_report(path, config, seed=seed)[0]


def check_shapes(sd: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Every tensor of ``sd`` that ``expected`` (our model exported in the reference layout) names
    must have exactly its shape (the loaders' reshapes would accept a same-size permutation)."""
    for key, want in expected.items():
        if key in sd and tuple(sd[key].shape) != tuple(want.shape):
            raise ConversionError(f"{key}: checkpoint shape {tuple(sd[key].shape)} != model shape {tuple(want.shape)}")


def _finish(read: KeyReader, what: str) -> set[str]:
    if read.missing:
        raise ConversionError(f"the {what} lacks ({len(read.missing)}): {read.missing[:20]}")
    return set(read.used)


def _load_image(model: towers.ClibdModel, sd: Mapping[str, np.ndarray]) -> set[str]:
    """timm ViT (:func:`bioscan_jax.convert.hf_vit.load_timm_vit`, exact position grid) + ``head``
    → ``image.projection``."""
    tower = model.image
    others = sorted(k for k in sd if k.startswith("image_encoder.") and not k.startswith(IMAGE_PREFIX))
    if others:
        raise ConversionError(f"unknown image_encoder layout (not CLIBDImageEncoder over a timm ViT): {others[:20]}")
    head = PROJECTIONS["image"]
    check_shapes(sd, {IMAGE_PREFIX + k: v for k, v in hf_vit.export_timm_vit(tower.encoder).items()}
                 | hf_bert.export_linear(tower.projection, head))
    vit_sd = {k: v for k, v in sd.items() if k.startswith(IMAGE_PREFIX) and not k.startswith(head + ".")}
    report = hf_vit.load_timm_vit(tower.encoder, vit_sd, strict=True, resample=False)
    read = KeyReader(sd)
    hf_bert.set_linear(tower.projection.kernel, tower.projection.bias, read, head)
    return set(report["loaded"]) | _finish(read, "image projection (reset_classifier head)")


def _load_dna(model: towers.ClibdModel, sd: Mapping[str, np.ndarray]) -> set[str]:
    """v1 BarcodeBERT (rows moved by :func:`~bioscan_jax.convert.barcodebert.v1_rows_to_ours`),
    the MLM transform → ``dna.transform``, ``cls.predictions.decoder`` → ``dna.projection``."""
    tower = model.dna
    others = sorted(k for k in sd if k.startswith("dna_encoder.") and not k.startswith(DNA_PREFIX))
    if others:
        raise ConversionError(f"unknown dna_encoder layout (not CLIBDDNAEncoder over a BertForMaskedLM): {others[:20]}")
    bert = DNA_PREFIX + "bert."
    word = bert + "embeddings.word_embeddings.weight"
    cfg = tower.encoder.config
    sd = dict(sd)
    model_rows = tower.encoder.embeddings.word.embedding[...].shape
    if model_rows[0] != 4**cfg.k + 3:
        raise ConversionError(f"the DNA tower's vocabulary has {model_rows[0]} rows; CLIBD's DNA tokenizer "
                              f"(dna_encoder.py::get_sequence_pipeline) needs the v1 4**{cfg.k} + 3 = {4**cfg.k + 3}")
    if word in sd:
        if tuple(sd[word].shape) != tuple(model_rows):
            raise ConversionError(f"{word}: checkpoint shape {tuple(sd[word].shape)} != model shape "
                                  f"{tuple(model_rows)}")
        sd[word] = bb_load.v1_rows_to_ours(sd[word], cfg.k)
    h = DNA_PREFIX + "cls.predictions."
    check_shapes(sd, hf_bert.export_bert_encoder(tower.encoder, bert)
                 | hf_bert.export_linear(tower.transform.dense, h + "transform.dense")
                 | hf_bert.export_norm(tower.transform.norm, h + "transform.LayerNorm")
                 | hf_bert.export_linear(tower.projection, h + "decoder"))
    read = KeyReader(sd, bert)
    hf_bert.load_bert_encoder(tower.encoder, read)
    used = _finish(read, "DNA BERT")
    head = KeyReader(sd, h)
    hf_bert.set_linear(tower.transform.dense.kernel, tower.transform.dense.bias, head, "transform.dense")
    hf_bert.set_norm(tower.transform.norm, head, "transform.LayerNorm")
    hf_bert.set_linear(tower.projection.kernel, tower.projection.bias, head, "decoder")
    return used | _finish(head, "DNA MLM head")


def _load_text(model: towers.ClibdModel, sd: Mapping[str, np.ndarray]) -> set[str]:
    """HF ``BertModel`` → ``text.encoder``, ``proj`` → ``text.projection``."""
    tower = model.text
    others = sorted(k for k in sd if k.startswith("language_encoder.") and not k.startswith(TEXT_PREFIX)
                    and not k.startswith(PROJECTIONS["text"] + "."))
    if others:
        raise ConversionError(f"unknown language_encoder layout (not CLIBDLanguageEncoder over a BertModel): "
                              f"{others[:20]}")
    check_shapes(sd, hf_bert.export_bert_encoder(tower.encoder, TEXT_PREFIX)
                 | hf_bert.export_linear(tower.projection, PROJECTIONS["text"]))
    read = KeyReader(sd, TEXT_PREFIX)
    hf_bert.load_bert_encoder(tower.encoder, read)
    used = _finish(read, "text BERT")
    proj = KeyReader(sd)
    hf_bert.set_linear(tower.projection.kernel, tower.projection.bias, proj, PROJECTIONS["text"])
    return used | _finish(proj, "text projection (proj)")
