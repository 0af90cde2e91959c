"""Summarises benchmarks/gpu_suite.sh's JSON lines: per case, our step's MFU against the chip's
dense bf16 peak (or, on a chip not in the table, the matmul peak measured in the same case), our
speed over torch, and the image pipeline's samples/s per host core. Prints one JSON line.

    python benchmarks/gpu_suite_summary.py benchmarks/out/gpu_suite.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

#: Dense bf16 tensor-core peak FLOP/s by device kind (NVIDIA data sheets, SXM parts).
CHIP_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
STEP_BENCHMARKS = ("bert_pretrain_step", "vit_fwd_bwd", "clibd_step")


def chip_peak(device_kind: str | None) -> float | None:
    for name, peak in CHIP_BF16_PEAK.items():
        if device_kind and name in device_kind:
            return peak
    return None


def summarise(records: list[dict]) -> dict:
    by_case = defaultdict(list)
    for r in records:
        by_case[r.get("case")].append(r)
    cases = {}
    for case, rows in by_case.items():
        out: dict = {}
        status = [r for r in rows if r.get("benchmark") == "gpu_suite_case"]
        if status:
            out["rc"], out["seconds"] = status[-1]["rc"], status[-1]["seconds"]
        measured_peak = next((r["flops_per_s"] for r in rows if r.get("benchmark") == "matmul_peak"), None)
        kind = next((r.get("jax_device") or r.get("device") for r in rows
                     if r.get("benchmark") in STEP_BENCHMARKS and not r.get("skipped")), None)
        peak = chip_peak(kind)  # both stacks ran on this chip
        if kind:
            out["device"] = kind
        for r in rows:
            if r.get("benchmark") not in STEP_BENCHMARKS or r.get("skipped"):
                continue
            impl = r.get("impl", "jax_nnx")
            entry = {"step_s": r.get("step_s"), "flops_per_s": r.get("flops_per_s"),
                     "samples_per_s": r.get("samples_per_s", r.get("images_per_s"))}
            if r.get("flops_per_s"):
                if peak:
                    entry["mfu_bf16_peak"] = r["flops_per_s"] / peak
                elif measured_peak:
                    entry["fraction_of_measured_matmul_peak"] = r["flops_per_s"] / measured_peak
            out[impl] = entry
        comparison = next((r for r in rows if str(r.get("benchmark", "")).endswith("_comparison")), None)
        if comparison:
            out["speedup_over_torch"] = comparison.get("speedup")
        pipeline = [r for r in rows if r.get("benchmark") == "pipeline" and r.get("pipeline") == "image_train_224"]
        if pipeline:
            out["image_pipeline_samples_per_s"] = {str(r["worker_count"]): r["samples_per_s"] for r in pipeline}
            best = max(pipeline, key=lambda r: r["samples_per_s"])
            out["image_pipeline_samples_per_s_per_core"] = best["samples_per_s"] / max(1, best["worker_count"] or 1)
        cases[case] = out
    failed = sorted(c for c, v in cases.items() if v.get("rc", 0) != 0)
    return {"benchmark": "gpu_suite_summary", "cases": cases, "failed_cases": failed}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        records = [json.loads(line) for line in f if line.startswith("{")]
    summary = summarise(records)
    print(json.dumps(summary))
    return 1 if summary["failed_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
