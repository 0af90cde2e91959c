r"""Planner calibration: the memory XLA plans for a train step vs what one real step uses.

    python benchmarks/memory_calibration.py                       # default cases, this backend
    python benchmarks/memory_calibration.py --cases bb_paper_b32,clibd_paper_b64_remat

For each case (one fresh process each, so the device's peak-memory counter starts at zero) the
step is built exactly as ``python -m bioscan_jax.plan`` builds it (same model, loss, optimizer,
bf16 and sharding code, a one-device mesh), compiled by **this** backend, and run once on random
inputs. One JSON line per case: the planned per-device numbers (``arguments``, ``temporaries``,
``peak``) and the measurement (GPU: ``peak_bytes_in_use``; CPU: resident memory), plus
``ratio`` = measured / planned. The ``remat_toy`` case shows how rematerialisation appears in
XLA's estimate with unrolled layers and with a scan over layers.

The models are built directly (no config files), so this runs with only JAX, Flax and Optax.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ("remat_toy", "bb_paper_b32", "bb_paper_b512", "clibd_paper_b64", "clibd_paper_b64_remat")
TEXT_VOCAB = 15_000


def _spec(name: str):
    from bioscan_jax.data import dna, pipeline
    from bioscan_jax.models import kmer_bert, text, towers, vit
    from bioscan_jax.tasks import StepSpec
    from bioscan_jax.train import losses
    from bioscan_jax.train.contrastive import contrastive_loss

    parts = name.split("_")
    batch = int(next(p for p in parts if p.startswith("b") and p[1:].isdigit())[1:])
    remat = "remat" in parts
    if parts[0] == "bb":  # BarcodeBERT pretraining, configs/barcodebert.py:paper settings
        cfg = kmer_bert.get_variant(parts[1], remat=remat)
        shapes = pipeline.dna_batch_spec(batch, dna.tokenizer_for("bioscan5m", cfg.k, max_nucleotides=660), mlm=True)
        return StepSpec("barcodebert/pretrain", lambda rngs: kmer_bert.KmerBertForMLM(cfg, rngs=rngs),
                             losses.mlm_loss, shapes, {"batch_size": batch, "bf16": False},
                             {"lr": 1e-4, "lr_ref_batch": 64}, [f"BarcodeBERT {parts[1]}, remat={remat}"])
    if parts[0] == "clibd":  # configs/clibd.py:paper settings (bf16, three towers)
        mcfg = towers.ClibdConfig(
            image=vit.get_variant("B/16", image_size=224, remat=remat),
            dna=kmer_bert.get_variant("5_12_12", remat=remat),
            text=text.get_variant("bert-small", vocab_size=TEXT_VOCAB, remat=remat), embed_dim=768)
        shapes = pipeline.clibd_batch_spec(batch, tokenizer=dna.tokenizer_for("v1", 5, max_nucleotides=660),
                                           text_length=20, image_size=224, label_ranks=())

        def loss_fn(model, batch, *, train):
            features, _ = model(batch)
            return contrastive_loss(features, model.log_scale[...])

        return StepSpec("clibd", lambda rngs: towers.ClibdModel(mcfg, rngs=rngs), loss_fn, shapes,
                             {"batch_size": batch, "bf16": True},
                             {"lr": 5e-5, "lr_ref_batch": 500, "weight_decay": 0.01},
                             [f"CLIBD paper towers, bf16, remat={remat}"])
    raise ValueError(f"unknown case {name!r}; cases: {CASES}")


def _remat_toy() -> list[dict]:
    """12 residual MLP layers, [4096, 256] activations: temporaries with/without remat, unrolled
    and scanned."""
    import jax
    import jax.numpy as jnp

    def layer(w, x):
        return jnp.tanh(jnp.tanh(x @ w) @ w.T) + x

    def unrolled(ws, x, remat):
        f = jax.checkpoint(layer) if remat else layer
        for i in range(ws.shape[0]):
            x = f(ws[i], x)
        return (x ** 2).sum()

    def scanned(ws, x, remat):
        f = jax.checkpoint(layer) if remat else layer
        x, _ = jax.lax.scan(lambda h, w: (f(w, h), None), x, ws)
        return (x ** 2).sum()

    ws = jax.ShapeDtypeStruct((12, 256, 1024), jnp.float32)
    x = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    out = []
    for name, fn in (("unrolled", unrolled), ("scan", scanned)):
        for remat in (False, True):
            compiled = jax.jit(jax.grad(lambda w, h: fn(w, h, remat))).lower(ws, x).compile()
            out.append({"layers": name, "remat": remat,
                        "temporaries_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20})
    return out


def run_case(name: str) -> dict:
    import jax

    from bioscan_jax import plan

    device = jax.local_devices()[0]
    base = {"benchmark": "memory_calibration", "case": name, "backend": jax.default_backend(),
            "device": device.device_kind}
    if name == "remat_toy":
        return {**base, "results": _remat_toy()}
    spec = _spec(name)
    config = {"seed": 0, "sharding_rules": None}
    t0 = time.perf_counter()
    result, compiled, setup, abstract_batch = plan.plan(config, name, {"data": 1, "fsdp": 1, "tensor": 1}, spec)
    out = {**base, "notes": result.notes, "global_batch": result.global_batch, "num_params": result.num_params,
           "compile_s": result.compile_s, "planned": {k: getattr(result, k) / 2**30 for k in
                                                      ("params", "optimizer", "arguments", "temporaries", "peak")}}
    try:
        m = plan.measure(result, compiled, setup, abstract_batch, spec, config)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it as the measurement
        out["measured_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    else:
        out["measured"] = {k: (v / 2**30 if k.endswith("bytes") else v) for k, v in m.items()}
        out["ratio"] = m["total_bytes"] / result.peak
    out["wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(args.one)), flush=True)
        return
    for name in args.cases.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name],
                              capture_output=True, text=True)
        lines = [line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            print(lines[0], flush=True)
        else:
            error = {"benchmark": "memory_calibration", "case": name, "error": proc.stderr[-1500:]}
            print(json.dumps(error), flush=True)


if __name__ == "__main__":
    main()
