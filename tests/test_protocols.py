"""The reference protocols (docs/protocols.md), each checked against the reference's own rule
written out here independently of our code path.

References (bare-repo paths as in the docs): BarcodeBERT BIOSCAN-5M branch ``data/data_split.py``,
``barcodebert/datasets.py``, ``barcodebert/finetuning.py``, ``baselines/linear_probing.py``;
zs-ssl-clustering BIOSCAN-5M branch ``zs_ssl_clustering/io.py``; bioscan-dataset
``bioscan_dataset/bioscan5m.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from etils import epath

from bioscan_jax.data import dna, schema
from bioscan_jax.eval import probes
from bioscan_jax.models import kmer_bert
from bioscan_jax.tasks.barcodebert import task as barcodebert_task
from configs import barcodebert as barcodebert_config
from configs import zsc as zsc_config
from tfds_builder.bioscan5m import make_dummy_data

from _references import bioscan5m_tokens  # noqa: E402

REPO_ROOT = epath.Path(__file__).resolve().parents[1]
DUMMY_CSV = epath.Path(make_dummy_data.DUMMY_DIR) / schema.METADATA_RELPATH


# ----------------------------------------------------------------------------- data_split.py


def reference_data_split(df: pd.DataFrame) -> dict[str, list[str]]:
    """BarcodeBERT ``data/data_split.py::split_df`` (BIOSCAN-5M branch), its own steps: rename to
    ``nucleotides``, ``str.rstrip("N")``, ``drop_duplicates(subset=["nucleotides"])`` over the
    whole frame, then the sets by split value. Returns the processids of each set."""
    df = df.rename(columns={"dna_barcode": "nucleotides"}).copy()
    df["nucleotides"] = df["nucleotides"].str.rstrip("N")
    df = df.drop_duplicates(subset=["nucleotides"])
    return {
        "pretrain": df[df["split"].isin(["pretrain", "other_heldout"])]["processid"].tolist(),
        "train": df[df["split"] == "train"]["processid"].tolist(),
        "test": df[df["split"].isin(["test", "test_seen"])]["processid"].tolist(),
        "unseen": df[df["split"] == "test_unseen"]["processid"].tolist(),
    }


def _crafted_csv(tmp_path) -> tuple[epath.Path, pd.DataFrame]:
    """The dummy metadata with duplicated barcodes: exact repeats within a split, repeats that
    differ only in trailing N, a repeat across splits, and a missing barcode twice (a second
    missing one is a duplicate of the first, as pandas' drop_duplicates treats NaN)."""
    root = epath.Path(tmp_path) / "src"
    (root / "bioscan5m/metadata/csv").mkdir(parents=True)
    df = pd.read_csv(DUMMY_CSV, dtype=str, keep_default_na=False)
    by_split = {s: df.index[df["split"] == s].tolist() for s in schema.SPLITS}
    bc = df["dna_barcode"]
    a, b = by_split["train"]
    df.loc[b, "dna_barcode"] = bc[a] + "NNNN"                 # train duplicate after rstrip('N')
    p, q = by_split["pretrain"]
    df.loc[q, "dna_barcode"] = bc[p]                          # exact duplicate in pretrain
    t = by_split["test"][0]
    df.loc[t, "dna_barcode"] = bc[a] + "N"                    # across splits: train's barcode in test
    u = by_split["test_unseen"][0]
    df.loc[u, "dna_barcode"] = ""                             # a missing barcode
    k = by_split["key_unseen"][0]
    df.loc[k, "dna_barcode"] = "NA"                           # pandas' default NA string: missing
    df.to_csv(root / schema.METADATA_RELPATH, index=False)
    return root, pd.read_csv(root / schema.METADATA_RELPATH, dtype=str)


def test_first_of_barcode_keeps_what_data_split_keeps(tmp_path):
    _, df = _crafted_csv(tmp_path)
    ours = df[schema.first_of_barcode(df["dna_barcode"])]["processid"].tolist()
    ref = df.rename(columns={"dna_barcode": "nucleotides"})
    ref["nucleotides"] = ref["nucleotides"].str.rstrip("N")
    assert ours == ref.drop_duplicates(subset=["nucleotides"])["processid"].tolist()
    assert len(ours) == len(df) - 4  # b, q, t, and the second missing barcode


def test_barcodebert_sets_from_the_built_dataset_are_the_references(tmp_path):
    """Item 1: the fine-tuning train/test sets, 1-NN keys (train) and queries (test_unseen) and the
    pretraining set the task evaluates on are exactly data_split.py's, record for record."""
    root, df = _crafted_csv(tmp_path)
    want = reference_data_split(df)
    config = barcodebert_config.get_config("tiny")
    config.data.builder_config = "dna"
    config.data.manual_dir, config.data.data_dir = str(root), str(tmp_path / "tfds")
    config.data.pretrain_split = "pretrain+other_heldout"
    config.data.verify_md5 = False  # an edited copy of the official file name
    config.data.probe_query_split = "test_unseen"  # the reference's queries (tiny takes all unseen records)
    data = barcodebert_task.open_data(config)
    d = config.data
    got = {role: sorted(str(data[split][i]["processid"]) for i in range(len(data[split])))
           for role, split in (("pretrain", d.pretrain_split), ("train", d.finetune_split),
                               ("test", d.test_split), ("unseen", d.probe_query_split))}
    assert got == {role: sorted(pids) for role, pids in want.items()}
    assert data.sizes["train"] == {"records": 2, "used": 1} and data.sizes["test"] == {"records": 2, "used": 1}
    sets = barcodebert_task.evaluated_sets(config, data)
    assert sets["knn_queries"] == {"split": "test_unseen", "records": len(want["unseen"])}
    assert sets["knn_keys"]["records"] == len(want["train"])


def test_pandas_default_na_strings_are_missing_as_bioscan_dataset_reads_them(tmp_path):
    """Item 9: bioscan-dataset's load_bioscan5m_metadata calls pandas.read_csv without
    keep_default_na=False, so "NA" (and "", "N/A", "null", ...) is missing."""
    root, _ = _crafted_csv(tmp_path)
    ours = schema.read_metadata(root / schema.METADATA_RELPATH)
    ref = pd.read_csv(root / schema.METADATA_RELPATH, dtype={"chunk": str})
    assert ours["dna_barcode"].isna().tolist() == ref["dna_barcode"].isna().tolist()
    assert int(ours["dna_barcode"].isna().sum()) == 2


# ----------------------------------------------------------------------------- tokenisation


def test_trailing_n_are_padding_and_gaps_keep_the_frame_as_the_reference(real_barcodes_path):
    """Items 2 and 9 on real barcodes with trailing N, internal gaps and N added."""
    frame = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    seqs = [s.upper() for s in frame["nucleotides"].head(40)]
    seqs = [s + "N" * (i % 7) for i, s in enumerate(seqs)]
    seqs[3] = seqs[3][:100] + "-" + seqs[3][101:]
    seqs[4] = seqs[4][:50] + "..N" + seqs[4][53:]
    for k in (4, 5, 8):
        tok = dna.KmerTokenizer(k, strip_trailing_n=True)
        ids, mask = tok(seqs)
        for i, s in enumerate(seqs):
            ref_ids, ref_mask = bioscan5m_tokens(s, k)
            assert ids[i].tolist() == ref_ids, (k, i)
            assert mask[i].astype(int).tolist() == ref_mask, (k, i)


def test_every_barcodebert_stage_strips_trailing_n():
    for variant in barcodebert_config.VARIANTS:
        c = barcodebert_config.get_config(variant)
        assert c.model.tokenization == "bioscan5m" and c.data.dedup_barcodes, variant
    assert zsc_config.get_config("paper").barcodebert.dedup_barcodes
    assert zsc_config.get_config("paper").barcodebert.model.tokenization == "bioscan5m"


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_standardises_with_one_scalar_over_the_training_matrix():
    """Item 3: baselines/linear_probing.py: ``mean = X.mean(); std = X.std()`` over the whole
    training matrix, applied to train and test; the head folds it in."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(120, 5)).astype(np.float32) * np.array([1, 10, 0.1, 5, 2], np.float32) + 3
    y = rng.integers(0, 4, 120)
    w0 = rng.normal(0, 0.1, size=(5, 4)).astype(np.float32)
    b0 = np.zeros(4, np.float32)
    head = probes.fit_linear_reference(x, y, num_classes=6, epochs=0, init=(w0, b0))
    xs = (x - x.mean()) / x.std()  # the reference's scalars, numpy ddof 0
    np.testing.assert_allclose(x @ head.kernel[:, :4] + head.bias[:4], xs @ w0 + b0, rtol=1e-4, atol=1e-4)
    assert (head.bias[4:] == probes.ABSENT_CLASS_BIAS).all()  # classes not in y: never predicted


@pytest.mark.torch
def test_linear_probe_follows_the_torch_sgd_trajectory():
    """Item 3: torch.nn.Linear + SGD(lr 0.01, momentum 0.9, weight_decay 1e-5), cross-entropy,
    DataLoader(batch 64, shuffle) with the last partial batch, classes = sorted(set(y_train))."""
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(2, 3, size=(150, 6)).astype(np.float32)
    y = rng.choice([0, 2, 5], size=150)
    head, trajectory = probes.fit_linear_reference(x, y, num_classes=7, epochs=2, seed=3, return_trajectory=True)
    xs = (x - x.mean()) / x.std()
    label_set = sorted(set(y.tolist()))
    y_local = np.array([label_set.index(v) for v in y])
    w0, b0 = probes.torch_linear_init(6, 3, 3)
    clf = torch.nn.Linear(6, 3)
    with torch.no_grad():
        clf.weight.copy_(torch.from_numpy(w0.T.copy()))
        clf.bias.copy_(torch.from_numpy(b0))
    opt = torch.optim.SGD(clf.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    order = np.random.default_rng(3)
    ref_trajectory = []
    for epoch in range(2):
        for batch in probes.epoch_batches(150, 64, order):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(torch.from_numpy(xs[batch])), torch.from_numpy(y_local[batch])).backward()
            opt.step()
            if epoch == 0:
                ref_trajectory.append(clf.weight.detach().numpy().T.copy())
    assert len(trajectory) == len(ref_trajectory) == 3  # 64 + 64 + 22
    for ours, ref in zip(trajectory, ref_trajectory):
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    scores = clf(torch.from_numpy((x - x.mean()) / x.std())).detach().numpy()
    np.testing.assert_array_equal(head.predict(x), np.asarray(label_set)[scores.argmax(1)])


# ----------------------------------------------------------------------------- OneCycle


@pytest.mark.torch
def test_onecycle_lr_and_momentum_match_torch_onecycle_over_100_steps():
    """Item 4: torch OneCycleLR(max_lr, total_steps, pct_start=0.3, anneal 'cos',
    cycle_momentum=True, base 0.85, max 0.95) on AdamW; our lr schedule and beta1, and the AdamW
    trajectory that uses them."""
    import jax.numpy as jnp
    import optax
    import torch

    from bioscan_jax.train import optim

    total, peak = 100, 3e-3
    cfg = dict(lr=peak, lr_ref_batch=0, schedule="onecycle", warmup_frac=0.3, cycle_momentum=True,
               base_momentum=0.85, max_momentum=0.95, weight_decay=0.01)
    tx, schedule = optim.make_optimizer(cfg, total_steps=total, global_batch=64)
    momentum = optim.onecycle(total, start=0.95, peak=0.85, end=0.95, pct_start=0.3)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = rng.normal(size=(total, 4, 3)).astype(np.float32)

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=peak, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total, pct_start=0.3)
    params = jnp.asarray(w0)
    state = tx.init(params)
    for step in range(total):
        group = opt.param_groups[0]
        assert float(schedule(step)) == pytest.approx(group["lr"], abs=1e-6 * peak), step
        assert float(momentum(step)) == pytest.approx(group["betas"][0], abs=1e-6), step
        p.grad = torch.from_numpy(grads[step].copy())
        opt.step()
        sched.step()
        updates, state = tx.update(jnp.asarray(grads[step]), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), p.detach().numpy(), atol=1e-5)


def test_barcodebert_cycles_momentum_and_clibd_does_not():
    from configs import clibd as clibd_config

    for variant in barcodebert_config.VARIANTS:
        c = barcodebert_config.get_config(variant)
        assert c.pretrain.optim.cycle_momentum and c.finetune.optim.cycle_momentum, variant
    assert not clibd_config.get_config("paper").optim.get("cycle_momentum", False)


# ----------------------------------------------------------------------------- fine-tuning pooling


def test_finetuning_pooling_mean_includes_padding_masked_mean_does_not():
    """Item 5: finetuning.py ClassificationModel: ``hidden_states[-1].mean(1)`` (padding in)."""
    from flax import nnx

    cfg = kmer_bert.get_variant("tiny", dropout_rate=0.0, attention_dropout_rate=0.0)
    ref = kmer_bert.KmerBertClassifier(cfg, 3, pooling="mean", rngs=nnx.Rngs(0))
    masked = kmer_bert.KmerBertClassifier(cfg, 3, pooling="masked_mean", rngs=nnx.Rngs(0))
    ids, mask = dna.KmerTokenizer(4, strip_trailing_n=True)(["ACGT" * 40 + "N" * 200])
    logits, aux = ref(ids, mask, deterministic=True)
    hidden = np.asarray(aux["hidden"])
    head = np.asarray(ref.head.kernel[...]), np.asarray(ref.head.bias[...])
    np.testing.assert_allclose(np.asarray(logits), hidden.mean(1) @ head[0] + head[1], atol=1e-5)
    m = mask[..., None].astype(np.float32)
    np.testing.assert_allclose(np.asarray(masked(ids, mask, deterministic=True)[0]),
                               (hidden * m).sum(1) / m.sum(1) @ head[0] + head[1], atol=1e-5)
    assert not np.allclose(np.asarray(logits), np.asarray(masked(ids, mask, deterministic=True)[0]))
    with pytest.raises(ValueError, match="pooling"):
        kmer_bert.KmerBertClassifier(cfg, 3, pooling="cls", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- docs/protocols.md


def _protocol_rows() -> list[tuple[str, str, str]]:
    """(config, key, value) of every `` `task:paper:key = value` `` cell of docs/protocols.md."""
    text = (REPO_ROOT / "docs" / "protocols.md").read_text()
    return re.findall(r"`(barcodebert|clibd|zsc):paper:([\w.]+) = ([^`]+)`", text)


def test_protocol_table_and_paper_configs_agree():
    """Item 10: every `config:paper:key = value` cell of docs/protocols.md is the paper config."""
    import ast

    from configs import clibd as clibd_config

    getters = {"barcodebert": barcodebert_config, "clibd": clibd_config, "zsc": zsc_config}
    rows = _protocol_rows()
    assert len(rows) >= 30 and {r[0] for r in rows} == {"barcodebert", "clibd", "zsc"}
    for name, key, value in rows:
        c = getters[name].get_config("paper")
        for part in key.split("."):
            c = c[part]
        assert c == ast.literal_eval(value.strip()), f"{name}:paper:{key} is {c!r}, docs/protocols.md says {value}"
