"""Inference throughput, paired: what ``bioscan-jax embed`` / ``index`` run for a user (our
jitted forward over one batch, through :func:`bioscan_jax.eval.embed.embed_batches`) against HF
torch's ``BertModel`` under ``torch.inference_mode``, on the same weights and batch.

For each KmerBert variant, a random-init HF ``BertModel`` is saved with ``save_pretrained`` and
read back with :func:`bioscan_jax.convert.barcodebert.load` (the real loading path), so both sides
hold the same weights; both pool the last hidden layer over the attention mask (the BIOSCAN-5M
protocol). Outputs are checked to agree (max abs difference printed). Calls alternate
(ours, torch; torch, ours; ...) and each pair's speedup is reported (torch time / ours) with the
median and range; records/s of both; the machine line. One JSON line per result.

    python benchmarks/embed_benchmark.py                          # tiny, paper (8-4-4), 5_12_12 at batch 256
    python benchmarks/embed_benchmark.py --configs tiny --pairs 9
    python benchmarks/embed_benchmark.py --attention auto,einsum   # our implementations, same run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from _common import configure_jax, emit, machine_info, paired, pair_ratios


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,paper,5_12_12", help="KmerBert variants, comma separated")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--attention", default="auto,einsum",
                   help="our attention implementations, comma separated, each paired with torch in one run "
                        "(models.layers.ATTENTION_IMPLS; 'auto' is the default)")
    return p.parse_args(argv)


def hf_model(cfg, directory: str):
    """A random-init HF ``BertModel`` of ``cfg``'s sizes, saved in ``directory`` (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(0)
    hcfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=0)
    model = transformers.BertModel(hcfg, add_pooling_layer=False).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def bench(name: str, args) -> None:
    import jax
    import numpy as np
    import torch

    from bioscan_jax import sharding as mesh_lib
    from bioscan_jax.convert import barcodebert as bb_load
    from bioscan_jax.eval import embed as embed_lib
    from bioscan_jax.models import kmer_bert, layers

    cfg = kmer_bert.get_variant(name)
    rng = np.random.default_rng(0)
    t = cfg.max_tokens
    lengths = rng.integers(int(0.9 * t), t + 1, args.batch)
    mask = np.arange(t)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(2, cfg.vocab_size, (args.batch, t)), 1).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        theirs = hf_model(cfg, d)
        loaded = bb_load.load(d)
    mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    fn = bb_load.embed_fn(loaded.protocol)
    batch = {"ids": ids, "attention_mask": mask}
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask.astype(np.int64))
    out = {}
    impls = [a.strip() for a in args.attention.split(",") if a.strip()]

    def ours(impl):
        def run():
            layers.set_attention_impl(loaded.model, impl)
            out[impl] = embed_lib.embed_batches(loaded.model, [batch], fn, mesh=mesh, batch_size=args.batch)["embedding"]
        return run

    def torch_side():
        with torch.inference_mode():
            hidden = theirs(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            m = mask_t.unsqueeze(-1).to(hidden.dtype)
            out["torch"] = ((hidden * m).sum(1) / m.sum(1)).numpy()

    runs = paired({**{f"ours:{i}": ours(i) for i in impls}, "torch": torch_side}, args.pairs, args.warmup)
    for side, r in runs.items():
        s = statistics.median(r["times"])
        emit(benchmark="embed", impl=side, config=name, batch=args.batch, tokens=t, batch_s=s,
             records_per_s=args.batch / s, batch_s_all=r["times"])
    for impl in impls:
        diff = float(np.abs(out[impl] - out["torch"]).max())
        emit(benchmark="embed_comparison", config=name, attention=impl, batch=args.batch, max_abs_diff=diff,
             jax_devices=len(jax.devices()), **pair_ratios(runs[f"ours:{impl}"], runs["torch"]))


def main(argv=None):
    args = parse_args(argv)
    configure_jax("cpu", "f32", False)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    emit(benchmark="machine", **machine_info())
    for name in filter(None, (c.strip() for c in args.configs.split(","))):
        bench(name, args)


if __name__ == "__main__":
    main()
