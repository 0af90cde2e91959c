"""BarcodeBERT pretraining-step throughput: our NNX model (jitted, donated) vs HF/PyTorch.

One step = forward, cross-entropy over the 4**k k-mer classes on every non-special position
(masked and unmasked, as BarcodeBERT), backward, AdamW update. Inputs follow the BarcodeBERT
recipe: full-length barcodes (k=4 → 165 tokens), half of the tokens replaced by ``[MASK]``,
dropout on. Prints one JSON line per measurement:

* ``matmul_peak``: best-of-N ``jnp.dot`` (f32, n×n) FLOP/s on this machine, measured in the run;
* ``jax_step``: step time, samples/s, tokens/s, FLOP/s, fraction of the measured peak;
* ``torch_step``: the same for ``BertForTokenClassification`` + ``torch.optim.AdamW``;
* ``comparison``: speedup of our step over the PyTorch step (wall clock, and in process CPU
  seconds per step, which is steadier than wall time on a shared CPU machine).

FLOPs per step come from XLA's compiled cost analysis when available (``flops_source: xla``),
otherwise from the analytic count 6·(matmul params)·tokens + 12·layers·B·T²·D (``analytic``);
both are printed.

Usage::

    python benchmarks/bert_step_benchmark.py --config 4_4_4 --batch 32 --steps 5
    python benchmarks/bert_step_benchmark.py --device gpu --dtype bf16 --batch 256 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import configure_jax, emit, machine_info, matmul_peak, matmul_peaks, paired, pair_ratios, roofline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="4_4_4", help="KmerBert variant (tiny, paper, 4_4_4, 4_12_12, ...)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps of each side, interleaved in pairs (ours, torch; torch, ours; ...)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="compute dtype (params stay f32); bf16 = torch.autocast on the PyTorch side")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul for the peaks")
    p.add_argument("--no-peaks", action="store_true", help="only the step dtype's JAX matmul peak")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--prng", default="threefry2x32", help="JAX PRNG implementation (threefry2x32, rbg, unsafe_rbg)")
    p.add_argument("--tf32", action="store_true",
                   help="GPU f32 only: allow TF32 matmuls on both sides (default: full f32 on both)")
    p.add_argument("--attention", default="auto", choices=["auto", "einsum", "blocked", "xla", "cudnn"],
                   help="attention_impl of our model (auto: blocked on CPU where it wins; cudnn: flash attention on GPU, bf16, no attention dropout)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--no-jax", action="store_true", help="skip our step")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)



def make_batch(cfg, batch, seed):
    """BarcodeBERT-style batch: k-mer ids, 50% [MASK], labels = original k-mer class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = cfg.max_tokens
    original = rng.integers(2, cfg.vocab_size, (batch, t))
    lengths = rng.integers(int(0.9 * t), t + 1, batch)
    attn = np.arange(t)[None] < lengths[:, None]
    original = np.where(attn, original, 1)  # padding beyond the sequence: [UNK]-filled N k-mers
    masked = np.where(rng.random((batch, t)) < 0.5, 0, original)
    loss_mask = attn & (original >= 2)
    labels = np.where(loss_mask, original - 2, 0)
    return masked.astype(np.int32), attn, labels.astype(np.int32), loss_mask


def analytic_flops(cfg, batch):
    d, f, L, t = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.max_tokens
    per_layer = 4 * d * d + 2 * d * f  # qkv + out + mlp
    matmul_params = L * per_layer + d * cfg.num_labels
    tokens = batch * t
    return 6 * matmul_params * tokens + 12 * L * batch * t * t * d


def jax_step(args, cfg, data):
    """Our step as a blocking ``fn()`` over state it keeps, and its compile facts."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bioscan_jax.models import kmer_bert as kb

    ids, attn, labels, loss_mask = (jnp.asarray(x) for x in data)
    model = kb.KmerBertForMLM(cfg, rngs=nnx.Rngs(args.seed, dropout=args.seed + 1))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(1e-4 * args.batch / 64, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_fn(p, rest, ids, attn, labels, loss_mask):
        m = nnx.merge(graphdef, p, rest, copy=True)
        logits, _ = m(ids, attn)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        w = loss_mask.astype(jnp.float32)
        loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, nnx.state(m, nnx.Not(nnx.Param))

    def step(p, rest, opt_state, ids, attn, labels, loss_mask):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, rest, ids, attn, labels, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return p, rest, opt_state, loss

    jstep = jax.jit(step, donate_argnums=(0, 1, 2))
    t0 = time.perf_counter()
    compiled = jstep.lower(params, rest, opt_state, ids, attn, labels, loss_mask).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = None
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else None
        if ca and ca.get("flops", 0) > 0:
            xla_flops = float(ca["flops"])
    except Exception:  # cost analysis is optional
        pass
    state = {"carry": (params, rest, opt_state), "loss": None}

    def one():
        p, r, o, loss = compiled(*state["carry"], ids, attn, labels, loss_mask)
        state["carry"], state["loss"] = (p, r, o), loss
        jax.block_until_ready(loss)

    return one, dict(compile_s=compile_s, xla_flops=xla_flops, loss=lambda: float(state["loss"]))


def torch_step(args, cfg, data):
    """HF ``BertForTokenClassification`` + ``torch.optim.AdamW``, one blocking ``fn()`` a step."""
    import numpy as np
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if (args.device == "gpu" and torch.cuda.is_available()) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if args.device == "gpu" and dev.type != "cuda":
        raise RuntimeError("--device gpu but torch.cuda is not available")
    torch.manual_seed(args.seed)
    hcfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate, num_labels=cfg.num_labels, pad_token_id=0)
    model = transformers.BertForTokenClassification(hcfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4 * args.batch / 64, weight_decay=0.0)
    ids, attn, labels, loss_mask = data
    ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
    attn_t = torch.tensor(attn.astype(np.int64), device=dev)
    labels_t = torch.tensor(np.where(loss_mask, labels, -100), dtype=torch.long, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    state = {"loss": None}

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids_t, attention_mask=attn_t).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.num_labels), labels_t.view(-1),
                                                 ignore_index=-100)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        state["loss"] = loss

    return one, dict(loss=lambda: float(state["loss"].item()), torch_threads=torch.get_num_threads(),
                     attn_implementation=model.config._attn_implementation)


def pick_flops(xla_flops, analytic):
    """XLA's count when it is plausible; GPU cost analysis does not see library GEMMs."""
    if xla_flops and xla_flops >= 0.5 * analytic:
        return xla_flops, "xla"
    return analytic, "analytic"


def summarise(name, times, cpu, cfg, batch, flops, flops_source, peak, **extra):
    import statistics

    step = statistics.median(times)
    rec = dict(
        benchmark="bert_pretrain_step", impl=name, config=extra.pop("config"), batch=batch,
        tokens_per_sample=cfg.max_tokens, step_s=step, step_s_min=min(times), step_s_all=times,
        cpu_s_per_step=statistics.median(cpu),
        samples_per_s=batch / step, tokens_per_s=batch * cfg.max_tokens / step,
        flops_per_step=flops, flops_source=flops_source, flops_per_s=flops / step,
    )
    if peak:
        rec["fraction_of_matmul_peak"] = flops / step / peak
        analytic = extra.get("flops_analytic")
        if analytic:
            rec["fraction_of_matmul_peak_analytic"] = analytic / step / peak
    rec.update(extra)
    emit(**rec)
    return step


def main(argv=None):
    args = parse_args(argv)
    jax = configure_jax(args.device, args.dtype, args.tf32)
    import jax.numpy as jnp

    jax.config.update("jax_default_prng_impl", args.prng)
    from bioscan_jax.models import kmer_bert as kb

    cdtype = jnp.bfloat16 if args.dtype == "bf16" else None
    cfg = kb.get_variant(args.config, dtype=cdtype, remat=args.remat, attention_impl=args.attention)
    data = make_batch(cfg, args.batch, args.seed)
    device = str(jax.devices()[0].device_kind) if jax.devices() else "?"
    common = dict(attention=args.attention, config=args.config, dtype=args.dtype, device=args.device, jax_device=device,
                  jax_version=jax.__version__, cpu_count=os.cpu_count(),
                  load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    emit(benchmark="machine", **machine_info())

    peak_dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    peak, peak_t = matmul_peak(args.peak_n, args.peak_reps, peak_dtype)
    emit(benchmark="matmul_peak", n=args.peak_n, seconds=peak_t, flops_per_s=peak, **common)
    if not args.no_peaks:
        emit(benchmark="matmul_peaks", **matmul_peaks(args.peak_n, args.peak_reps, args.device,
                                                      with_torch=not args.no_torch))

    steps, facts = {}, {}
    if not args.no_jax:
        steps["jax_nnx"], facts["jax_nnx"] = jax_step(args, cfg, data)
    if not args.no_torch:
        try:
            steps["torch_hf"], facts["torch_hf"] = torch_step(args, cfg, data)
        except ImportError as e:
            emit(benchmark="bert_pretrain_step", impl="torch_hf", skipped=f"torch/transformers missing: {e}")
    timings = paired(steps, args.steps, args.warmup)

    analytic = analytic_flops(cfg, args.batch)
    if "jax_nnx" in timings:
        f = facts["jax_nnx"]
        flops, src = pick_flops(f["xla_flops"], analytic)
        summarise("jax_nnx", timings["jax_nnx"]["times"], timings["jax_nnx"]["cpu"], cfg, args.batch, flops, src,
                  peak, flops_analytic=analytic, flops_xla=f["xla_flops"], compile_s=f["compile_s"],
                  loss=f["loss"](), prng=args.prng, **common)
    if "torch_hf" in timings:
        f = facts["torch_hf"]
        summarise("torch_hf", timings["torch_hf"]["times"], timings["torch_hf"]["cpu"], cfg, args.batch, analytic,
                  "analytic", peak, loss=f["loss"](), torch_threads=f["torch_threads"],
                  attn_implementation=f["attn_implementation"], **common)
    if len(timings) == 2:
        ours, theirs = timings["jax_nnx"], timings["torch_hf"]
        emit(benchmark="bert_pretrain_step_comparison", config=args.config, batch=args.batch, dtype=args.dtype,
             device=args.device, pairs=args.steps, jax_step_s=statistics.median(ours["times"]),
             torch_step_s=statistics.median(theirs["times"]), jax_cpu_s=statistics.median(ours["cpu"]),
             torch_cpu_s=statistics.median(theirs["cpu"]), **pair_ratios(ours, theirs),
             **roofline(analytic, statistics.median(theirs["times"]), peak))


if __name__ == "__main__":
    main()
