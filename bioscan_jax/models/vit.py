"""Vision Transformer (Flax NNX), pre-LN, HF/timm/big_vision compatible.

Variants (ViT paper): ``Ti/16``, ``S/16``, ``B/16``, ``L/16``, ``B/32`` (any ``<size>/<patch>`` of
Ti, S, B, L, H works). Input: NHWC float images. Output ``(features, aux)``:

* ``features``: the pooled feature [B, D] — the CLS token after the final LayerNorm
  (``pool='tok'``, HF ``last_hidden_state[:, 0]``) or the mean of the patch tokens
  (``pool='gap'``) — or the logits [B, num_classes] when ``num_classes > 0``;
* ``aux['hidden']``: the whole sequence after the final norm [B, prefix+N, D];
  ``aux['tokens']``: patch tokens only [B, N, D]; ``aux['pooled']``: pooled feature;
  ``aux['pre_logits']`` when a head is present.

Parameters: ``patch.kernel`` [P, P, C, embed] (HWIO), ``patch.bias`` [embed], ``cls`` [1, 1, embed],
``pos_embedding`` [1, prefix+N, embed] (HF/timm layout: the CLS position first), encoder blocks
(see :mod:`bioscan_jax.models.layers` for logical axis names), ``norm`` (final LayerNorm), and an
optional ``head`` [embed, classes].

LayerNorm eps: HF ``ViTModel`` uses 1e-12 (the default here), timm and big_vision 1e-6.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bioscan_jax.models import layers

Array = jax.Array

_SIZES = {
    # name: (width, depth, heads, mlp_dim)
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
VARIANTS = ("Ti/16", "S/16", "B/16", "L/16", "B/32")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: str = "tok"  # 'tok' (CLS token) or 'gap' (mean of patch tokens)
    class_token: bool | None = None  # default: True for pool='tok'
    num_classes: int = 0  # 0: no head, return the pooled feature
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-12
    final_norm: bool = True
    fc_norm: bool = False  # timm 'avg' models: the final norm runs after pooling, not before
    qkv_bias: bool = True
    hidden_act: str = "gelu"  # exact erf GELU (HF and timm)
    attention_impl: str = "auto"  # see layers.MultiHeadAttention
    initializer_range: float = 0.02
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # stacked blocks run with nnx.scan (layers.Encoder scan=True)

    def __post_init__(self):
        if self.pool not in ("tok", "gap"):
            raise ValueError(f"pool must be 'tok' or 'gap', got {self.pool!r}")
        if self.class_token is None:
            object.__setattr__(self, "class_token", self.pool == "tok")
        if self.pool == "tok" and not self.class_token:
            raise ValueError("pool='tok' needs class_token=True")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def block_config(self) -> layers.BlockConfig:
        return layers.BlockConfig(
            dim=self.hidden_size,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            pre_norm=True,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout_rate,
            attention_dropout=self.attention_dropout_rate,
            activation=self.hidden_act,
            attention_impl=self.attention_impl,
            qkv_bias=self.qkv_bias,
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def get_variant(name: str, **overrides) -> ViTConfig:
    """``'B/16'`` etc. → :class:`ViTConfig`, with field overrides (e.g. ``image_size=384``)."""
    m = re.fullmatch(r"(Ti|S|M|B|L|H)/(\d+)", name)
    if not m:
        raise ValueError(f"unknown ViT variant {name!r}; valid variants: {list(VARIANTS)} "
                         f"(or any of {sorted(_SIZES)} / <patch>)")
    width, depth, heads, mlp = _SIZES[m.group(1)]
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown ViTConfig fields {bad}; valid fields: {sorted(fields)}")
    base = dict(patch_size=int(m.group(2)), hidden_size=width, num_layers=depth, num_heads=heads, mlp_dim=mlp)
    return ViTConfig(**{**base, **overrides})


def resample_posemb(
    posemb: Array | np.ndarray,
    new_grid: Sequence[int],
    *,
    num_prefix_tokens: int = 0,
    method: str = "bilinear",
) -> Array:
    """Resample learned position embeddings [1, prefix + gh*gw, D] to ``new_grid`` (h, w).

    The first ``num_prefix_tokens`` rows (e.g. the CLS position) are kept as they are; the grid
    part must be square. Identity (same values) when the grid size does not change.
    """
    posemb = jnp.asarray(posemb)
    if posemb.ndim == 2:
        posemb = posemb[None]
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise ValueError(f"position embedding has {n} grid tokens, not a square grid")
    gh, gw = int(new_grid[0]), int(new_grid[1])
    if (gh, gw) != (g, g):
        d = grid.shape[-1]
        grid = grid.reshape(1, g, g, d)
        grid = jax.image.resize(grid.astype(jnp.float32), (1, gh, gw, d), method=method).astype(posemb.dtype)
        grid = grid.reshape(1, gh * gw, d)
    return jnp.concatenate([prefix, grid], axis=1)


class PatchEmbed(nnx.Module):
    """Non-overlapping P×P patches → embed: a stride-P convolution with an HWIO kernel [P, P, C, D]."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(layers.partitioned(init, (None, None, None, "embed"))(
            rngs.params(), (p, p, c, d), cfg.param_dtype))
        self.bias = nnx.Param(layers.partitioned(layers.zeros_init, ("embed",))(rngs.params(), (d,), cfg.param_dtype))
        self.patch_size = p
        self.dtype = cfg.dtype

    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] → [B, (H/P)·(W/P), D], patches in row-major order (as the conv would give).

        Computed as patchify + one GEMM, which is much cheaper than a strided convolution in the
        backward pass on CPU.
        """
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
        p = self.patch_size
        b, h, w, c = x.shape
        if h % p or w % p:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        patches = x.astype(dtype).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, p * p * c)
        y = jnp.dot(patches, kernel.astype(dtype).reshape(p * p * c, -1))
        return y + self.bias[...].astype(dtype)


class ViT(nnx.Module):
    """Vision Transformer. ``ViT(get_variant('B/16'), rngs=nnx.Rngs(0))``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        self.patch = PatchEmbed(c, rngs=rngs)
        init = nnx.initializers.truncated_normal(c.initializer_range)
        d = c.hidden_size
        if c.class_token:
            self.cls = nnx.Param(layers.partitioned(init, (None, None, "embed"))(rngs.params(), (1, 1, d), c.param_dtype))
        else:
            self.cls = nnx.data(None)
        n = c.grid[0] * c.grid[1] + c.num_prefix_tokens
        self.pos_embedding = nnx.Param(
            layers.partitioned(init, (None, None, "embed"))(rngs.params(), (1, n, d), c.param_dtype))
        self.dropout = layers.Dropout(c.dropout_rate, rngs=rngs)
        self.encoder = layers.Encoder(
            c.block_config(), c.num_layers, drop_path=c.drop_path_rate, remat=c.remat, scan=c.scan_layers, rngs=rngs)
        norm_kw = dict(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.norm = layers.LayerNorm(d, **norm_kw) if (c.final_norm or c.fc_norm) else nnx.data(None)
        if c.num_classes:
            self.head = layers.DenseGeneral(
                d, c.num_classes, kernel_axes=("embed", "classes"), kernel_init=nnx.initializers.zeros_init(),
                param_dtype=c.param_dtype, rngs=rngs)
        else:
            self.head = nnx.data(None)

    def __call__(self, images: Array, *, deterministic: bool | None = None) -> tuple[Array, dict[str, Any]]:
        """``images`` float [B, H, W, C] at ``config.image_size`` (resample posemb for others)."""
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.num_channels:
            raise ValueError(f"expected NHWC images with {c.num_channels} channels, got shape {images.shape}")
        x = self.patch(images)
        b, n, d = x.shape
        pos = self.pos_embedding[...]
        if pos.shape[1] != n + c.num_prefix_tokens:
            raise ValueError(
                f"image gives {n} patches but the position embedding has {pos.shape[1] - c.num_prefix_tokens}; "
                "build the model for this image_size or load with resample_posemb")
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + pos.astype(x.dtype)
        x = self.dropout(x, deterministic=deterministic)
        x = self.encoder(x, None, deterministic=deterministic)
        if self.norm is not None and not c.fc_norm:
            x = self.norm(x)
        tokens = x[:, c.num_prefix_tokens:]
        pooled = x[:, 0] if c.pool == "tok" else jnp.mean(tokens, axis=1)
        if self.norm is not None and c.fc_norm:
            pooled = self.norm(pooled)
        aux: dict[str, Any] = {"hidden": x, "tokens": tokens, "pooled": pooled}
        if self.head is not None:
            aux["pre_logits"] = pooled
            return self.head(pooled).astype(jnp.float32), aux
        return pooled, aux
