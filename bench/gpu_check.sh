#!/usr/bin/env bash
# The one prepared GPU check of the GPU-truth issue: installs virchow-rt from this working tree without
# network, then runs every step of virchow_rt/benchmark/gpu_check.py (GPU tests, benchmarks, bandwidth,
# resize kernel, whole slides) within a time budget, writing at most 8 files into --out.
#
#   bench/gpu_check.sh --out "$OUT/gpu-check"     on the GPU machine (default budget 480 s)
#   bench/gpu_check.sh --dry-run --out DIR        the same steps, tiny, on a CPU machine (CI runs this)
#   bench/gpu_check.sh --fetch-wheels             on this CPU machine: download into .whl/ the wheels the
#                                                 GPU image lacks (OpenSlide), for `carry: [".whl"]`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    # the GPU image: Python 3.12 on x86-64, no openslide-python / openslide-bin (KINDS.md's package list)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl openslide-python openslide-bin
    ls -l .whl
    exit 0
fi

# wheels carried in .whl/ (if any) go to a private folder; the project itself is installed editable, or
# put on PYTHONPATH where pip cannot build it offline
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/virchow-rt-site .whl/*.whl
    export PYTHONPATH=/tmp/virchow-rt-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import virchow_rt" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
