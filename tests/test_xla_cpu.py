"""The XLA:CPU defaults: chosen by CPU features, never over the user's XLA_FLAGS, and in force."""

import os
import subprocess
import sys

from bioscan_jax import xla_cpu


def test_defaults_follow_the_cpu_features():
    assert xla_cpu.default_flags({"sse2", "avx", "avx2", "fma"}) == [xla_cpu.YNN_FUSIONS_OFF]
    assert xla_cpu.default_flags({"avx2", "avx512f", "avx512bw"}) == []  # measured: nothing wins there
    assert xla_cpu.default_flags({"avx2", "avx512f", "amx_bf16"}) == []
    assert xla_cpu.default_flags(None) == []  # unknown CPU (no /proc/cpuinfo): XLA's own defaults


def test_the_users_xla_flags_are_left_alone():
    env = {"XLA_FLAGS": ""}
    assert xla_cpu.apply_defaults(env, features={"avx2"}) is None and env == {"XLA_FLAGS": ""}
    env = {}
    assert xla_cpu.apply_defaults(env, features={"avx2"}) == xla_cpu.YNN_FUSIONS_OFF
    assert env == {"XLA_FLAGS": xla_cpu.YNN_FUSIONS_OFF}
    env = {}
    assert xla_cpu.apply_defaults(env, features={"avx512f", "avx2"}) is None and env == {}


def test_cpu_features_reads_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert xla_cpu.cpu_features(str(f)) == {"fpu", "sse2", "avx2", "fma"}
    assert xla_cpu.cpu_features(str(tmp_path / "missing")) is None
    assert xla_cpu.cpu_model(str(f)) is None
    f.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert xla_cpu.cpu_model(str(f)) == "AMD EPYC 7B13"
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert xla_cpu.cpu_features(str(arm)) == {"fp", "asimd", "sve"}


_PROBE = """
from bioscan_jax import xla_cpu
print(xla_cpu.apply_defaults(features={"avx2"}))
import jax, jax.numpy as jnp
hlo = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)).lower(
    jnp.ones((4, 64, 32)), jnp.ones((4, 32, 64))).compile().as_text()
print("ynn" in hlo)
"""


def test_applied_before_jax_starts_it_takes_effect():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out == [xla_cpu.YNN_FUSIONS_OFF, "False"]
