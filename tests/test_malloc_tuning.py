"""malloc_tuning.configure: what it sets, and when it leaves malloc alone."""

import pytest

from bioscan_jax import malloc_tuning


class FakeLibc:
    def __init__(self, refuse=()):
        self.calls, self.refuse = [], set(refuse)

    def mallopt(self, code, value):
        self.calls.append((code, value))
        return 0 if code in self.refuse else 1


def test_applies_every_setting():
    libc = FakeLibc()
    line = malloc_tuning.configure({}, libc)
    assert libc.calls == list(malloc_tuning.SETTINGS.values())
    assert libc.calls == [(-8, 1), (-4, 0), (-1, 2**31 - 1)]  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
    assert "M_ARENA_MAX=1 M_MMAP_MAX=0" in line and "BIOSCAN_JAX_MALLOC=0" in line


@pytest.mark.parametrize("env", [{"BIOSCAN_JAX_MALLOC": "0"}, {"BIOSCAN_JAX_MALLOC": "off"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, {"MALLOC_CONF": "dirty_decay_ms:0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_ARENA_MAX": "4"}])
def test_leaves_a_users_choice_alone(env):
    libc = FakeLibc()
    line = malloc_tuning.configure(env, libc)
    assert libc.calls == [] and "left as it is" in line
    assert next(iter(env)) in line


def test_reports_a_refused_setting():
    libc = FakeLibc(refuse={-4})
    line = malloc_tuning.configure({}, libc)
    assert "mallopt(M_MMAP_MAX, 0) refused" in line and "M_ARENA_MAX=1" in line


def test_real_glibc_accepts_the_settings():
    """In a subprocess: the settings would otherwise stay on in the test process."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = "from bioscan_jax import malloc_tuning; print(malloc_tuning.configure({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "glibc mallopt M_ARENA_MAX=1 M_MMAP_MAX=0 M_TRIM_THRESHOLD=2147483647" in out
