"""The persistent compilation cache: where it goes, when it stays off, and that a compile lands in it."""

from __future__ import annotations

import os
import subprocess
import sys

from bioscan_jax import compilation_cache as cc


def test_cache_dir_order():
    assert cc.cache_dir({"HOME": "/h"}, tag="t") == "/h/.cache/bioscan_jax/xla/t"
    assert cc.cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/c"}, tag="t") == "/c/bioscan_jax/xla/t"
    assert cc.cache_dir({cc.ENV: "/mine", "XDG_CACHE_HOME": "/c"}, tag="t") == "/mine/t"
    assert cc.cache_dir({cc.ENV: "/mine"}) == os.path.join("/mine", cc.host_tag())
    for off in ("0", "off", "OFF", "false"):
        assert cc.cache_dir({cc.ENV: off}) is None
    assert cc.cache_dir({cc.JAX_ENV: "/theirs", cc.ENV: "/mine"}) is None  # JAX's own variable wins
    assert cc.enable({cc.ENV: "off"}) is None


def test_host_tag_separates_cpus(tmp_path):
    def tag(model, flags):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n")
        return cc.host_tag(str(tmp_path / "cpuinfo"))

    assert tag("AMD EPYC", "fma avx2") == tag("AMD EPYC", "avx2 fma")  # flag order does not matter
    assert tag("AMD EPYC", "fma avx2") != tag("AMD EPYC", "fma avx2 avx512f")
    assert tag("AMD EPYC", "fma avx2") != tag("Intel Xeon", "fma avx2")
    assert cc.host_tag() == cc.host_tag()


def test_a_compiled_program_is_written_and_read_back(tmp_path):
    # In a subprocess: the cache is a process-wide JAX setting.
    code = (
        "import os, jax, jax.numpy as jnp\n"
        "from bioscan_jax import compilation_cache as cc\n"
        f"path = cc.enable({{cc.ENV: {str(tmp_path / 'xla')!r}}})\n"
        f"assert path == os.path.join({str(tmp_path / 'xla')!r}, cc.host_tag()), path\n"
        "assert jax.config.jax_persistent_cache_min_compile_time_secs == cc.MIN_COMPILE_SECONDS\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "events = []\n"
        "jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
        "print(float(f(jnp.ones((64, 32)))))\n"
        "print('hits', events.count('/jax/compilation_cache/cache_hits'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (cc.ENV, cc.JAX_ENV, cc.MIN_COMPILE_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    (cache,) = os.listdir(tmp_path / "xla")  # the host's subfolder
    entries = sorted(os.listdir(tmp_path / "xla" / cache))
    assert entries, "nothing was written to the cache"
    assert first.stdout.splitlines()[-1] == "hits 0"
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    value, hits = second.stdout.splitlines()
    assert value == first.stdout.splitlines()[0]
    assert hits != "hits 0", second.stdout  # read back from disk, not compiled again
