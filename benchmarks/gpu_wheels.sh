#!/usr/bin/env bash
# Wheels for benchmarks/gpu_suite.sh on a bare GPU machine (Python 3.12, CUDA JAX and torch, no
# registry access): every package of this project's environment except JAX, torch, CUDA,
# TensorFlow and the scientific base (numpy, scipy), at the versions installed here, as
# cp312 manylinux / pure-Python wheels in .whl/ (git-ignored; carry it to the machine).
#
#   bash benchmarks/gpu_wheels.sh            # run where the package registries are reachable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
skip='^(jax|jaxlib|jax-cuda.*|jax-plugins.*|torch|triton|nvidia-.*|tensorflow.*|tf-keras|keras|numpy|scipy|ml-dtypes|opt-einsum|pip|setuptools|wheel|bioscan-jax|pytest.*|hypothesis|pyflakes|tensorboard.*|h5py|grpcio|libclang|flatbuffers|gast|google-pasta|astunparse|wrapt)$'
failed=()
while IFS='==' read -r name _ version; do
  norm=$(echo "$name" | tr 'A-Z_' 'a-z-')
  [[ "$norm" =~ $skip ]] && continue
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      --platform any -d "$DEST" "$name==$version" 2>/dev/null; then
    failed+=("$name==$version")
  fi
done < <("$PY" -m pip list --format=freeze --exclude-editable)
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
if ((${#failed[@]})); then echo "gpu_wheels: no cp312 wheel for: ${failed[*]}"; fi
