"""Tests of the CLIBD contrastive loss: numpy reference, chunked == dense, global negatives."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jax.test_util as jax_test_util
import numpy as np
import pytest

from bioscan_jax.train.contrastive import INIT_LOG_SCALE, contrastive_loss, positive_groups

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODALITIES = ("image", "dna", "text")


def _features(batch: int, dim: int = 8, names=MODALITIES, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        x = rng.normal(size=(batch, dim))
        out[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def reference_loss(features, log_scale, labels=None):
    """Direct float64 numpy: for every ordered pair, CE of rows against (soft) targets."""
    names = list(features)
    batch = len(features[names[0]])
    if labels is None:
        pos = np.eye(batch, dtype=bool)
    else:
        labels = np.asarray(labels)
        pos = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
        pos |= np.eye(batch, dtype=bool)
    target = pos / pos.sum(axis=1, keepdims=True)
    scale = np.exp(np.float64(log_scale))
    terms = {}
    for x, y in itertools.permutations(names, 2):
        logits = scale * features[x].astype(np.float64) @ features[y].astype(np.float64).T
        terms[x, y] = -np.mean(np.sum(target * _log_softmax(logits, axis=1), axis=1))
        # The (y, x) term is the column-wise cross-entropy of the same matrix.
        if (y, x) in terms:
            col = -np.mean(np.sum(target.T * _log_softmax(logits, axis=0).T, axis=1))
            np.testing.assert_allclose(col, terms[y, x], rtol=1e-10)
    return float(np.mean(list(terms.values()))), terms


LABELS = np.array([0, 1, 0, 2, -1, 1, 1, 3, -1, 0, 4, 2], dtype=np.int32)


@pytest.mark.parametrize("labels", [None, LABELS], ids=["identity", "label-positive"])
@pytest.mark.parametrize("names", [MODALITIES, ("image", "dna")], ids=["IDT", "ID"])
def test_dense_matches_numpy(labels, names):
    feats = _features(12, names=names)
    loss, metrics = contrastive_loss(feats, 2.3, labels=labels)
    ref, terms = reference_loss(feats, 2.3, labels)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for (x, y), value in terms.items():
        np.testing.assert_allclose(metrics[f"loss/{x}_to_{y}"], value, rtol=1e-5)
    assert len([k for k in metrics if k.startswith("loss/")]) == len(names) * (len(names) - 1)
    np.testing.assert_allclose(metrics["logit_scale"], np.exp(2.3), rtol=1e-6)


@pytest.mark.parametrize("labels", [None, LABELS], ids=["identity", "label-positive"])
def test_accuracy_is_top1_of_rows(labels):
    feats = _features(12, names=("image", "dna"))
    _, metrics = contrastive_loss(feats, 1.0, labels=labels)
    logits = feats["image"] @ feats["dna"].T
    groups = np.asarray(positive_groups(labels, 12))
    pos = groups[:, None] == groups[None, :]
    expect_rows = pos[np.arange(12), logits.argmax(1)].mean()
    expect_cols = pos[logits.argmax(0), np.arange(12)].mean()
    np.testing.assert_allclose(metrics["acc/image_to_dna"], expect_rows)
    np.testing.assert_allclose(metrics["acc/dna_to_image"], expect_cols)


def test_perfect_alignment():
    feats = _features(16, dim=32, names=("image",))
    feats = {"image": feats["image"], "dna": feats["image"]}
    loss, metrics = contrastive_loss(feats, np.log(100.0))
    assert metrics["acc/image_to_dna"] == 1.0 and metrics["acc/dna_to_image"] == 1.0
    assert loss < 0.5


def test_label_positive_edge_cases():
    feats = _features(12)
    base = contrastive_loss(feats, INIT_LOG_SCALE)[0]
    # All-missing or all-distinct labels are the identity targets.
    np.testing.assert_allclose(contrastive_loss(feats, INIT_LOG_SCALE, labels=np.full(12, -1))[0], base, rtol=1e-6)
    np.testing.assert_allclose(contrastive_loss(feats, INIT_LOG_SCALE, labels=np.arange(12) + 7)[0], base, rtol=1e-6)
    groups = np.asarray(positive_groups(np.array([3, -1, 3, -1]), 4))
    assert groups[0] == groups[2] and len({groups[1], groups[3], groups[0]}) == 3


@pytest.mark.parametrize("labels", [None, LABELS], ids=["identity", "label-positive"])
def test_chunked_equals_dense_value_and_grad(labels):
    def loss_fn(f, log_scale, chunk_size):
        return contrastive_loss(f, log_scale, labels=labels, chunk_size=chunk_size)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), static_argnums=2)
    # Block sizes: dividing the batch, ragged last block, one block, larger than the batch.
    cases = [(MODALITIES, 4), (("image", "dna"), 5), (("image", "dna"), 12), (("image", "dna"), 64)]
    dense_cache = {}
    for names, chunk in cases:
        feats = {k: jnp.asarray(v) for k, v in _features(12, dim=6, names=names).items()}
        if names not in dense_cache:
            dense_cache[names] = grad_fn(feats, jnp.float32(INIT_LOG_SCALE), None)
        (dense, dense_m), (dense_gf, dense_gs) = dense_cache[names]
        (chunked, chunked_m), (chunked_gf, chunked_gs) = grad_fn(feats, jnp.float32(INIT_LOG_SCALE), chunk)
        np.testing.assert_allclose(chunked, dense, atol=1e-5)
        np.testing.assert_allclose(chunked_gs, dense_gs, atol=1e-5)
        for name in feats:
            np.testing.assert_allclose(chunked_gf[name], dense_gf[name], atol=1e-5)
        for key in dense_m:
            np.testing.assert_allclose(chunked_m[key], dense_m[key], atol=1e-5, err_msg=key)


def test_chunked_grad_matches_numerical_gradient():
    with jax.enable_x64():
        feats = {k: jnp.asarray(v, jnp.float64) for k, v in _features(6, dim=3, names=("image", "dna")).items()}
        log_scale = jnp.asarray(1.5, jnp.float64)
        jax_test_util.check_grads(
            jax.jit(lambda f, s: contrastive_loss(f, s, labels=LABELS[:6], chunk_size=4)[0]),
            (feats, log_scale),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
        )


def test_bfloat16_features_keep_their_dtype():
    feats = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _features(8).items()}
    for chunk in (None, 3):
        grads = jax.jit(jax.grad(lambda f: contrastive_loss(f, 2.0, chunk_size=chunk)[0]))(feats)
        assert all(g.dtype == jnp.bfloat16 for g in grads.values())


def test_scale_options():
    feats = _features(8, names=("image", "dna"))
    for trainable in (False, True):
        grad_ls = jax.jit(jax.grad(lambda s: contrastive_loss(feats, s, trainable_scale=trainable)[0]))(2.0)
        assert (grad_ls != 0.0) == trainable
    _, metrics = contrastive_loss(feats, np.log(500.0), max_scale=100.0)
    np.testing.assert_allclose(metrics["logit_scale"], 100.0, rtol=1e-5)
    _, metrics = contrastive_loss(feats, np.log(500.0))  # no clamp by default
    np.testing.assert_allclose(metrics["logit_scale"], 500.0, rtol=1e-5)


def test_disabled_modalities_and_bad_input():
    feats = _features(8)
    with_none = dict(feats, text=None)
    loss, metrics = contrastive_loss(with_none, 2.0)
    np.testing.assert_allclose(loss, contrastive_loss({k: feats[k] for k in ("image", "dna")}, 2.0)[0])
    assert not any("text" in k for k in metrics)
    with pytest.raises(ValueError, match="at least two"):
        contrastive_loss({"image": feats["image"], "dna": None}, 2.0)
    with pytest.raises(ValueError, match="one shape"):
        contrastive_loss({"image": feats["image"], "dna": feats["dna"][:4]}, 2.0)
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(feats, 2.0, labels=np.zeros(3, np.int32))


def test_chunked_memory_is_linear_in_batch():
    """Compiled temp memory of value+grad: chunked grows ~linearly, dense quadratically."""

    def temp_bytes(batch, chunk):
        shapes = {m: jax.ShapeDtypeStruct((batch, 32), jnp.float32) for m in ("image", "dna")}
        fn = jax.jit(jax.value_and_grad(lambda f, s: contrastive_loss(f, s, chunk_size=chunk)[0], argnums=(0, 1)))
        analysis = fn.lower(shapes, jax.ShapeDtypeStruct((), jnp.float32)).compile().memory_analysis()
        if analysis is None:
            pytest.skip("no memory analysis on this backend")
        return analysis.temp_size_in_bytes

    chunked_ratio = temp_bytes(2048, 64) / temp_bytes(512, 64)
    dense_ratio = temp_bytes(2048, None) / temp_bytes(512, None)
    assert chunked_ratio < 6, chunked_ratio
    assert dense_ratio > 12, dense_ratio


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bioscan_jax.train.contrastive import contrastive_loss

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    B, D = 64, 16
    feats = {}
    for m in ("image", "dna", "text"):
        x = rng.normal(size=(B, D)).astype(np.float32)
        feats[m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(-1, 10, size=B).astype(np.int32)
    log_scale = np.float32(np.log(1 / 0.07))

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    row, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    out = {}
    for name, lab, chunk in (("identity", None, None), ("labels-chunked", labels, 16)):
        def loss_fn(f, s, l):
            return contrastive_loss(f, s, labels=l, chunk_size=chunk)[0]
        vg = jax.value_and_grad(loss_fn, argnums=(0, 1))
        lab_sh = None if lab is None else jax.device_put(lab, row)
        f_sh = {m: jax.device_put(v, row) for m, v in feats.items()}
        assert len(f_sh["image"].sharding.device_set) == 8
        sharded_fn = jax.jit(vg, in_shardings=({m: row for m in feats}, rep, None if lab is None else row))
        v_sh, (g_sh, gs_sh) = sharded_fn(f_sh, log_scale, lab_sh)
        dev0 = jax.devices()[0]
        put0 = lambda x: None if x is None else jax.device_put(x, dev0)
        v_one, (g_one, gs_one) = jax.jit(vg)({m: put0(v) for m, v in feats.items()}, put0(log_scale), put0(lab))
        # Per-shard ("local negatives") loss: what one would get without the global batch.
        shards = {m: v.reshape(8, B // 8, D) for m, v in feats.items()}
        lab_shards = None if lab is None else lab.reshape(8, B // 8)
        local = jax.jit(jax.vmap(loss_fn, in_axes=(0, None, None if lab is None else 0)))(
            shards, log_scale, lab_shards)
        out[name] = dict(
            sharded=float(v_sh), single=float(v_one), local=float(np.mean(local)),
            grad_diff=max(float(np.abs(np.asarray(g_sh[m]) - np.asarray(g_one[m])).max()) for m in feats),
            scale_grad_diff=abs(float(gs_sh) - float(gs_one)),
            grad_devices=len(g_sh["image"].sharding.device_set),
        )
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_loss_uses_global_negatives():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for name, r in results.items():
        assert abs(r["sharded"] - r["single"]) < 1e-5, (name, r)
        assert r["grad_diff"] < 1e-5 and r["scale_grad_diff"] < 1e-4, (name, r)
        assert abs(r["sharded"] - r["local"]) > 0.1, (name, r)  # not the per-shard loss
        assert r["grad_devices"] == 8, (name, r)  # gradients stay sharded
