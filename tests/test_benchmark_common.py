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
