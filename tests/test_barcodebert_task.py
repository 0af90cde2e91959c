"""End-to-end test of the BarcodeBERT task on a small synthetic dataset, and its config checks."""

import json
import os

import pytest

from bioscan_jax import tasks
from bioscan_jax.tasks.barcodebert import task as barcodebert_task
from configs import barcodebert as barcodebert_config

pytestmark = pytest.mark.slow  # the BarcodeBERT task end to end


def small_config(tmp_path, **overrides):
    c = barcodebert_config.get_config("tiny")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.num_records = 600
    for stage in (c.pretrain, c.finetune):
        stage.train.epochs = 0
        stage.train.steps = 4
        stage.train.batch_size = 16
        stage.train.log_every = 2
        stage.train.progress_bar = False
        stage.train.tensorboard = False
        stage.checkpoint.every = 2
    c.probe.eval_batch_size = 64
    c.probe.linear_epochs = 2
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("barcodebert")
    workdir = str(tmp / "work")
    summary = tasks.run(small_config(tmp), workdir)
    return workdir, summary


def test_main_job_writes_summary_with_the_paper_metrics(run_result):
    workdir, summary = run_result
    with open(os.path.join(workdir, "summary.json")) as f:
        written = json.load(f)
    assert written["probes"]["knn"]["accuracy"] == pytest.approx(summary["probes"]["knn"]["accuracy"])
    for key in ("knn", "knn_random_init", "kmer_baseline", "linear"):
        assert 0.0 <= summary["probes"][key]["accuracy"] <= 1.0
    assert summary["probes"]["knn"]["n_queries"] == summary["eval_sets"]["knn_queries"]["records"]
    assert 0.0 <= summary["finetune"]["accuracy"] <= 1.0
    assert summary["finetune"]["n_test"] == summary["eval_sets"]["test"]["records"]
    assert summary["pretrain"]["steps"] == 4 and summary["finetune"]["steps"] == 4
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    table = open(os.path.join(workdir, "summary.md")).read()
    assert "Fine-tuned species accuracy" in table and "k-mer counts" in table


def test_tiny_finetuning_starts_from_the_linear_probe(run_result):
    _, summary = run_result
    assert summary["finetune"]["head_init"] == "linear_probe"
    assert "head" not in summary["probes"]["linear"]  # the fitted head is not part of the summary


def test_linear_probe_head_without_the_probes_stage(tmp_path):
    config = small_config(tmp_path, stages="pretrain,finetune")
    summary = tasks.run(config, str(tmp_path / "work"))
    assert "probes" not in summary
    assert summary["finetune"]["head_init"] == "linear_probe" and summary["finetune"]["steps"] == 4


@pytest.mark.parametrize("stages", ["finetune", "finetune,probes"])
def test_linear_probe_head_needs_a_pretrained_encoder(tmp_path, stages):
    # with the probes stage too: fine-tuning must not start from the probes' random-init encoder
    config = small_config(tmp_path, stages=stages)
    with pytest.raises(ValueError, match="needs the pretrain stage"):
        tasks.run(config, str(tmp_path / "work"))
    assert not (tmp_path / "tfds").exists()  # refused before any data is built


def test_probes_without_pretraining_say_the_encoder_is_not_pretrained(run_result, tmp_path):
    workdir, _ = run_result
    config = small_config(tmp_path, stages="probes")
    config.data.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
    summary = tasks.run(config, str(tmp_path / "work"))
    assert summary["probes"]["encoder"] == barcodebert_task.NOT_PRETRAINED
    table = open(tmp_path / "work" / "summary.md").read()
    assert "(pretrained)" not in table and f"({barcodebert_task.NOT_PRETRAINED})" in table
    assert f"Linear probe species accuracy (test; {barcodebert_task.NOT_PRETRAINED})" in table
    main_workdir, main = run_result
    assert main["probes"]["encoder"] == barcodebert_task.PRETRAINED
    main_table = open(os.path.join(main_workdir, "summary.md")).read()
    assert "| Linear probe species accuracy (test) |" in main_table
    assert "1-NN genus accuracy, unseen species (pretrained)" in main_table


def test_random_head_finetuning_without_pretraining_starts_from_no_encoder(run_result, tmp_path, monkeypatch):
    # probes without pretraining build a random-init encoder; fine-tuning must not inherit it
    workdir, _ = run_result
    config = small_config(tmp_path, stages="probes,finetune", **{"finetune.head_init": "random"})
    config.data.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
    seen = {}

    def finetune(config, data, model_cfg, tokenizer, encoder, workdir, **kwargs):
        seen.update(encoder=encoder, head=kwargs.get("head"))
        raise RuntimeError("stop after the hand-over")

    monkeypatch.setattr(barcodebert_task, "finetune", finetune)
    with pytest.raises(RuntimeError, match="stop after the hand-over"):
        tasks.run(config, str(tmp_path / "work"))
    assert seen == {"encoder": None, "head": None}


def test_rerun_resumes_from_checkpoints_without_training_again(run_result, tmp_path):
    workdir, summary = run_result
    before = sum(1 for _ in open(os.path.join(workdir, "pretrain", "metrics.jsonl")))
    config = small_config(tmp_path, stages="pretrain")
    config.data.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
    again = tasks.run(config, workdir)
    after = sum(1 for _ in open(os.path.join(workdir, "pretrain", "metrics.jsonl")))
    assert again["pretrain"]["steps"] == 4
    assert after == before  # nothing was trained or logged again


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stages": "pretrain,distill"}, "unknown config.stages"),
        ({"mesh.data": 3}, "mesh"),
        ({"probe.eval_batch_size": 0}, "batch"),
        ({"finetune.head_init": "magic"}, "head_init"),
        ({"probe.knn_rank": "kingdom"}, "knn_rank"),
    ],
)
def test_config_errors_fail_before_any_data_is_built(tmp_path, overrides, message):
    """Through the task's spec, as run.py checks a config (the test above goes through tasks.run)."""
    config = small_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        tasks.get("barcodebert").check_config(config)
    assert not (tmp_path / "tfds").exists()


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants: tiny, paper, 4_12_12"):
        barcodebert_config.get_config("huge")


def test_bold_export_runs_pretraining_finetuning_and_probes(tmp_path, real_barcodes_path):
    """Item 5: a user's BOLD TSV (here 12 species of the real barcodes) through the whole task,
    with the default ``pretrain_split='auto'`` (no unlabelled records: pretrain on train)."""
    import pandas as pd

    frame = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    keep = sorted(frame["species_name"].unique())[:12]
    small = frame[frame["species_name"].isin(keep)].groupby("species_name").head(12)
    path = tmp_path / "export.tsv"
    small.to_csv(path, sep="\t", index=False)
    config = small_config(tmp_path)
    config.data.source, config.data.path = "bold", str(path)
    config.data.unseen_fraction = 0.25
    config.probe.knn_rank = "order"  # 12 species of (mostly) 12 genera: genus is rarely shared
    summary = tasks.run(config, str(tmp_path / "work"))
    assert summary["data"].startswith("BOLD import")
    sizes = {s: v["records"] for s, v in summary["split_sizes"].items()}
    used = {s: v["used"] for s, v in summary["split_sizes"].items()}
    q = config.data.probe_query_split  # tiny: 'unseen', the import's unseen species are test_unseen
    assert sizes["pretrain+train"] == sizes["train"] > 0 and sizes[q] >= 12
    assert sizes["train"] + sizes["test"] + sizes[q] == len(small)
    assert used["pretrain+train"] == used["train"] <= sizes["train"]
    probes = summary["probes"]
    assert probes["knn"]["n_queries"] == used[q] and probes["knn"]["rank"] == "order"
    with open(os.path.join(tmp_path, "work", "summary.md")) as f:
        assert "1-NN order accuracy" in f.read()
    assert 0.0 <= probes["kmer_baseline"]["accuracy"] <= 1.0 and 0.0 <= summary["finetune"]["accuracy"] <= 1.0


def test_bold_import_says_why_pretraining_reports_no_validation_loss(tmp_path, real_barcodes_path, monkeypatch,
                                                                    caplog):
    """A BOLD import has no validation split: the pretraining stage says so in the log (no
    training here: the stage itself is replaced by one that stops the run)."""
    import logging

    import pandas as pd

    from bioscan_jax.train import stages

    class Stop(Exception):
        pass

    def stop(*args, evaluators=(), **kwargs):
        assert tuple(evaluators) == ()
        raise Stop

    frame = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    small = frame[frame["species_name"].isin(sorted(frame["species_name"].unique())[:12])]
    path = tmp_path / "export.tsv"
    small.groupby("species_name").head(12).to_csv(path, sep="\t", index=False)
    config = small_config(tmp_path, stages="pretrain")
    config.data.source, config.data.path = "bold", str(path)
    monkeypatch.setattr(stages, "pretrain_mlm", stop)
    with caplog.at_level(logging.INFO, logger="bioscan_jax.tasks.barcodebert.task"), pytest.raises(Stop):
        tasks.run(config, str(tmp_path / "work"))
    assert "pretraining reports no validation loss: a BOLD import has no validation split" in caplog.text


def test_finetuning_batch_larger_than_its_split_fails_before_pretraining(tmp_path):
    config = small_config(tmp_path)
    config.finetune.train.batch_size = 100_000
    with pytest.raises(ValueError, match=r"config.finetune.train.batch_size=100000 is larger than the finetune "
                                         r"split 'train' \(\d+ records after barcode deduplication\)"):
        tasks.run(config, str(tmp_path / "work"))
    assert not (tmp_path / "work" / "pretrain").exists()
