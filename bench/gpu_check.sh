#!/usr/bin/env bash
# The one prepared GPU check of the GPU-truth issue (README: "The GPU check"). Runs every step of
# bench/gpu_check.py (wheels carried in .whl/ installed offline, imports and environment, GPU tests,
# bandwidth, resize kernel, benchmarks, whole slides) within a budget counted from here, writing at most
# 6 files into --out, each result kept as soon as it exists.
#
#   bench/gpu_check.sh --out "$OUT/gpu-check"     on the GPU machine (budget 480 s; device timeout_s 570)
#   bench/gpu_check.sh --dry-run --out DIR        the same steps, tiny, on a CPU machine (CI runs this)
#   bench/gpu_check.sh --fetch-wheels             on this CPU machine: download into .whl/ the wheels the
#                                                 GPU image lacks (OpenSlide), for `carry: [".whl"]`
#
# The interpreter is $PYTHON, else python3: on the GPU image the one that holds torch. virchow-rt is not
# installed there and pip cannot build it offline, so it is imported from this tree through PYTHONPATH,
# which every process the check starts inherits (tests, `virchow-rt bench`, bench/slides_throughput.py).
set -euo pipefail
export GPU_CHECK_T0
GPU_CHECK_T0=$(date +%s.%N)  # the budget counts from here: the install and the imports are in it
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

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
