"""benchmarks/gpu_suite_summary.py: MFU against the chip's bf16 peak, speed over torch, failed
cases. (The suite itself runs in CI as `bash benchmarks/gpu_suite.sh --dry-run`, scripts/test.sh.)"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_suite_summary as summary  # noqa: E402


def test_mfu_speedup_and_failed_cases():
    records = [
        {"case": "bert", "benchmark": "matmul_peak", "flops_per_s": 700e12},
        {"case": "bert", "benchmark": "bert_pretrain_step", "impl": "jax_nnx", "jax_device": "NVIDIA H200",
         "step_s": 0.1, "flops_per_s": 494.5e12, "samples_per_s": 2560},
        {"case": "bert", "benchmark": "bert_pretrain_step", "impl": "torch_hf", "jax_device": "NVIDIA H200",
         "step_s": 0.2, "flops_per_s": 247.25e12},
        {"case": "bert", "benchmark": "bert_pretrain_step_comparison", "speedup": 2.0},
        {"case": "bert", "benchmark": "gpu_suite_case", "rc": 0, "seconds": 30},
        {"case": "cpu_vit", "benchmark": "matmul_peak", "flops_per_s": 100e9},
        {"case": "cpu_vit", "benchmark": "vit_fwd_bwd", "impl": "jax_nnx", "jax_device": "cpu", "flops_per_s": 25e9},
        {"case": "cpu_vit", "benchmark": "gpu_suite_case", "rc": 124, "seconds": 240},
    ]
    out = summary.summarise(records)
    bert = out["cases"]["bert"]
    assert bert["jax_nnx"]["mfu_bf16_peak"] == pytest.approx(0.5)
    assert bert["torch_hf"]["mfu_bf16_peak"] == pytest.approx(0.25)
    assert bert["speedup_over_torch"] == 2.0 and bert["device"] == "NVIDIA H200"
    vit = out["cases"]["cpu_vit"]
    assert "mfu_bf16_peak" not in vit["jax_nnx"]  # no chip peak for a CPU: the measured matmul peak
    assert vit["jax_nnx"]["fraction_of_measured_matmul_peak"] == pytest.approx(0.25)
    assert out["failed_cases"] == ["cpu_vit"]
