"""Which XLA:CPU options make our step fastest on this machine: one paired benchmark per option
set, each in a fresh process (``XLA_FLAGS`` and glibc's malloc tunables are read at start).

Every row is the paired BarcodeBERT benchmark (``bert_step_benchmark.py``: our step and the
HF/PyTorch step interleaved in one process), so the ratio to torch of each option set is measured
against torch in the same run, and the rows can be compared with each other through the torch
step, which the options do not touch. Prints one JSON line per option set and a Markdown table
(the table in ``docs/performance.md`` comes from this script).

    python benchmarks/xla_cpu_flags_sweep.py --config 4_4_4 --batch 32 --pairs 3
    python benchmarks/xla_cpu_flags_sweep.py --only baseline,onednn --bench vit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> (XLA_FLAGS, extra environment).
OPTION_SETS: dict[str, tuple[str, dict[str, str]]] = {
    "baseline": ("", {}),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "onednn_custom_call": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true", {}),
    "onednn_fusion_dot": ("--xla_cpu_experimental_onednn_fusion_type=dot", {}),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", {}),
    "xnn_fusion_dot": ("--xla_cpu_experimental_xnn_fusion_type=dot", {}),
    "ynn_fusion_dot": ("--xla_cpu_experimental_ynn_fusion_type=dot", {}),
    # jaxlib 0.10 fuses dots (and reductions/elementwise ops around them) into YNNPACK by default;
    # an empty list turns that off, and the dots go to XLA's own (Eigen) kernels.
    "ynn_off": ("--xla_cpu_experimental_ynn_fusion_type=", {}),
    "vector_width_512": ("--xla_cpu_prefer_vector_width=512", {}),
    "no_multi_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", {}),
    "malloc_no_trim": ("", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4294967296:"
                                              "glibc.malloc.mmap_threshold=4294967296:"
                                              "glibc.malloc.top_pad=268435456"}),
}


def run_one(name: str, bench: str, args) -> dict:
    flags, extra = OPTION_SETS[name]
    env = {**os.environ, **extra, "XLA_FLAGS": flags}
    script = os.path.join(HERE, "bert_step_benchmark.py" if bench == "bert" else "vit_step_benchmark.py")
    cmd = [sys.executable, script, "--batch", str(args.batch), "--steps", str(args.pairs), "--warmup", "1",
           "--no-peaks", "--peak-n", str(args.peak_n)]
    cmd += ["--config", args.config] if bench == "bert" else ["--variant", args.variant]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    comparison = next((r for r in records if r.get("benchmark", "").endswith("_comparison")), None)
    peak = next((r for r in records if r.get("benchmark") == "matmul_peak"), {})
    row = {"options": name, "xla_flags": flags, "env": extra, "rc": proc.returncode,
           "jax_f32_matmul_gflops": peak.get("flops_per_s", 0) / 1e9}
    if comparison is None:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    row.update({k: comparison[k] for k in ("jax_step_s", "torch_step_s", "jax_cpu_s", "torch_cpu_s", "speedup",
                                            "speedup_cpu_time")})
    row["speedup_min_max"] = [comparison["speedup_pairs"]["min"], comparison["speedup_pairs"]["max"]]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=["bert", "vit"], default="bert")
    p.add_argument("--config", default="4_4_4")
    p.add_argument("--variant", default="B/16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=2048)
    p.add_argument("--only", default="", help="comma-separated option sets (default: all)")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(OPTION_SETS)
    unknown = [n for n in names if n not in OPTION_SETS]
    if unknown:
        p.error(f"unknown option sets {unknown}; known: {list(OPTION_SETS)}")
    rows = []
    for name in names:
        row = run_one(name, args.bench, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| options | XLA_FLAGS / env | jnp.dot f32 GFLOP/s | ours s/step | torch s/step | speedup (median, min–max) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        what = r["xla_flags"] or " ".join(f"{k}={v}" for k, v in r["env"].items()) or "(none)"
        if "error" in r:
            print(f"| {r['options']} | `{what}` | | | | failed: {r['error']} |")
            continue
        lo, hi = r["speedup_min_max"]
        print(f"| {r['options']} | `{what}` | {r['jax_f32_matmul_gflops']:.0f} | {r['jax_step_s']:.2f} | "
              f"{r['torch_step_s']:.2f} | {r['speedup']:.2f} ({lo:.2f}–{hi:.2f}) |")


if __name__ == "__main__":
    main()
