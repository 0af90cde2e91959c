"""One loading path for BarcodeBERT checkpoints, whatever their format: :func:`load`.

The format is detected from the files, never from the file name:

============== ====================================================================================
format         what the file holds
============== ====================================================================================
``hf``         a Hugging Face model directory (``config.json`` + ``model.safetensors`` /
               ``pytorch_model.bin``) of ``BertForTokenClassification``, ``BertForMaskedLM`` or
               ``BertModel``; every size is read from ``config.json``
``training``   a BarcodeBERT training checkpoint (``barcodebert/pretraining.py``, saved by
               ``barcodebert/io.py::safe_save_model``): ``{'model': <DDP state dict>, 'optimizer',
               'scheduler', 'bert_config': BertConfig.to_dict(), 'config': Namespace, ...}``; read
               without running its pickle (:mod:`bioscan_jax.convert.torch_pickle`)
``v1``         a BarcodeBERT v1 checkpoint (``new_model_{4,5,6}.pth``, CLIBD's ``model_41.pth``):
               a raw state dict of a DDP-wrapped ``BertForMaskedLM`` with vocabulary
               ``4**k + 3``; no config in the file: sizes come from the tensors, heads default to
               the released models' 12 (``num_heads=`` overrides)
``clibd``      a CLIBD checkpoint (``image_encoder.*``, ``dna_encoder.*``, ...): its DNA tower's
               BERT, a v1 model (the older key names CLIBD renames on load are accepted)
============== ====================================================================================

Vocabularies. BarcodeBERT on BIOSCAN-5M (``barcodebert/datasets.py::DNADataset``) has
``[MASK]``=0, ``[UNK]``=1, then the 4**k k-mers — ours (:mod:`bioscan_jax.data.dna`). v1
(``barcodebert/io.py::load_old_pretrained_model``, CLIBD ``dna_encoder.py``) has ``<MASK>``=0,
``<CLS>``=1, ``<UNK>``=2, k-mers from 3. A v1 table is mapped row by row into ours, never by an
offset: ``[MASK]`` ← 0, ``[UNK]`` ← 2, k-mer ``i`` ← ``3 + i``, and ``<CLS>`` ← 1 into our
``[CLS]`` slot (``2 + 4**k``, the last row of a ``4**k + 3`` table).

The embedding each version's own probe computes (:class:`Protocol`):

* BIOSCAN-5M branch (``barcodebert/knn_probing.py``, ``datasets.py::representations_from_df``):
  trailing N stripped (``data/data_split.py``), masked mean of the last hidden layer;
* v1 (its 1-NN probe; CLIBD's tokenisation): the barcode padded or cut to 660 nt with N, no
  stripping, mean of the last hidden layer over all ``660 // k`` tokens, no attention mask.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bioscan_jax.convert import hf_bert
from bioscan_jax.convert import torch_pickle
from bioscan_jax.convert.hf_bert import ConversionError
from bioscan_jax.data import dna as dna_lib
from bioscan_jax.models import kmer_bert, towers

FORMATS = ("hf", "training", "v1", "clibd")
#: Heads of the released v1 models (the file does not say).
V1_NUM_HEADS = 12
#: CLIBD's DNA-tower prefixes: current names and the older ones its ``update_checkpoint_param_names``
#: renames (``bioscanclip/util/util.py``).
CLIBD_DNA_PREFIXES = ("dna_encoder.base_dna_encoder.", "dna_encoder.lora_barcode_bert.")
_WORD = "embeddings.word_embeddings.weight"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a checkpoint's own probe turns a barcode into an embedding."""

    tokenization: str  # a name of dna.TOKENIZATION_PROTOCOLS
    masked_mean: bool  # False: mean over all tokens, no attention mask
    name: str

    @property
    def strip_trailing_n(self) -> bool:
        return dna_lib.TOKENIZATION_PROTOCOLS[self.tokenization].strip_trailing_n

    def tokenizer(self, k: int, max_nucleotides: int = 660) -> dna_lib.KmerTokenizer:
        return dna_lib.tokenizer_for(self.tokenization, k, max_nucleotides=max_nucleotides)


BIOSCAN5M_PROTOCOL = Protocol(tokenization="bioscan5m", masked_mean=True, name="bioscan5m")
V1_PROTOCOL = Protocol(tokenization="v1", masked_mean=False, name="v1")


@dataclasses.dataclass
class Loaded:
    """A BarcodeBERT encoder with what it came from and how its probe embeds."""

    model: kmer_bert.KmerBert
    config: kmer_bert.KmerBertConfig
    format: str
    protocol: Protocol
    source: str
    #: state-dict keys that belong to heads or training and were not loaded (report)
    ignored: list[str] = dataclasses.field(default_factory=list)
    #: the MLM prediction head's raw tensors (``cls.predictions.*`` / ``classifier.*``), for towers
    head_tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def tokenizer(self, max_nucleotides: int = 660) -> dna_lib.KmerTokenizer:
        return self.protocol.tokenizer(self.config.k, max_nucleotides)

    def embed(self, ids, attention_mask):
        """The probe embedding (float32 [B, D]) of tokenised barcodes."""
        return embed_fn(self.protocol)(self.model, {"ids": ids, "attention_mask": attention_mask})


def embed_fn(protocol: Protocol):
    """``fn(model, batch) -> [B, D]``: the protocol's pooling of the last hidden layer."""

    def fn(model, batch):
        ids, mask = batch["ids"], batch["attention_mask"]
        if protocol.masked_mean:
            return model(ids, mask, deterministic=True)[1]["pooled"]
        hidden, _ = model(ids, None, deterministic=True)
        return hidden.astype("float32").mean(axis=1)

    return fn


# --------------------------------------------------------------------------------------------- files


def _k_of_vocab(rows: int) -> tuple[int, str]:
    """(k, layout) from a word-embedding row count: 4**k + 2 (ours) or 4**k + 3 (v1)."""
    for extra, layout in ((2, "bioscan5m"), (3, "v1")):
        k = round(math.log(max(rows - extra, 1), 4))
        if k >= 1 and 4**k + extra == rows:
            return k, layout
    raise ConversionError(f"{_WORD} has {rows} rows: neither 4**k + 2 (BarcodeBERT) nor 4**k + 3 (v1) for any k")


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    """DDP's ``module.`` prefix off every key (``barcodebert/utils.py::remove_extra_pre_fix``)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _arrays(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {str(k): hf_bert.to_numpy(v) for k, v in sd.items() if hasattr(v, "shape") and hasattr(v, "dtype")}


def _read_hf_dir(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    config = json.loads((path / "config.json").read_text())
    return config, hf_bert.load_state_dict(path)


def read(source: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(format, config dict or {}, state dict with DDP prefixes removed) of a checkpoint."""
    path = pathlib.Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConversionError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        config, sd = _read_hf_dir(path)
        return "hf", config, _strip_module(sd)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        sd = hf_bert.load_state_dict(path)
        obj: Any = sd
    else:
        obj = torch_pickle.load(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict in the checkpoint, found {type(obj).__name__}")
    if "bert_config" in obj and isinstance(obj.get("model"), Mapping):
        config = obj["bert_config"]
        config = config.as_dict() if isinstance(config, torch_pickle.Placeholder) else dict(config)
        return "training", config, _strip_module(_arrays(obj["model"]))
    flat = _strip_module(_arrays(obj))
    if any(k.startswith("dna_encoder.") for k in flat):
        return "clibd", {}, flat
    if not flat:
        raise ConversionError(f"{path}: no tensors found; top-level keys {sorted(map(str, obj))[:20]}. "
                              f"Known formats: {', '.join(FORMATS)} (see bioscan_jax.convert.barcodebert)")
    words = [k for k in flat if k.endswith(_WORD)]
    if len(words) != 1:
        raise ConversionError(f"{path}: not a BERT state dict (keys found: {sorted(flat)[:12]}...); "
                              f"known formats: {', '.join(FORMATS)}")
    return "v1" if _k_of_vocab(flat[words[0]].shape[0])[1] == "v1" else "state_dict", {}, flat


# --------------------------------------------------------------------------------------------- configs


def _config_from_hf(config: Mapping[str, Any], source: str) -> tuple[kmer_bert.KmerBertConfig, str]:
    missing = [f for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if f not in config]
    if missing:
        raise ConversionError(f"{source}: the model config lacks {missing}")
    k, layout = _k_of_vocab(int(config["vocab_size"]))
    cfg = kmer_bert.KmerBertConfig(
        k=k, hidden_size=int(config["hidden_size"]), num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]), intermediate_size=int(config.get("intermediate_size", 3072)),
        max_position_embeddings=int(config.get("max_position_embeddings", 512)),
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(config.get("pad_token_id", 0) or 0),
        hidden_act=str(config.get("hidden_act", "gelu")),
        vocab_size=4**k + (3 if layout == "v1" else 2), dropout_rate=0.0, attention_dropout_rate=0.0)
    return cfg, layout


def _config_from_tensors(sd: Mapping[str, np.ndarray], prefix: str, num_heads: int | None, source: str
                         ) -> tuple[kmer_bert.KmerBertConfig, str]:
    rows, hidden = sd[prefix + _WORD].shape
    k, layout = _k_of_vocab(rows)
    layers = sorted({int(m.group(1)) for key in sd if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", key))})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"{source}: encoder layers {layers} are not 0..n-1")
    inter = sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]
    positions = sd[prefix + "embeddings.position_embeddings.weight"].shape[0]
    types = sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0] if (
        prefix + "embeddings.token_type_embeddings.weight") in sd else 2
    if num_heads is None:
        if layout != "v1":
            raise ConversionError(f"{source}: a state dict without config does not say its number of attention heads; "
                                  "pass num_heads")
        num_heads = V1_NUM_HEADS
    if hidden % num_heads:
        raise ConversionError(f"{source}: hidden size {hidden} is not divisible by {num_heads} heads")
    return kmer_bert.KmerBertConfig(
        k=k, hidden_size=hidden, num_layers=len(layers), num_heads=num_heads, intermediate_size=inter,
        max_position_embeddings=positions, type_vocab_size=types, vocab_size=4**k + (3 if layout == "v1" else 2),
        dropout_rate=0.0, attention_dropout_rate=0.0), layout


def v1_rows_to_ours(table: np.ndarray, k: int) -> np.ndarray:
    """A v1 ``[4**k + 3, D]`` table (``<MASK>``, ``<CLS>``, ``<UNK>``, k-mers) in our row order
    (``[MASK]``, ``[UNK]``, k-mers, ``[CLS]``), each row moved explicitly."""
    n = 4**k
    if table.shape[0] != n + 3:
        raise ConversionError(f"v1 vocabulary table has {table.shape[0]} rows, expected 4**{k} + 3 = {n + 3}")
    out = np.empty_like(table)
    out[dna_lib.MASK_ID] = table[0]
    out[dna_lib.UNK_ID] = table[2]
    out[dna_lib.NUM_SPECIAL:dna_lib.NUM_SPECIAL + n] = table[3:3 + n]
    out[dna_lib.NUM_SPECIAL + n] = table[1]  # <CLS> into our [CLS] slot
    return out


# --------------------------------------------------------------------------------------------- load


def _encoder_prefix(sd: Mapping[str, np.ndarray], fmt: str, source: str) -> str:
    if fmt == "clibd":
        for p in CLIBD_DNA_PREFIXES:
            if p + "bert." + _WORD in sd:
                return p + "bert."
        raise ConversionError(f"{source}: CLIBD checkpoint without a DNA tower BERT under {CLIBD_DNA_PREFIXES}")
    return hf_bert.find_prefix(sd)


def load(source: str | os.PathLike, *, num_heads: int | None = None, protocol: str | None = None,
         dtype: Any = None, seed: int = 0) -> Loaded:
    """The BarcodeBERT encoder in ``source`` (a file or HF directory in any of :data:`FORMATS`).

    ``num_heads`` overrides the heads of a file without config (v1 default 12); ``protocol``
    (``'bioscan5m'`` | ``'v1'``) overrides the embedding protocol the format implies. Raises
    :class:`ConversionError` naming the tensor and both shapes on a mismatch, and the keys found
    for an unknown layout.
    """
    src = str(source)
    fmt, config, sd = read(source)
    sd = hf_bert.normalise_names(sd)
    prefix = _encoder_prefix(sd, fmt, src)
    if fmt in ("hf", "training"):
        cfg, layout = _config_from_hf(config, src)
        if num_heads is not None:
            cfg = dataclasses.replace(cfg, num_heads=num_heads)
    else:
        cfg, layout = _config_from_tensors(sd, prefix, num_heads, src)
        fmt = "v1" if fmt == "state_dict" and layout == "v1" else fmt
    rows = sd[prefix + _WORD].shape[0]
    if rows != 4**cfg.k + (3 if layout == "v1" else 2):
        raise ConversionError(f"{prefix}{_WORD}: checkpoint shape {sd[prefix + _WORD].shape} != config vocabulary "
                              f"({4**cfg.k + (3 if layout == 'v1' else 2)}, {cfg.hidden_size})")
    if layout == "v1":
        sd = dict(sd)
        sd[prefix + _WORD] = v1_rows_to_ours(sd[prefix + _WORD], cfg.k)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    model = kmer_bert.KmerBert(cfg, rngs=nnx.Rngs(seed))
    reader = hf_bert.KeyReader(sd, prefix)
    hf_bert.load_bert_encoder(model, reader)
    if reader.missing:
        raise ConversionError(f"{src}: missing encoder keys ({len(reader.missing)}): {reader.missing[:10]}")
    head_root = prefix[: -len("bert.")] if prefix.endswith("bert.") else prefix
    head = {k[len(head_root):]: v for k, v in sd.items()
            if k.startswith(head_root) and k not in reader.used and not k.startswith(prefix)}
    ignored = sorted(k for k in sd if k not in reader.used)
    chosen = {"bioscan5m": BIOSCAN5M_PROTOCOL, "v1": V1_PROTOCOL}
    if protocol is not None and protocol not in chosen:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(chosen)}")
    proto = chosen[protocol] if protocol else (V1_PROTOCOL if layout == "v1" else BIOSCAN5M_PROTOCOL)
    return Loaded(model=model, config=cfg, format=fmt, protocol=proto, source=src, ignored=ignored, head_tensors=head)


# --------------------------------------------------------------------------------------------- our runs


#: Written by :func:`save` beside the parameters: the model config and the embedding protocol.
MODEL_FILE = "model.json"
_PROTOCOLS = {p.name: p for p in (BIOSCAN5M_PROTOCOL, V1_PROTOCOL)}


def config_to_json(cfg: kmer_bert.KmerBertConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["dtype"] = None if cfg.dtype is None else np.dtype(cfg.dtype).name
    out["param_dtype"] = np.dtype(cfg.param_dtype).name
    return out


def config_from_json(fields: Mapping[str, Any]) -> kmer_bert.KmerBertConfig:
    known = {f.name for f in dataclasses.fields(kmer_bert.KmerBertConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConversionError(f"{MODEL_FILE}: unknown model fields {unknown}")
    fields = dict(fields)
    for name in ("dtype", "param_dtype"):
        if fields.get(name) is not None:
            fields[name] = jnp.dtype(fields[name])
    return kmer_bert.KmerBertConfig(**fields)


def save(loaded: Loaded, out: str | os.PathLike) -> pathlib.Path:
    """Writes ``loaded`` as a bioscan-jax model directory: ``<out>/checkpoints/0/state`` (an orbax
    train-state checkpoint holding ``params['bert']``, the layout every run writes) and
    ``<out>/model.json`` (model config, embedding protocol, source). :func:`load_workdir` and
    every config's ``init`` / checkpoint path read it back."""
    from bioscan_jax.checkpoint import Checkpointer

    out = pathlib.Path(out).absolute()
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out}/checkpoints exists; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    params = {"bert": nnx.state(loaded.model, nnx.Param).to_pure_dict()}
    with Checkpointer(out / "checkpoints", async_save=False) as ckpt:
        ckpt.save(0, {"params": params})
    (out / MODEL_FILE).write_text(json.dumps(
        {"model_config": config_to_json(loaded.config), "protocol": loaded.protocol.name,
         "format": loaded.format, "source": loaded.source, "ignored": loaded.ignored}, indent=2) + "\n")
    return out


def load_workdir(path: str | os.PathLike, *, variant: str | None = None,
                 model_config: kmer_bert.KmerBertConfig | None = None) -> Loaded:
    """The pretrained encoder of a bioscan-jax BarcodeBERT run (``<path>/pretrain/checkpoints``, or
    a stage directory with ``checkpoints``) or of a directory written by :func:`save`
    (``bioscan-jax convert``). The model comes from ``model_config``, else ``variant``, else the
    directory's ``model.json``, else the run's ``summary.json`` (``model_config``). A run embeds
    with the BIOSCAN-5M protocol; a converted model with the protocol of its source."""
    from bioscan_jax.checkpoint import latest_step, restore_params

    path = pathlib.Path(path)
    stage_dir = next((d for d in (path / "pretrain", path) if (d / "checkpoints").is_dir()), None)
    if stage_dir is None:
        raise FileNotFoundError(f"no BarcodeBERT pretraining checkpoint under {path} "
                                f"(expected {path}/pretrain/checkpoints or {path}/checkpoints)")
    protocol, fmt = BIOSCAN5M_PROTOCOL, "bioscan-jax"
    model_section: dict[str, Any] = {}
    for summary in (path / "summary.json", stage_dir.parent / "summary.json"):
        if summary.exists():
            data = json.loads(summary.read_text())
            model_section = data.get("model_config") or ({"variant": data["model"]} if "model" in data else {})
            break
    written = json.loads((path / MODEL_FILE).read_text()) if (path / MODEL_FILE).exists() else None
    if model_config is not None:
        cfg = model_config
    elif variant is not None or ("variant" in model_section and written is None):
        section = {**model_section, **({"variant": variant} if variant is not None else {})}
        cfg = kmer_bert.get_variant(section["variant"], remat=bool(section.get("remat", False)),
                                    scan_layers=bool(section.get("scan_layers", False)))
    elif written is not None:
        cfg = config_from_json(written["model_config"])
    else:
        raise ConversionError(f"{path}: no summary.json or {MODEL_FILE} saying which model was trained; pass its "
                              f"variant ({', '.join(sorted(kmer_bert.VARIANTS))})")
    if written is not None:
        protocol, fmt = _PROTOCOLS[written.get("protocol", "bioscan5m")], f"bioscan-jax ({written.get('format')})"
    step = latest_step(stage_dir / "checkpoints")
    params = restore_params(stage_dir / "checkpoints", step)
    model = kmer_bert.KmerBert(cfg, rngs=nnx.Rngs(0))
    towers.load_params(model, params.get("bert", params), f"encoder in {stage_dir}")
    return Loaded(model=model, config=cfg, format=fmt, protocol=protocol, source=f"{stage_dir} (step {step})")


def resolve(spec: str | os.PathLike, *, what: str = "model", num_heads: int | None = None,
            model_config: kmer_bert.KmerBertConfig | None = None) -> Loaded:
    """The BarcodeBERT encoder a path or hub id names: the one resolver of the CLI (``--model``),
    CLIBD (``model.dna.init``) and ZSC (``weights='checkpoint'``).

    * a hub id (``owner/name[:file]``): the Hugging Face cache, or the hub when online, first;
    * a directory without ``config.json``: a bioscan-jax BarcodeBERT run or a ``bioscan-jax
      convert`` output (:func:`load_workdir`, sized by ``model_config`` when given);
    * a checkpoint file or an HF model directory in any released format (:func:`load`).

    ``what`` names the setting in the error for a path that does not exist."""
    from bioscan_jax.convert import hub

    spec = str(spec)
    if hub.is_hub_id(spec):
        spec = str(hub.resolve(spec, what=what))
    if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
        return load_workdir(spec, model_config=model_config)
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"{what} {spec!r}: no such file or directory. A BarcodeBERT model is a checkpoint file (.pt/.pth/"
            f".bin/.safetensors), a Hugging Face model directory (download a hub model with "
            f"`huggingface-cli download <id> --local-dir DIR`), or a bioscan-jax BarcodeBERT workdir")
    return load(spec, num_heads=num_heads)
