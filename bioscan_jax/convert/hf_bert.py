"""HF BERT checkpoints ↔ NNX models (KmerBert, KmerBertForMLM, KmerBertClassifier, TextEncoder).

Reads ``BertForTokenClassification`` / ``BertModel`` (and BarcodeBERT training checkpoints) from
``pytorch_model.bin`` (:func:`bioscan_jax.convert.torch_pickle.load`), ``model.safetensors``, a checkpoint directory (sharded
``*.index.json`` included) or an in-memory state dict of torch tensors or numpy arrays; and
exports back to the HF layout for round trips.

Key handling:

* a ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'model_state_dict': ...}`` wrapper is
  unwrapped; the encoder prefix (``''``, ``'bert.'``, ``'module.bert.'``, ...) is found from the
  word-embedding key; the head (``classifier.*``) is looked up next to it;
* old TF-style ``LayerNorm.gamma``/``beta`` names are accepted;
* ``pooler.*``, ``embeddings.position_ids``/``token_type_ids`` buffers, BertForMaskedLM heads
  (``cls.*``) and a ``classifier.*`` head when the target model has none (loading an MLM
  checkpoint into ``KmerBert``) are skipped and reported under ``'ignored'``; any other key not
  used is an error (``strict=True``), as is any missing key. The error message lists them.

Layout mapping (HF torch ``Linear.weight`` is [out, in]; ours are [in, out] kernels):
``attention.self.{query,key,value}`` → ``attn.qkv`` [D, 3, H, Dh];
``attention.output.dense`` → ``attn.out`` [H, Dh, D]; ``attention.output.LayerNorm`` → ``norm1``;
``intermediate.dense`` → ``mlp.fc1``; ``output.dense`` → ``mlp.fc2``; ``output.LayerNorm`` →
``norm2``; ``embeddings.{word,position,token_type}_embeddings`` → ``embeddings.{word,position,
token_type}``; ``embeddings.LayerNorm`` → ``embeddings.norm``; ``classifier`` → ``classifier``
(MLM) or ``head`` (sequence classifier).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

StateDict = dict[str, np.ndarray]

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_IGNORABLE = (
    re.compile(r"(^|\.)pooler\."),
    re.compile(r"(^|\.)embeddings\.position_ids$"),
    re.compile(r"(^|\.)embeddings\.token_type_ids$"),
    re.compile(r"^(.*\.)?cls\.predictions\."),
    re.compile(r"^(.*\.)?cls\.seq_relationship\."),
)


class ConversionError(ValueError):
    """A checkpoint does not match the model (missing/unexpected keys, wrong shapes)."""


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """torch tensor (any dtype, incl. bfloat16) / jax / numpy array → numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """Training checkpoints wrap the state dict: ``{'model': {...}, 'optimizer': ..., 'epoch': 3}``."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state dict (mapping of names to arrays), got {type(obj).__name__}")
    for _ in range(4):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
        else:
            break
    if not any(_is_array(v) for v in obj.values()):
        raise ConversionError(f"no arrays found in the checkpoint; top-level keys: {sorted(map(str, obj))[:20]}")
    return obj


def _load_file(path: pathlib.Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (TypeError, ValueError):  # e.g. bfloat16 tensors: go through torch
            from safetensors.torch import load_file as load_torch

            return load_torch(str(path))
    from bioscan_jax.convert import torch_pickle  # weights_only, or never running the pickle's code

    return torch_pickle.load(path)


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A flat ``{name: numpy array}`` from a file, a checkpoint directory or a mapping."""
    if isinstance(source, Mapping):
        raw = _unwrap(source)
    else:
        path = pathlib.Path(source)
        if path.is_dir():
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).exists():
                    path = path / name
                    break
            else:
                for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
                    if (path / index).exists():
                        files = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                        raw = {}
                        for f in files:
                            raw.update(_unwrap(_load_file(path / f)))
                        return {k: to_numpy(v) for k, v in raw.items() if _is_array(v)}
                raise ConversionError(
                    f"no model.safetensors, pytorch_model.bin or sharded index in {path}")
        if not path.exists():
            raise FileNotFoundError(path)
        raw = _unwrap(_load_file(path))
    return {str(k): to_numpy(v) for k, v in raw.items() if _is_array(v)}


# ---------------------------------------------------------------------------------------------
# Helpers shared with the ViT converter
# ---------------------------------------------------------------------------------------------


def assign(var: nnx.Variable, value: np.ndarray, name: str) -> None:
    """Set ``var`` to ``value`` (cast to the parameter dtype; keeps a NamedSharding if present)."""
    old = var[...]
    if tuple(value.shape) != tuple(old.shape):
        raise ConversionError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}")
    new = jnp.asarray(value, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        new = jax.device_put(new, sharding)
    var[...] = new


def get(var: nnx.Variable) -> np.ndarray:
    return np.asarray(jax.device_get(var[...]), dtype=np.float32)


class KeyReader:
    """Pops keys from a state dict, remembering what was used and what is missing."""

    def __init__(self, sd: Mapping[str, np.ndarray], prefix: str = ""):
        self.sd = dict(sd)
        self.prefix = prefix
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __call__(self, key: str) -> np.ndarray | None:
        full = self.prefix + key
        if full not in self.sd:
            self.missing.append(full)
            return None
        self.used.add(full)
        return self.sd[full]

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd


def set_linear(var_kernel, var_bias, read: KeyReader, key: str, kernel_shape=None) -> None:
    """HF ``Linear`` (``key.weight`` [out, in], ``key.bias``) → kernel [in, ...out] and bias."""
    w, b = read(key + ".weight"), read(key + ".bias") if var_bias is not None else None
    if w is not None:
        kshape = kernel_shape or var_kernel[...].shape
        if w.size != int(np.prod(kshape)):
            raise ConversionError(f"{read.prefix}{key}.weight: checkpoint shape {tuple(w.shape)} does not fit the "
                                  f"model's kernel of shape {tuple(kshape)}")
        assign(var_kernel, w.T.reshape(kshape), read.prefix + key + ".weight")
    if b is not None:
        assign(var_bias, b.reshape(var_bias[...].shape), read.prefix + key + ".bias")


def set_qkv(attn, read: KeyReader, keys: tuple[str, str, str] | str) -> None:
    """Separate q/k/v Linears (3 keys) or one fused [3D, D] ``qkv`` Linear → ``attn.qkv``."""
    kernel = np.array(get(attn.qkv.kernel))  # [D, 3, H, Dh]
    d, _, h, dh = kernel.shape
    has_bias = attn.qkv.bias is not None
    bias = np.array(get(attn.qkv.bias)) if has_bias else None
    ok = True
    if isinstance(keys, str):  # fused, rows ordered (3, H, Dh)
        w = read(keys + ".weight")
        b = read(keys + ".bias") if has_bias else None
        if w is None or (has_bias and b is None):
            return
        if w.shape != (3 * h * dh, d):
            raise ConversionError(f"{read.prefix}{keys}.weight: shape {w.shape} != {(3 * h * dh, d)}")
        kernel = w.reshape(3, h, dh, d).transpose(3, 0, 1, 2)
        if has_bias:
            bias = b.reshape(3, h, dh)
    else:
        for j, key in enumerate(keys):
            w = read(key + ".weight")
            b = read(key + ".bias") if has_bias else None
            if w is None or (has_bias and b is None):
                ok = False
                continue
            if w.shape != (h * dh, d):
                raise ConversionError(f"{read.prefix}{key}.weight: shape {w.shape} != {(h * dh, d)}")
            kernel[:, j] = w.T.reshape(d, h, dh)
            if has_bias:
                bias[j] = b.reshape(h, dh)
    if ok:
        assign(attn.qkv.kernel, kernel, read.prefix + "qkv")
        if has_bias:
            assign(attn.qkv.bias, bias, read.prefix + "qkv bias")


def export_qkv(attn, keys: tuple[str, str, str] | str) -> StateDict:
    kernel = get(attn.qkv.kernel)  # [D, 3, H, Dh]
    d = kernel.shape[0]
    bias = get(attn.qkv.bias) if attn.qkv.bias is not None else None
    out: StateDict = {}
    if isinstance(keys, str):
        out[keys + ".weight"] = np.ascontiguousarray(kernel.transpose(1, 2, 3, 0).reshape(-1, d))
        if bias is not None:
            out[keys + ".bias"] = bias.reshape(-1)
        return out
    for j, key in enumerate(keys):
        out[key + ".weight"] = np.ascontiguousarray(kernel[:, j].reshape(d, -1).T)
        if bias is not None:
            out[key + ".bias"] = bias[j].reshape(-1)
    return out


def export_linear(dense, key: str) -> StateDict:
    kernel = get(dense.kernel)
    n_in = len(dense.in_shape)
    w = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T
    out = {key + ".weight": np.ascontiguousarray(w)}
    if dense.bias is not None:
        out[key + ".bias"] = get(dense.bias).reshape(-1)
    return out


def set_norm(norm, read: KeyReader, key: str) -> None:
    for ours, theirs in (("scale", "weight"), ("bias", "bias")):
        v = read(f"{key}.{theirs}")
        if v is not None:
            assign(getattr(norm, ours), v, read.prefix + f"{key}.{theirs}")


def export_norm(norm, key: str) -> StateDict:
    return {f"{key}.weight": get(norm.scale), f"{key}.bias": get(norm.bias)}


def finish(read: KeyReader, *, strict: bool, extra_ignorable=(), what: str = "model") -> dict[str, list[str]]:
    """Raise on missing keys and (``strict``) on unexpected ones; return the report."""
    unused = sorted(set(read.sd) - read.used)
    ignorable = tuple(_IGNORABLE) + tuple(extra_ignorable)
    ignored = [k for k in unused if any(p.search(k) for p in ignorable)]
    unexpected = [k for k in unused if k not in ignored]
    problems = []
    if read.missing:
        problems.append(f"missing keys ({len(read.missing)}): {read.missing}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if problems:
        raise ConversionError(f"checkpoint does not match the {what}:\n  " + "\n  ".join(problems))
    return {"loaded": sorted(read.used), "ignored": ignored, "unexpected": unexpected}


def normalise_names(sd: Mapping[str, np.ndarray]) -> StateDict:
    """Old TF-port names (``LayerNorm.gamma``/``beta``) → ``weight``/``bias``."""
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k2 = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k2)
        out[k2] = v
    return out


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------

_WORD = "embeddings.word_embeddings.weight"


def _encoder_of(model):
    """The module holding ``embeddings`` + ``encoder`` and the head (or None) of ``model``."""
    core = model.bert if hasattr(model, "bert") else model
    if not (hasattr(core, "embeddings") and hasattr(core, "encoder")):
        raise TypeError(f"{type(model).__name__} is not a BERT-style model (needs .embeddings and .encoder)")
    head = None
    if hasattr(model, "bert"):
        head = getattr(model, "classifier", None)
        if head is None:
            head = getattr(model, "head", None)
    return core, head


def find_prefix(sd: Mapping[str, np.ndarray]) -> str:
    """The prefix in front of ``embeddings.word_embeddings.weight`` (``''``, ``'bert.'``, ...)."""
    cands = [k[: -len(_WORD)] for k in sd if k.endswith(_WORD)]
    if len(cands) != 1:
        sample = sorted(sd)[:20]
        raise ConversionError(
            f"expected exactly one '*{_WORD}' key, found {len(cands)} ({cands}); first keys: {sample}")
    return cands[0]


def _head_prefix(sd: Mapping[str, np.ndarray], enc_prefix: str) -> str | None:
    outer = enc_prefix[: -len("bert.")] if enc_prefix.endswith("bert.") else enc_prefix
    if outer + "classifier.weight" in sd:
        return outer
    cands = [k[: -len("classifier.weight")] for k in sd if k.endswith("classifier.weight")]
    return cands[0] if len(cands) == 1 else None


def check_unrolled(encoder) -> None:
    """Converters address blocks one by one: a scanned encoder (stacked blocks) is refused."""
    if getattr(encoder, "scan", False):
        raise ConversionError(
            "the model was built with scan_layers=True (stacked blocks); convert into the same model with "
            "scan_layers=False, then move the weights with bioscan_jax.models.layers.copy_layers")


def load_bert_encoder(core, read: KeyReader) -> None:
    """Fill ``core.embeddings`` and ``core.encoder`` from HF BertModel keys under ``read.prefix``."""
    emb = core.embeddings
    for ours, theirs in (("word", "word_embeddings"), ("position", "position_embeddings"),
                         ("token_type", "token_type_embeddings")):
        v = read(f"embeddings.{theirs}.weight")
        if v is not None:
            assign(getattr(emb, ours).embedding, v, read.prefix + f"embeddings.{theirs}.weight")
    set_norm(emb.norm, read, "embeddings.LayerNorm")
    check_unrolled(core.encoder)
    for i, blk in enumerate(core.encoder.layers):
        p = f"encoder.layer.{i}."
        set_qkv(blk.attn, read, tuple(p + f"attention.self.{n}" for n in ("query", "key", "value")))
        set_linear(blk.attn.out.kernel, blk.attn.out.bias, read, p + "attention.output.dense")
        set_norm(blk.norm1, read, p + "attention.output.LayerNorm")
        set_linear(blk.mlp.fc1.kernel, blk.mlp.fc1.bias, read, p + "intermediate.dense")
        set_linear(blk.mlp.fc2.kernel, blk.mlp.fc2.bias, read, p + "output.dense")
        set_norm(blk.norm2, read, p + "output.LayerNorm")


def export_bert_encoder(core, prefix: str = "") -> StateDict:
    emb = core.embeddings
    out: StateDict = {
        "embeddings.word_embeddings.weight": get(emb.word.embedding),
        "embeddings.position_embeddings.weight": get(emb.position.embedding),
        "embeddings.token_type_embeddings.weight": get(emb.token_type.embedding),
        **export_norm(emb.norm, "embeddings.LayerNorm"),
    }
    check_unrolled(core.encoder)
    for i, blk in enumerate(core.encoder.layers):
        p = f"encoder.layer.{i}."
        out.update(export_qkv(blk.attn, tuple(p + f"attention.self.{n}" for n in ("query", "key", "value"))))
        out.update(export_linear(blk.attn.out, p + "attention.output.dense"))
        out.update(export_norm(blk.norm1, p + "attention.output.LayerNorm"))
        out.update(export_linear(blk.mlp.fc1, p + "intermediate.dense"))
        out.update(export_linear(blk.mlp.fc2, p + "output.dense"))
        out.update(export_norm(blk.norm2, p + "output.LayerNorm"))
    return {prefix + k: v for k, v in out.items()}


def load_hf_bert(
    model: nnx.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    load_head: bool | None = None,
) -> dict[str, list[str]]:
    """Load an HF BERT checkpoint into ``model`` in place.

    ``model``: ``KmerBert`` / ``TextEncoder`` (encoder only), ``KmerBertForMLM`` (encoder +
    ``classifier``) or ``KmerBertClassifier`` (encoder + ``head``). ``load_head`` (default: True
    for the MLM model, "if present with the right shape" for the classifier) controls the head.
    Returns ``{'loaded': [...], 'ignored': [...], 'unexpected': [...]}``; raises
    :class:`ConversionError` listing missing (and, if ``strict``, unexpected) keys.
    """
    sd = normalise_names(load_state_dict(source))
    prefix = find_prefix(sd)
    core, head = _encoder_of(model)
    read = KeyReader(sd, prefix)
    load_bert_encoder(core, read)
    if head is not None:
        hp = _head_prefix(sd, prefix)
        is_mlm = hasattr(model, "classifier")
        want = is_mlm if load_head is None else load_head
        if load_head is None and not is_mlm and hp is not None:
            w = sd[hp + "classifier.weight"]
            want = tuple(w.shape) == tuple(head.kernel[...].shape[::-1])
        if want:
            if hp is None:  # report the key where it was expected
                hp = prefix[: -len("bert.")] if prefix.endswith("bert.") else prefix
            hread = KeyReader(sd, hp)
            set_linear(head.kernel, head.bias, hread, "classifier")
            read.used |= hread.used
            read.missing += hread.missing
    # a head the model does not have is skipped and reported (e.g. an MLM checkpoint → encoder)
    extra = () if head is not None else (re.compile(r"(^|\.)classifier\.(weight|bias)$"),)
    return finish(read, strict=strict, extra_ignorable=extra, what=type(model).__name__)


def export_hf_bert(model: nnx.Module) -> StateDict:
    """HF-layout state dict (numpy float32) of ``model``.

    ``KmerBert``/``TextEncoder`` → ``BertModel`` keys (no pooler); ``KmerBertForMLM`` →
    ``BertForTokenClassification`` keys (``bert.*`` + ``classifier.*``); ``KmerBertClassifier``
    → ``bert.*`` + ``classifier.*`` (the head).
    """
    core, head = _encoder_of(model)
    if head is None:
        return export_bert_encoder(core)
    out = export_bert_encoder(core, "bert.")
    out.update(export_linear(head, "classifier"))
    return out


def to_torch_state_dict(sd: Mapping[str, np.ndarray]):
    """numpy state dict → torch tensors (for ``torch_model.load_state_dict``)."""
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
