"""Evaluators during training: the loop's cadence and records, KeepBest, and the BarcodeBERT
fine-tune stage's per-epoch validation accuracy and ``finetune.select``."""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import _train_tiny as T
from bioscan_jax.eval import evaluators
from bioscan_jax.train import loop
from bioscan_jax.checkpoint import restore_params
from bioscan_jax.train.metrics import read_metrics

BATCH = 8


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


class Recorder:
    """Records the steps it ran at and the model's mode; returns scripted scores (or the step)."""

    def __init__(self, scores=None):
        self.steps: list[int] = []
        self.deterministic: list[bool] = []
        self.scores = scores or {}

    def run(self, model, step):
        self.steps.append(step)
        self.deterministic.append(bool(model.dropout.deterministic))
        logits, _ = model(np.zeros((2, T.SEQ), np.int32))  # a forward pass through the dropout layer
        return {"val/score": self.scores.get(step, float(step)), "val/logit_mean": float(logits.mean())}


def _train(tmp_path, evaluators_=(), *, steps, steps_per_epoch=None, eval_every=0, dropout=0.0, **checkpoint):
    c = T.tiny_config(steps=steps, batch_size=BATCH, eval_every=eval_every, tensorboard=False)
    c.checkpoint.update(checkpoint)
    return loop.train(c, tmp_path, model_factory=T.model_factory(dropout), loss_fn=T.loss_fn,
                      data_iter_factory=T.data_iter_factory(BATCH), evaluators=list(evaluators_),
                      steps_per_epoch=steps_per_epoch)


def _logged(workdir, key):
    return [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]


# -- the loop ----------------------------------------------------------------------------------


def test_eval_cadence_rule():
    picked = lambda **kw: [s for s in range(1, 8) if loop.is_eval_step(s, total=7, **kw)]  # noqa: E731
    assert picked(eval_every=0, steps_per_epoch=3) == [3, 6, 7]   # epoch ends + the end
    assert picked(eval_every=0, steps_per_epoch=None) == [7]      # only the end
    assert picked(eval_every=2, steps_per_epoch=3) == [2, 4, 6, 7]  # eval_every wins over epochs


def test_loop_runs_evaluators_at_epoch_ends_and_writes_their_results(tmp_path):
    recorder = Recorder()
    _train(tmp_path, [recorder], steps=7, steps_per_epoch=3, dropout=0.5)
    assert recorder.steps == [3, 6, 7]
    assert all(recorder.deterministic)  # the model arrives in eval mode
    assert _logged(tmp_path, "val/score") == [(3, 3.0), (6, 6.0), (7, 7.0)]
    assert [s for s, _ in _logged(tmp_path, "val/logit_mean")] == [3, 6, 7]


def test_loop_without_steps_per_epoch_evaluates_at_the_end_only(tmp_path):
    recorder = Recorder()
    _train(tmp_path, [recorder], steps=5)
    assert recorder.steps == [5] and _logged(tmp_path, "val/score") == [(5, 5.0)]


def test_an_evaluator_does_not_change_training(tmp_path):
    """Same batches, same dropout keys, same parameters with and without an evaluator that runs
    the model (through its dropout layer) every step."""
    plain = _train(tmp_path / "plain", steps=6, dropout=0.5)
    evaluated = _train(tmp_path / "evaluated", [Recorder()], steps=6, eval_every=1, dropout=0.5)
    assert _flat(plain.state["params"]).keys() == _flat(evaluated.state["params"]).keys()
    for k, v in _flat(plain.state["params"]).items():
        np.testing.assert_array_equal(v, _flat(evaluated.state["params"])[k])
    losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(w) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "plain") == losses(tmp_path / "evaluated")


def test_an_object_without_run_is_refused(tmp_path):
    with pytest.raises(TypeError, match="run\\(model, step\\)"):
        _train(tmp_path, [object()], steps=2)


def test_keep_best_keeps_the_parameters_of_the_best_step_across_restarts(tmp_path):
    scores = {3: 0.2, 6: 0.9, 9: 0.5, 12: 0.9}  # 12 ties with 6: the first stays
    best_dir = tmp_path / "best"
    keeper = evaluators.KeepBest(Recorder(scores), best_dir, metric="val/score")
    result = _train(tmp_path / "run", [keeper], steps=12, steps_per_epoch=3, every=3, keep=10)
    assert keeper.best(result.model()) == (6, 0.9)
    kept = _flat(restore_params(best_dir))
    at_six = _flat(restore_params(tmp_path / "run" / "checkpoints", 6))
    final = _flat(result.state["params"])
    assert kept.keys() == at_six.keys()
    for k in kept:
        np.testing.assert_array_equal(kept[k], at_six[k])
    assert any(not np.array_equal(kept[k], final[k]) for k in kept)  # not the last step's

    # A new keeper on the same directory (a resumed process) reads the score back ...
    again = evaluators.KeepBest(Recorder({20: 0.5}), best_dir, metric="val/score")
    model = result.model()
    again.run(model, 20)
    assert again.best(model) == (6, 0.9)  # ... and a lower score does not replace it
    step, value = again.restore_into(model)
    assert (step, value) == (6, 0.9)
    for k, v in _flat(nnx.state(model, nnx.Param).to_pure_dict()).items():
        np.testing.assert_array_equal(v, at_six[k])
    better = evaluators.KeepBest(Recorder({21: 0.95}), best_dir, metric="val/score")
    better.run(result.model(), 21)
    assert better.best(result.model()) == (21, 0.95)
    better.clear()
    assert not best_dir.exists() and better.best(result.model()) is None


def test_labelled_accuracy_ignores_unlabelled_rows():
    acc = evaluators.labelled_accuracy(np.array([1, 2, 3, 0]), np.array([1, 0, 3, -1]))
    assert acc["ci95"][0] <= 2 / 3 <= acc["ci95"][1]
    assert {k: v for k, v in acc.items() if k != "ci95"} == {"accuracy": pytest.approx(2 / 3), "n": 3, "n_excluded": 1}
    assert np.isnan(evaluators.labelled_accuracy(np.array([1]), np.array([-1]))["accuracy"])


def test_mlm_validation_scores_the_same_masked_tokens_each_time():
    """Pretraining's evaluator: fixed masks, the model in eval mode, so a model scores the same
    at every evaluation and a different model scores differently."""
    from bioscan_jax import sharding as mesh_lib
    from bioscan_jax.data import dna
    from bioscan_jax.models import kmer_bert
    from bioscan_jax.train import stages

    rng = np.random.default_rng(0)
    source = [{"processid": f"p{i}", "dna_barcode": "".join(rng.choice(list("ACGT"), 300)), "genus": 0, "species": 0}
              for i in range(20)]
    tokenizer = dna.KmerTokenizer(4, max_nucleotides=300)
    mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    rules = mesh_lib.normalize_rules(None)
    stage = ml_collections.ConfigDict({"mask_prob": 0.5, "masked_only": False})
    validation = stages.mlm_validation(stage, source, tokenizer, seed=0, mesh=mesh, rules=rules, batch_size=8)
    assert validation.records == 16 and len(validation.batches) == 2  # the partial batch is dropped
    model = kmer_bert.KmerBertForMLM(kmer_bert.get_variant("tiny", num_layers=1), rngs=nnx.Rngs(0))
    model.eval()
    first, again = validation.run(model, 1), validation.run(model, 2)
    assert set(first) == {"val/mlm_loss", "val/mlm_accuracy", "val/mlm_masked_accuracy"}
    assert first == again and np.isfinite(first["val/mlm_loss"])
    other = kmer_bert.KmerBertForMLM(kmer_bert.get_variant("tiny", num_layers=1), rngs=nnx.Rngs(1))
    other.eval()
    assert validation.run(other, 1)["val/mlm_loss"] != first["val/mlm_loss"]
    small = stages.mlm_validation(stage, source[:5], tokenizer, seed=0, mesh=mesh, rules=rules, batch_size=8)
    assert small.records == 5 and len(small.batches) == 1  # a split smaller than a batch: one smaller batch
    assert stages.mlm_validation(stage, [], tokenizer, seed=0, mesh=mesh, rules=rules, batch_size=8) is None


# -- BarcodeBERT fine-tuning -------------------------------------------------------------------


def _finetune_config(tmp_path, **overrides):
    from test_barcodebert_task import small_config

    config = small_config(tmp_path, stages="finetune", **overrides)
    config.finetune.head_init = "random"  # no pretraining needed
    config.finetune.train.steps = 0
    config.finetune.train.epochs = 3
    config.finetune.train.batch_size = 32  # 2 steps per epoch on the 85 deduplicated train records
    config.finetune.train.log_every = 1
    return config


@pytest.fixture(scope="module")
def best_val_run(tmp_path_factory):
    from bioscan_jax import tasks

    tmp = tmp_path_factory.mktemp("finetune_val")
    config = _finetune_config(tmp, **{"finetune.select": "best_val"})
    workdir = str(tmp / "work")
    return config, workdir, tasks.run(config, workdir)


def test_finetune_logs_val_accuracy_per_epoch_and_plots_it(best_val_run):
    from bioscan_jax.train import curves

    config, workdir, summary = best_val_run
    stage_dir = os.path.join(workdir, "finetune")
    steps_per_epoch = summary["split_sizes"]["train"]["used"] // config.finetune.train.batch_size
    val = _logged(stage_dir, "val/accuracy")
    assert [s for s, _ in val] == [steps_per_epoch * e for e in (1, 2, 3)]
    assert all(0.0 <= v <= 1.0 for _, v in val)
    assert summary["finetune"]["val"]["split"] == "val"
    assert summary["finetune"]["val"]["records"] == summary["split_sizes"]["val"]["used"]
    steps, values = curves.stage_curves(stage_dir)["val accuracy"]
    assert list(zip(steps, values)) == val
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    assert "Fine-tuned species accuracy (val, best-val epoch)" in open(os.path.join(workdir, "summary.md")).read()


def test_pretraining_val_loss_is_a_curve_of_its_own(tmp_path):
    import json

    from bioscan_jax.train import curves

    stage = tmp_path / "pretrain"
    stage.mkdir()
    lines = [{"step": 10, "loss": 5.0, "accuracy": 0.1}, {"step": 20, "loss": 4.0, "accuracy": 0.2},
             {"step": 20, "val/mlm_loss": 4.5, "val/mlm_accuracy": 0.15}]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = curves.stage_curves(str(stage))
    assert got["val/mlm_loss"] == ([20], [4.5])
    assert got["loss"] == ([10, 20], [5.0, 4.0])
    assert "val accuracy" not in got  # val/accuracy was never logged
    assert curves.plot_curves(str(tmp_path), stages=("pretrain",)) == str(tmp_path / "training_curves.png")


def _accuracy_of(config, params):
    """The test accuracy of a fresh classifier holding ``params``."""
    from bioscan_jax import sharding
    from bioscan_jax.data import dna
    from bioscan_jax.tasks.barcodebert import evaluation as dna_probes
    from bioscan_jax.models import kmer_bert, towers
    from bioscan_jax.tasks.barcodebert import task as bb

    data = bb.open_data(config)
    model_cfg = kmer_bert.config_from(config.model)
    model = kmer_bert.KmerBertClassifier(model_cfg, data.num_classes("species"), pooling=config.finetune.pooling,
                                         rngs=nnx.Rngs(123))
    towers.load_params(model, params, "test parameters")
    tokenizer = dna.tokenizer_for(config.model.tokenization, model_cfg.k, max_nucleotides=config.data.max_nucleotides)
    return dna_probes.finetune_accuracy(config, model, data, tokenizer, sharding.make_mesh(config.mesh))["accuracy"]


def test_best_val_reports_the_test_accuracy_of_the_best_val_epoch(best_val_run):
    from bioscan_jax import tasks

    config, workdir, summary = best_val_run
    stage_dir = os.path.join(workdir, "finetune")
    val = _logged(stage_dir, "val/accuracy")
    best_step, best_value = val[int(np.argmax([v for _, v in val]))]  # the first epoch of the highest
    finetuned = summary["finetune"]
    assert finetuned["select"] == "best_val"
    assert finetuned["selected_step"] == best_step and finetuned["val"]["accuracy"] == pytest.approx(best_value)
    kept = restore_params(os.path.join(stage_dir, "best_val"))
    assert finetuned["accuracy"] == _accuracy_of(config, kept)

    # The same finished run reported with select='last': no training, the last step's parameters.
    last_config = _finetune_config(pathlib.Path(workdir).parent, **{"finetune.select": "last"})
    lines = len(read_metrics(stage_dir))
    last = tasks.run(last_config, workdir)["finetune"]
    assert len(read_metrics(stage_dir)) == lines  # nothing trained or evaluated again
    assert last["select"] == "last" and last["selected_step"] == val[-1][0] == last["steps"]
    assert last["val"]["accuracy"] == pytest.approx(val[-1][1])
    assert last["accuracy"] == _accuracy_of(config, restore_params(os.path.join(stage_dir, "checkpoints")))


@pytest.mark.parametrize("overrides, message", [
    ({"finetune.select": "best"}, "unknown config.finetune.select"),
    ({"finetune.select": "best_val", "finetune.val_split": ""}, "needs a validation split"),
    ({"finetune.val_split": "test"}, "is the test split"),
])
def test_selection_errors_fail_before_any_data_is_built(tmp_path, overrides, message):
    from bioscan_jax import tasks

    with pytest.raises(ValueError, match=message):
        tasks.get("barcodebert").check_config(_finetune_config(tmp_path, **overrides))
    assert not (tmp_path / "tfds").exists()


def test_keep_best_picks_the_epoch_compute_overall_acc_picks(tmp_path):
    """scripts/train_cl.py keeps best.pth when overall acc is strictly higher: the first of equal
    scores wins; a step the evaluator does not score (a skipped epoch) keeps nothing."""
    from flax import nnx

    from bioscan_jax.eval.evaluators import KeepBest

    table = {10: {}, 20: {"val/overall_acc": 0.31}, 30: {"val/overall_acc": 0.52},
             40: {"val/overall_acc": 0.52}, 50: {"val/overall_acc": float("nan")}, 60: {"val/overall_acc": 0.47}}

    class Table:
        def run(self, model, step):
            return table[step]

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    keeper = KeepBest(Table(), tmp_path / "best", metric="val/overall_acc")
    keeper.clear()
    for step in table:
        model.kernel[...] = model.kernel[...] * 0 + step  # parameters that say which step they are from
        keeper.run(model, step)
    assert keeper.best(model) == (30, 0.52)
    keeper.restore_into(model)
    assert float(model.kernel[...][0, 0]) == 30
