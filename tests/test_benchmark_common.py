"""benchmarks/_common.py: the roofline bound printed beside each paired step comparison."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _common  # noqa: E402


def test_roofline_bound_and_needed_rate():
    # 0.9 TFLOP per step, torch 6.0 s, our matmul peak 150 GFLOP/s: at the peak our step would
    # take 6.0 s (1.0x torch); 1.5x torch needs 0.9e12 * 1.5 / 6 = 225 GFLOP/s = 1.5x the peak.
    r = _common.roofline(0.9e12, 6.0, 150e9)
    assert r["speedup_at_matmul_peak"] == pytest.approx(1.0)
    assert r["flops_per_s_needed_for_target"] == pytest.approx(225e9)
    assert r["needed_over_matmul_peak"] == pytest.approx(1.5)
    assert _common.roofline(0.9e12, 6.0, 150e9, target=3.0)["needed_over_matmul_peak"] == pytest.approx(3.0)
    assert _common.roofline(0.9e12, 6.0, 0.0)["speedup_at_matmul_peak"] is None


def test_gemm_weighted_rate_is_the_flop_weighted_harmonic_mean():
    import gemm_shapes_benchmark as gemm

    rate = lambda v: {op: {"jax": v} for op in gemm.OPS}  # noqa: E731
    # 4_4_4: q/k/v/out carry 4·768·768 FLOP units, each MLP GEMM 768·3072: equal thirds
    rows = {"4_4_4 q/k/v/out": rate(100.0), "4_4_4 mlp in": rate(200.0), "4_4_4 mlp out": rate(200.0),
            "square 2048": rate(1.0), "vit q/k/v": rate(1.0)}
    assert gemm.weighted_rate(rows, "4_4_4", "jax") == pytest.approx(3 / (1 / 100 + 2 / 200))
    rows["4_4_4 mlp in"] = rate(100.0)
    rows["4_4_4 mlp out"] = rate(100.0)
    assert gemm.weighted_rate(rows, "4_4_4", "jax") == pytest.approx(100.0)  # other steps' shapes not counted
