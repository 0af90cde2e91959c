"""Shared set-up of the step benchmarks (BarcodeBERT, ViT): JAX platform and matmul precision,
the matmul peak they are measured against, and JSON-line output."""

from __future__ import annotations

import json
import os
import sys
import time


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def configure_jax(device: str, dtype: str, tf32: bool):
    """Selects the JAX platform before JAX is imported, puts the repository on ``sys.path``, on CPU
    applies :func:`bioscan_jax.xla_cpu.apply_defaults` as ``run.py`` does and, for f32 on GPU,
    sets the same matmul precision as the PyTorch side; returns ``jax``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if device == "cpu" else "cuda")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if device == "cpu":  # what run.py does: this CPU's measured XLA defaults, unless XLA_FLAGS is set
        from bioscan_jax import xla_cpu

        xla_cpu.apply_defaults()
    import jax

    if device == "gpu" and dtype == "f32":  # same matmul precision on both sides
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    return jax


def matmul_peak(n: int, reps: int, dtype) -> tuple[float, float]:
    """Best-of-``reps`` FLOP/s of one jitted ``n``x``n`` matmul, and its time in seconds."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, best


#: CPU features that decide which matmul kernels the two stacks can use.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def machine_info() -> dict:
    """The machine line beside every ratio: CPU model and ISA flags, cores, load, the XLA flags in
    force (``XLA_FLAGS``), versions of both stacks and torch's CPU kernel level."""
    import platform

    from bioscan_jax import xla_cpu  # the ISA flags its defaults are chosen by

    model, flags = platform.processor() or "?", xla_cpu.cpu_features() or frozenset()
    if model in ("?", "x86_64"):
        model = xla_cpu.cpu_model() or model
    info = dict(cpu_model=model, isa=[f for f in ISA_FLAGS if f in flags], cpu_count=os.cpu_count(),
                load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    try:
        import jax
        import jaxlib

        info.update(jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
                    jax_backend=jax.default_backend())
    except ImportError:
        pass
    try:
        import torch

        info.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    torch_mkldnn=bool(torch.backends.mkldnn.is_available()))
    except ImportError:
        pass
    return info


def torch_matmul_peak(n: int, reps: int, dtype: str, device: str = "cpu") -> tuple[float, float]:
    """Best-of-``reps`` FLOP/s of one ``n``x``n`` ``torch.mm`` (``dtype`` 'f32' or 'bf16'), and its time."""
    import torch

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dt)
    b = torch.randn(n, n, generator=g).to(dev, dt)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, best


def matmul_peaks(n: int, reps: int, device: str, with_torch: bool) -> dict:
    """The matmul peak of both stacks, f32 and bf16, measured in this run (FLOP/s)."""
    import jax.numpy as jnp

    out = {"n": n}
    for name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        out[f"jax_{name}"] = matmul_peak(n, reps, dt)[0]
        if with_torch:
            try:
                out[f"torch_{name}"] = torch_matmul_peak(n, reps, name, device)[0]
            except ImportError:
                with_torch = False
    return out


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``fn()`` (which blocks until its work is done)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def paired(steps: dict, pairs: int, warmup: int) -> dict:
    """Runs the step functions (``name -> fn``, each one blocking step) interleaved: after
    ``warmup`` steps of each, ``pairs`` rounds of one step each, the order alternating per round
    so drift in the machine's speed falls on both alike. Returns ``name -> {'times', 'cpu'}``."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    out = {name: {"times": [], "cpu": []} for name in steps}
    names = list(steps)
    for i in range(pairs):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = timed(steps[name])
            out[name]["times"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def pair_ratios(ours: dict, theirs: dict) -> dict:
    """Per-pair speedups of ours over theirs (their time / ours), wall and CPU: median, min, max."""
    import statistics

    def stats(key):
        r = [t / o for o, t in zip(ours[key], theirs[key]) if o > 0]
        return {"median": statistics.median(r), "min": min(r), "max": max(r), "all": r} if r else None

    wall, cpu = stats("times"), stats("cpu")
    return {"speedup": wall["median"] if wall else None, "speedup_pairs": wall,
            "speedup_cpu_time": cpu["median"] if cpu else None, "speedup_cpu_time_pairs": cpu}


def roofline(flops: float, torch_step_s: float, jax_peak: float, target: float = 1.5) -> dict:
    """What the matmul peak allows: the speedup over torch of a step that ran all its ``flops``
    at our measured ``jax_peak`` (FLOP/s, same dtype, same run), and the FLOP/s a step needs to be
    ``target`` × torch. A bound below ``target`` means no model-side change can reach it on this
    machine: only a faster matmul kernel can."""
    need = target * flops / torch_step_s
    return {"speedup_at_matmul_peak": torch_step_s / (flops / jax_peak) if jax_peak else None,
            "target_speedup": target, "flops_per_s_needed_for_target": need,
            "needed_over_matmul_peak": need / jax_peak if jax_peak else None}
