"""Fast CPU tests of the NNX models (tiny sizes)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd as core_spmd

from bioscan_jax import sharding
from bioscan_jax.models import kmer_bert as kb
from bioscan_jax.models import layers, text, vit

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _bert_cfg(**kw):
    return kb.get_variant("tiny", **{**TINY, **kw})


def _ids(batch=3, t=20, k=4, seed=0, lengths=(20, 13, 5)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 4**k + 2, (batch, t))
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
    ids = np.where(mask, ids, 1)  # [UNK] beyond the end: must not matter
    ids[0, 3] = 0  # a [MASK] token inside a sequence
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def mlm():
    """One tiny MLM model shared by the tests (clone it before mutating)."""
    return kb.KmerBertForMLM(_bert_cfg(), rngs=nnx.Rngs(0, dropout=1))


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, mask, deterministic=True)


@nnx.jit
def _call(model, *args):
    """Forward in the model's current train/eval mode."""
    return model(*args)


def _small_vit(**kw):
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
    return vit.ViTConfig(**{**base, **kw})


# ------------------------------------------------------------------------------- KmerBert


def test_variants():
    paper = kb.get_variant("paper")
    assert (paper.k, paper.num_layers, paper.num_heads, paper.hidden_size) == (8, 4, 4, 768)
    assert paper.vocab_size == 4**8 + 2 and paper.num_labels == 4**8 and paper.max_tokens == 82
    assert kb.get_variant("4_12_12").num_layers == 12
    b = kb.get_variant("4_4_4")
    assert (b.k, b.num_layers, b.num_heads, b.vocab_size, b.max_tokens) == (4, 4, 4, 258, 165)
    assert kb.get_variant("tiny", k=5).vocab_size == 4**5 + 2
    assert b.replace(k=6).vocab_size == 4**6 + 2 and b.replace(k=6).num_labels == 4**6
    with pytest.raises(ValueError, match="valid variants.*4_4_4"):
        kb.get_variant("huge")
    with pytest.raises(ValueError, match="unknown KmerBertConfig fields"):
        kb.get_variant("tiny", n_layers=3)


def test_mlm_and_classifier_shapes(mlm):
    cfg = _bert_cfg()
    ids, mask = _ids()
    logits, aux = _fwd(mlm, ids, mask)
    assert logits.shape == (3, 20, 4**4) and logits.dtype == jnp.float32
    assert aux["hidden"].shape == (3, 20, 32) and aux["pooled"].shape == (3, 32)
    _, aux_all = nnx.jit(lambda m, i, k: m(i, k, deterministic=True, output_hidden_states=True))(mlm.bert, ids, mask)
    assert len(aux_all["hidden_states"]) == cfg.num_layers
    np.testing.assert_allclose(aux_all["hidden_states"][-1], aux["hidden"], atol=1e-6)


def test_classifier_masked_mean_pooling(mlm):
    cfg = _bert_cfg()
    ids, mask = _ids()
    hidden, aux = _fwd(mlm.bert, ids, mask)
    h, m = np.asarray(hidden), np.asarray(mask)
    for b in range(3):
        np.testing.assert_allclose(aux["pooled"][b], h[b, m[b]].mean(0), rtol=1e-5, atol=1e-6)
    clf = kb.KmerBertClassifier(cfg, 5, rngs=nnx.Rngs(0))
    logits, caux = _fwd(clf, ids, mask)
    assert logits.shape == (3, 5)
    want = caux["pooled"] @ clf.head.kernel[...] + clf.head.bias[...]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_real_tokens(mlm):
    model = mlm
    ids, mask = _ids()
    out1, _ = _fwd(model, ids, mask)
    # different ids in the padded positions
    ids2 = jnp.where(mask, ids, 7)
    out2, _ = _fwd(model, ids2, mask)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out1)[m], np.asarray(out2)[m], atol=1e-5)
    # the same sequence without any padding gives the same outputs
    short, _ = model(ids[1:2, :13], None, deterministic=True)
    np.testing.assert_allclose(np.asarray(out1)[1, :13], np.asarray(short)[0], atol=1e-5)


def test_mask_row_embedding_zero_and_frozen(mlm):
    model = mlm
    table = model.bert.embeddings.word.embedding
    np.testing.assert_array_equal(table[...][0], 0.0)
    assert np.abs(np.asarray(table[...][1:])).sum() > 0
    ids, mask = _ids()
    ids = ids.at[:, ::2].set(0)  # many [MASK] tokens

    def loss_fn(m):
        logits, _ = m(ids, mask, deterministic=True)
        return jnp.mean(logits**2)

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    g = np.asarray(grads["bert"]["embeddings"]["word"]["embedding"][...])
    np.testing.assert_array_equal(g[0], 0.0)
    used = np.unique(np.asarray(ids)[np.asarray(mask)])
    used = used[used != 0]
    assert np.all(np.abs(g[used]).sum(-1) > 0)


def test_dropout_train_vs_eval(mlm):
    model = nnx.clone(mlm)
    ids, mask = _ids()
    model.train()
    a, _ = _call(model, ids, mask)
    b, _ = _call(model, ids, mask)
    assert not np.allclose(a, b)
    model.eval()
    c, _ = _call(model, ids, mask)
    d, _ = _call(model, ids, mask)
    np.testing.assert_array_equal(c, d)
    e, _ = _fwd(model, ids, mask)
    np.testing.assert_allclose(c, e, rtol=1e-6, atol=1e-6)
    model.train()
    f, _ = _fwd(model, ids, mask)  # the call argument wins
    np.testing.assert_array_equal(e, f)


def test_jitted_train_step_with_dropout(mlm):
    import optax

    model = nnx.clone(mlm)
    model.train()
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    ids, mask = _ids()
    labels = jnp.clip(ids - 2, 0)

    @nnx.jit
    def step(model, opt, ids, mask, labels):
        def loss_fn(m):
            logits, _ = m(ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(ce * mask) / jnp.sum(mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, ids, mask, labels)) for _ in range(8)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_array_equal(model.bert.embeddings.word.embedding[...][0], 0.0)


def test_remat_and_bf16(mlm):
    ids, mask = _ids()
    ref = mlm
    rem = kb.KmerBertForMLM(_bert_cfg(remat=True), rngs=nnx.Rngs(0))
    nnx.update(rem, nnx.state(ref, nnx.Param))

    @nnx.jit
    def loss_and_grad(m):
        def loss(m):
            return jnp.mean(m(ids, mask, deterministic=True)[0] ** 2)

        return nnx.value_and_grad(loss)(m)

    (l1, g1), (l2, g2) = loss_and_grad(ref), loss_and_grad(rem)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    k1 = g1["bert"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"][...]
    k2 = g2["bert"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"][...]
    np.testing.assert_allclose(k1, k2, rtol=1e-4, atol=1e-7)
    bf = kb.KmerBertForMLM(_bert_cfg(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    nnx.update(bf, nnx.state(ref, nnx.Param))
    out, aux = _fwd(bf, ids, mask)
    assert out.dtype == jnp.float32 and aux["hidden"].dtype == jnp.bfloat16
    assert bf.bert.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(out, _fwd(ref, ids, mask)[0], atol=0.1)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_matches_the_unrolled_stack(mlm, remat):
    ids, mask = _ids()
    scanned = kb.KmerBertForMLM(_bert_cfg(scan_layers=True, remat=remat), rngs=nnx.Rngs(7))
    fc1 = nnx.state(scanned, nnx.Param)["bert"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1[...].shape == (2, 32, 64) and fc1.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    layers.copy_layers(mlm.bert.encoder, scanned.bert.encoder)
    nnx.update(scanned.bert.embeddings, nnx.state(mlm.bert.embeddings, nnx.Param))  # outside the blocks
    nnx.update(scanned.classifier, nnx.state(mlm.classifier, nnx.Param))

    @nnx.jit
    def loss_and_grad(m):
        def loss(m):
            return jnp.mean(m(ids, mask, deterministic=True)[0] ** 2)

        return nnx.value_and_grad(loss)(m)

    (l1, g1), (l2, g2) = loss_and_grad(mlm), loss_and_grad(scanned)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    unrolled = g1["bert"]["encoder"]["layers"][1]["mlp"]["fc1"]["kernel"][...]
    stacked = g2["bert"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"][...][1]
    np.testing.assert_allclose(stacked, unrolled, rtol=1e-4, atol=1e-7)
    hidden = scanned.bert(ids, mask, deterministic=True, output_hidden_states=True)[1]["hidden_states"]
    ref_hidden = mlm.bert(ids, mask, deterministic=True, output_hidden_states=True)[1]["hidden_states"]
    assert len(hidden) == len(ref_hidden) == 2
    for h, r in zip(hidden, ref_hidden):
        np.testing.assert_allclose(h, r, rtol=1e-5, atol=1e-5)
    back = kb.KmerBertForMLM(_bert_cfg(), rngs=nnx.Rngs(3))
    layers.copy_layers(scanned.bert.encoder, back.bert.encoder)  # and back to the unrolled layout
    for a, b in zip(layers.layer_params(back.bert.encoder), layers.layer_params(mlm.bert.encoder)):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    from bioscan_jax.convert import hf_bert

    with pytest.raises(hf_bert.ConversionError, match="scan_layers=True"):
        hf_bert.export_hf_bert(scanned)
    with pytest.raises(ValueError, match="drop_path=0"):
        layers.Encoder(layers.BlockConfig(dim=8, num_heads=2, mlp_dim=16), 2, drop_path=0.1, scan=True,
                       rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- sharding names


def _all_params(model):
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: kb.KmerBertClassifier(_bert_cfg(), 3, rngs=nnx.Rngs(0)),
        lambda: nnx.eval_shape(lambda: kb.KmerBertForMLM(_bert_cfg(), rngs=nnx.Rngs(0))),
        lambda: nnx.eval_shape(lambda: vit.ViT(_small_vit(num_classes=5), rngs=nnx.Rngs(0))),
        lambda: nnx.eval_shape(lambda: text.TextEncoder(text.get_variant("tiny"), rngs=nnx.Rngs(0))),
    ],
    ids=["classifier", "mlm", "vit", "text"],
)
def test_logical_axis_names(make):
    model = make()
    allowed = set(layers.LOGICAL_AXIS_NAMES) | {None}
    params = _all_params(model)
    assert params
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None, path
        assert len(names) == len(var.shape), (path, names)
        assert set(names) <= allowed, (path, names)
    # every name maps to a mesh axis (or None) under the default rules
    with core_spmd.logical_axis_rules(sharding.DEFAULT_SHARDING_RULES):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    for _, spec in nnx.to_flat_state(specs):
        assert set(spec.get_value()) <= {None, "fsdp", "tensor"}


def test_key_axis_names(mlm):
    model = mlm
    blk = model.bert.encoder.layers[0]
    meta = lambda v: tuple(v.get_metadata()["out_sharding"])  # noqa: E731
    assert meta(blk.mlp.fc1.kernel) == ("embed", "mlp")
    assert meta(blk.mlp.fc2.kernel) == ("mlp", "embed")
    assert meta(blk.attn.qkv.kernel) == ("embed", None, "heads", "kv")
    assert meta(blk.attn.out.kernel) == ("heads", "kv", "embed")
    assert meta(model.bert.embeddings.word.embedding) == ("vocab", "embed")
    assert meta(model.bert.embeddings.position.embedding) == (None, "embed")
    assert meta(model.classifier.kernel) == ("embed", "vocab")


def test_eager_sharding_under_mesh_and_rules(mlm):
    assert mlm.classifier.kernel.get_metadata()["eager_sharding"] is False  # no mesh: metadata only
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), core_spmd.logical_axis_rules(sharding.DEFAULT_SHARDING_RULES):
        model = nnx.jit(lambda: kb.KmerBertClassifier(_bert_cfg(), 3, rngs=nnx.Rngs(0)))()
        spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    k = model.bert.encoder.layers[0].mlp.fc1.kernel
    assert k.get_metadata()["eager_sharding"] is True
    assert isinstance(k[...].sharding, jax.sharding.NamedSharding)
    assert tuple(spec["bert"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"].get_value()) == ("fsdp", "tensor")


# ------------------------------------------------------------------------------- ViT


def test_vit_variants():
    b16 = vit.get_variant("B/16")
    assert (b16.hidden_size, b16.num_layers, b16.num_heads, b16.mlp_dim, b16.patch_size) == (768, 12, 12, 3072, 16)
    assert vit.get_variant("L/16").num_layers == 24 and vit.get_variant("B/32").patch_size == 32
    assert vit.get_variant("Ti/16").hidden_size == 192 and vit.get_variant("S/16").num_heads == 6
    with pytest.raises(ValueError, match="valid variants"):
        vit.get_variant("X/16")
    with pytest.raises(ValueError, match="pool"):
        vit.ViTConfig(pool="max")


def test_vit_shapes_and_pooling():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    m = vit.ViT(_small_vit(), rngs=nnx.Rngs(0))
    m.eval()
    feat, aux = _call(m, x)
    assert feat.shape == (2, 32) and aux["tokens"].shape == (2, 16, 32) and aux["hidden"].shape == (2, 17, 32)
    np.testing.assert_array_equal(feat, aux["hidden"][:, 0])
    g = vit.ViT(_small_vit(pool="gap"), rngs=nnx.Rngs(0))
    g.eval()
    assert g.cls is None and g.pos_embedding[...].shape == (1, 16, 32)
    feat, aux = _call(g, x)
    np.testing.assert_allclose(feat, aux["tokens"].mean(1), rtol=1e-5, atol=1e-6)
    h = vit.ViT(_small_vit(num_classes=10, drop_path_rate=0.1, dropout_rate=0.1), rngs=nnx.Rngs(0))
    h.train()
    y1, _ = _call(h, x)
    h.eval()
    logits, aux = _call(h, x)
    assert logits.shape == (2, 10) and aux["pre_logits"].shape == (2, 32)
    y3, _ = _call(h, x)
    np.testing.assert_array_equal(logits, y3)
    with pytest.raises(ValueError, match="position embedding"):
        m(jnp.zeros((1, 48, 48, 3)))


def test_dropout_statistics():
    d = layers.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 33, 17))  # odd element count
    y = np.asarray(d(x))
    frac = (y == 0).mean()
    assert abs(frac - 0.1) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / (1 - 6554 / 65536), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.02
    assert not np.array_equal(y, np.asarray(d(x)))  # a fresh key per call
    np.testing.assert_array_equal(d(x, deterministic=True), x)
    np.testing.assert_array_equal(layers.Dropout(1.0, rngs=nnx.Rngs(0))(x), 0.0)


def test_dropout_mask_bits_are_uniform_and_independent():
    words = np.asarray(layers.counter_bits(jax.random.key(3), 1 << 18)).astype(np.uint64)
    bits = (words[:, None] >> np.arange(32, dtype=np.uint64)) & 1
    np.testing.assert_allclose(bits.mean(0), 0.5, atol=0.005)  # every bit position fair
    keep, _ = layers.keep_mask(jax.random.key(4), (512, 512), 0.1)
    k = np.asarray(keep, np.float64)
    for a, b in ((k[:, 1:], k[:, :-1]), (k[1:], k[:-1])):  # neighbours along both axes
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    other, _ = layers.keep_mask(jax.random.key(5), (512, 512), 0.1)
    assert abs(np.corrcoef(k.ravel(), np.asarray(other, np.float64).ravel())[0, 1]) < 0.01
    assert abs(1 - k.mean() - 0.1) < 0.002


def test_droppath():
    dp = layers.DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 3, 2))
    y = dp(x)
    per_example = np.asarray(y[:, 0, 0])
    assert set(np.unique(per_example)) <= {0.0, 2.0} and 0 < (per_example == 0).sum() < 64
    np.testing.assert_array_equal(dp(x, deterministic=True), x)


def test_resample_posemb():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + 16, 8)), jnp.float32)
    same = vit.resample_posemb(pos, (4, 4), num_prefix_tokens=1)
    np.testing.assert_array_equal(same, pos)
    bigger = vit.resample_posemb(pos, (6, 6), num_prefix_tokens=1)
    assert bigger.shape == (1, 37, 8)
    np.testing.assert_array_equal(bigger[:, 0], pos[:, 0])
    const = jnp.ones((1, 9, 3))
    np.testing.assert_allclose(vit.resample_posemb(const, (5, 7)), jnp.ones((1, 35, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        vit.resample_posemb(jnp.ones((1, 10, 3)), (4, 4))


# ------------------------------------------------------------------------------- text tower


def test_text_encoder():
    cfg = text.get_variant("tiny")
    m = text.TextEncoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 20)), jnp.int32)
    mask = jnp.arange(20)[None] < jnp.array([[20], [6]])
    pooled, aux = _fwd(m, ids, mask)
    assert pooled.shape == (2, cfg.hidden_size) and aux["hidden"].shape == (2, 20, cfg.hidden_size)
    small = text.get_variant("bert-small")
    assert (small.num_layers, small.hidden_size, small.num_heads, small.intermediate_size) == (4, 512, 8, 2048)
    with pytest.raises(ValueError, match="valid variants"):
        text.get_variant("bert-huge")


def test_attention_impl_xla_matches_einsum(mlm):
    ids, mask = _ids()
    fused = kb.KmerBertForMLM(_bert_cfg(attention_impl="xla"), rngs=nnx.Rngs(0))
    nnx.update(fused, nnx.state(mlm, nnx.Param))
    a, _ = _fwd(mlm, ids, mask)
    b, _ = _fwd(fused, ids, mask)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl"):
        layers.MultiHeadAttention(8, 2, attention_impl="flash", rngs=nnx.Rngs(0))


def test_config_is_frozen():
    cfg = _bert_cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 5
