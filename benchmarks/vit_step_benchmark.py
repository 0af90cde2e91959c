"""ViT forward+backward throughput: our NNX ViT (jitted) vs HF ``ViTForImageClassification``.

One measured step = forward on a batch of 224×224 images, softmax cross-entropy on a
1000-class head over the CLS token, backward to all parameters (no optimiser update, so both
sides do the same work). Prints one JSON line per measurement (``matmul_peak``, ``jax_nnx``,
``torch_hf``, ``comparison``); FLOPs from XLA's cost analysis (or the analytic count).

Usage::

    python benchmarks/vit_step_benchmark.py --variant B/16 --batch 8 --steps 3
    python benchmarks/vit_step_benchmark.py --device gpu --dtype bf16 --batch 128 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import configure_jax, emit, machine_info, matmul_peak, matmul_peaks, paired, pair_ratios, roofline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each side, interleaved in pairs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--peak-n", type=int, default=2048)
    p.add_argument("--no-peaks", action="store_true", help="only the step dtype's JAX matmul peak")
    p.add_argument("--tf32", action="store_true",
                   help="GPU f32 only: allow TF32 matmuls on both sides (default: full f32 on both)")
    p.add_argument("--attention", default="einsum", choices=["einsum", "xla", "cudnn"],
                   help="attention_impl of our model (cudnn: flash attention on GPU, bf16, no attention dropout)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)



def analytic_flops(cfg, batch):
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, f, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    params = L * (4 * d * d + 2 * d * f) + cfg.patch_size**2 * cfg.num_channels * d
    return 6 * params * batch * n + 12 * L * batch * n * n * d


def jax_step(args, cfg, images, labels):
    """Our forward+backward as a blocking ``fn()``, and its compile facts."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bioscan_jax.models import vit

    model = vit.ViT(cfg, rngs=nnx.Rngs(args.seed))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    def loss_fn(p, rest, x, y):
        m = nnx.merge(graphdef, p, rest, copy=True)
        logits, _ = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    t0 = time.perf_counter()
    compiled = step.lower(params, rest, images, labels).compile()
    compile_s = time.perf_counter() - t0
    flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca["flops"]) if ca and ca.get("flops", 0) > 0 else None
    except Exception:
        pass

    def one():
        jax.block_until_ready(compiled(params, rest, images, labels))

    return one, dict(xla_flops=flops, compile_s=compile_s)


def torch_step(args, cfg, images, labels):
    """HF ``ViTForImageClassification`` forward+backward as a blocking ``fn()``."""
    import torch
    import transformers

    dev = torch.device("cuda" if (args.device == "gpu" and torch.cuda.is_available()) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if args.device == "gpu" and dev.type != "cuda":
        raise RuntimeError("--device gpu but torch.cuda is not available")
    torch.manual_seed(args.seed)
    hcfg = transformers.ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=cfg.num_classes)
    model = transformers.ViTForImageClassification(hcfg).to(dev).train()
    x = torch.tensor(images.transpose(0, 3, 1, 2), device=dev)
    y = torch.tensor(labels, dtype=torch.long, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def one():
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = model(pixel_values=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return one, dict(attn_implementation=model.config._attn_implementation)


def main(argv=None):
    args = parse_args(argv)
    jax = configure_jax(args.device, args.dtype, args.tf32)
    import jax.numpy as jnp

    import numpy as np

    from bioscan_jax.models import vit

    cfg = vit.get_variant(args.variant, image_size=args.image_size, num_classes=args.num_classes,
                          dtype=jnp.bfloat16 if args.dtype == "bf16" else None, attention_impl=args.attention)
    rng = np.random.default_rng(args.seed)
    images = rng.random((args.batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    labels = rng.integers(0, cfg.num_classes, args.batch).astype(np.int32)
    common = dict(attention=args.attention, variant=args.variant, batch=args.batch, image_size=cfg.image_size, dtype=args.dtype,
                  device=args.device, jax_device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
                  load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    emit(benchmark="machine", **machine_info())
    peak, _ = matmul_peak(args.peak_n, 5, jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    emit(benchmark="matmul_peak", n=args.peak_n, flops_per_s=peak, **common)
    if not args.no_peaks:
        emit(benchmark="matmul_peaks", **matmul_peaks(args.peak_n, 5, args.device, with_torch=not args.no_torch))
    analytic = analytic_flops(cfg, args.batch)
    steps, facts = {}, {}
    if not args.no_jax:
        steps["jax_nnx"], facts["jax_nnx"] = jax_step(args, cfg, images, labels)
    if not args.no_torch:
        try:
            steps["torch_hf"], facts["torch_hf"] = torch_step(args, cfg, images, labels)
        except ImportError as e:
            emit(benchmark="vit_fwd_bwd", impl="torch_hf", skipped=f"torch/transformers missing: {e}")
    timings = paired(steps, args.steps, args.warmup)
    if "jax_nnx" in timings:
        times, cpu, f = timings["jax_nnx"]["times"], timings["jax_nnx"]["cpu"], facts["jax_nnx"]
        jax_s = statistics.median(times)
        flops, src = ((f["xla_flops"], "xla") if (f["xla_flops"] and f["xla_flops"] >= 0.5 * analytic)
                      else (analytic, "analytic"))
        emit(benchmark="vit_fwd_bwd", impl="jax_nnx", step_s=jax_s, step_s_all=times,
             cpu_s_per_step=statistics.median(cpu), images_per_s=args.batch / jax_s, flops_per_step=flops,
             flops_source=src, flops_analytic=analytic, flops_per_s=flops / jax_s,
             fraction_of_matmul_peak=flops / jax_s / peak, compile_s=f["compile_s"], **common)
    if "torch_hf" in timings:
        times, cpu = timings["torch_hf"]["times"], timings["torch_hf"]["cpu"]
        torch_s = statistics.median(times)
        emit(benchmark="vit_fwd_bwd", impl="torch_hf", step_s=torch_s, step_s_all=times,
             cpu_s_per_step=statistics.median(cpu), images_per_s=args.batch / torch_s, flops_per_step=analytic,
             flops_source="analytic", flops_per_s=analytic / torch_s, fraction_of_matmul_peak=analytic / torch_s / peak,
             attn_implementation=facts["torch_hf"]["attn_implementation"], **common)
    if len(timings) == 2:
        ours, theirs = timings["jax_nnx"], timings["torch_hf"]
        emit(benchmark="vit_fwd_bwd_comparison", variant=args.variant, batch=args.batch, dtype=args.dtype,
             device=args.device, pairs=args.steps, jax_step_s=statistics.median(ours["times"]),
             torch_step_s=statistics.median(theirs["times"]), jax_cpu_s=statistics.median(ours["cpu"]),
             torch_cpu_s=statistics.median(theirs["cpu"]), **pair_ratios(ours, theirs),
             **roofline(analytic, statistics.median(theirs["times"]), peak))


if __name__ == "__main__":
    main()
