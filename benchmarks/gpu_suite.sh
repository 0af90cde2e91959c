#!/usr/bin/env bash
# The GPU benchmark suite: one command, JSON lines, under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_suite.sh             # on a GPU machine (writes $OUT or benchmarks/out/)
#   bash benchmarks/gpu_suite.sh --dry-run   # the same code path on the CPU, tiny shapes (CI)
#
# Cases, each a benchmark script of this folder run in its own process (its JSON lines are
# tagged with the case and collected in gpu_suite.jsonl):
#   bert_*     BarcodeBERT MLM step (4_4_4 and paper, f32 and bf16, batch 32 and 256; cuDNN
#              attention for bf16), ours vs HF BertForTokenClassification in the same run
#   vit_*      ViT-B/16 forward+backward, bf16, img/s, ours vs HF ViTModel
#   clibd_*    one CLIBD paper-config training step (three towers, contrastive loss)
#   pipeline   the image input pipeline's samples/s per host core (synthetic data)
# then one gpu_suite_summary line: MFU of each step against the chip's dense bf16 peak
# (H100/H200: 989 TFLOP/s) and our speed over torch.
#
# A bare machine (Python 3.12, CUDA JAX, torch; no grain, tensorflow-datasets, ml_collections,
# array-record): the wheels made by benchmarks/gpu_wheels.sh in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python}
OUT_DIR=${OUT:-benchmarks/out}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.jsonl"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'PY'
import importlib.util
mods = ["grain", "tensorflow_datasets", "ml_collections", "array_record", "flax", "optax", "orbax.checkpoint",
        "transformers", "PIL", "pandas"]
print(" ".join(m for m in mods if importlib.util.find_spec(m.split(".")[0]) is None))
PY
)
if [[ -n "$missing" ]]; then
  if [[ -d .whl ]]; then
    echo "gpu_suite: installing from .whl/: $missing" >&2
    "$PY" -m pip install -q --no-index --find-links .whl -e . --no-deps
    "$PY" -m pip install -q --no-index --find-links .whl grain tensorflow-datasets ml_collections array-record \
      flax optax orbax-checkpoint transformers pillow pandas || echo "gpu_suite: some wheels missing" >&2
  else
    echo "gpu_suite: missing $missing and no .whl/ (make it with benchmarks/gpu_wheels.sh)" >&2
  fi
fi

if ((DRY)); then
  DEV=cpu; STEPS="--steps 1 --warmup 1"; PEAK="--peak-n 256"
  BERT_CASES=("bert_tiny_f32_b4:--config tiny --batch 4 --dtype f32"
              "bert_tiny_bf16_b4:--config tiny --batch 4 --dtype bf16")
  VIT_CASES=("vit_ti_f32_b2:--variant Ti/16 --image-size 32 --batch 2 --dtype f32")
  CLIBD_CASES=("clibd_tiny:--config=configs/clibd.py --config.train.batch_size=4 --steps 1")
  PIPELINE="--records 300 --workers 0 --seconds 1 --build-rounds 1"
  export JAX_PLATFORMS=cpu
else
  DEV=gpu; STEPS="--steps 10 --warmup 3"; PEAK="--peak-n 8192"
  BERT_CASES=("bert_444_f32_b32:--config 4_4_4 --batch 32 --dtype f32"
              "bert_444_bf16_b32:--config 4_4_4 --batch 32 --dtype bf16 --attention cudnn"
              "bert_444_bf16_b256:--config 4_4_4 --batch 256 --dtype bf16 --attention cudnn"
              "bert_paper_f32_b32:--config paper --batch 32 --dtype f32"
              "bert_paper_bf16_b256:--config paper --batch 256 --dtype bf16 --attention cudnn")
  VIT_CASES=("vit_b16_bf16_b256:--variant B/16 --batch 256 --dtype bf16 --attention cudnn")
  CLIBD_CASES=("clibd_paper_b256:--config=configs/clibd.py:paper --config.train.batch_size=256 --text-vocab 30522 --steps 5")
  PIPELINE="--records 4000 --workers 0 2 4 8 --seconds 10 --build-rounds 1"
fi

run_case() {  # name, limit (s), command...: JSON lines tagged with the case go to $LOG
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" 2>"$OUT_DIR/$name.stderr" | while IFS= read -r line; do
    [[ "$line" == \{* ]] && echo "{\"case\": \"$name\", ${line:1}" >> "$LOG"
  done
  local rc=${PIPESTATUS[0]}
  echo "{\"case\": \"$name\", \"benchmark\": \"gpu_suite_case\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$LOG"
  echo "gpu_suite: $name rc=$rc in $((SECONDS - t0)) s" >&2
}

for case in "${BERT_CASES[@]}"; do
  run_case "${case%%:*}" 240 "$PY" benchmarks/bert_step_benchmark.py --device "$DEV" $STEPS $PEAK ${case#*:}
done
for case in "${VIT_CASES[@]}"; do
  run_case "${case%%:*}" 240 "$PY" benchmarks/vit_step_benchmark.py --device "$DEV" $STEPS $PEAK ${case#*:}
done
for case in "${CLIBD_CASES[@]}"; do
  run_case "${case%%:*}" 300 "$PY" benchmarks/clibd_step_benchmark.py ${case#*:}
done
run_case pipeline 300 "$PY" benchmarks/data_benchmark.py $PIPELINE --workdir "$OUT_DIR/data"

"$PY" benchmarks/gpu_suite_summary.py "$LOG" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"  # non-zero when a case failed
