#!/usr/bin/env bash
# The GPU check of the torch training step, in one call on a lent device machine
# (issue 11: EfficientNetB1, 240 px, bf16, a large batch; aim >= 2,000 img/s on one H100).
#
#   bash bench/gpu.sh prepare   # here (PyPI reachable): the wheels the device lacks -> .whl/
#   bash bench/gpu.sh run       # there: run(command="bash bench/gpu.sh run", carry=[".whl"])
#
# The device image (Python 3.12) has torch, numpy, Pillow, OpenCV, PyYAML, pytest and the rest
# of Keras' needs (absl-py, h5py, ml-dtypes, rich) but not Keras or pydantic, and reaches no
# package index; `prepare` downloads those at the versions requirements.lock pins (so the
# device runs what CI tests), `run` installs them
# with --no-index into /tmp/site, runs the `gpu` tests of tests/test_fast_layers.py (host
# syncs a step on CUDA; the CUDA-graph step trains as the eager one), then bench/train.py
# on torch with the fast layers, eager and as one CUDA graph, at each batch in BATCHES.
# Everything printed is also written to $OUT/gpu.log where $OUT is set (the device tool).
#
# Settings (environment): BATCHES (default "512 1024"), SIZE (240), BACKBONE
# (efficientnetb1), STEPS (30), INSTALL (1; 0 uses the packages already importable).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(keras namex optree pydantic pydantic-core pydantic-settings
        python-dotenv annotated-types typing-inspection)

pinned() {  # NAME==VERSION as requirements.lock pins it
    local v
    v=$(grep -i -m1 "^$1==" requirements.lock) || { echo "bench/gpu.sh: $1 is not pinned in requirements.lock" >&2; exit 2; }
    echo "$v"
}

prepare() {
    mkdir -p .whl
    grep -qx '/.whl/' .gitignore || { echo "bench/gpu.sh: .gitignore must ignore /.whl/" >&2; exit 2; }
    local specs=()
    for name in "${WHEELS[@]}"; do specs+=("$(pinned "$name")"); done
    # pure-Python wheels match any platform; the others need the device's (x86-64 manylinux, cp312)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
    echo "bench/gpu.sh: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)); on the device:"
    echo '  run(command="bash bench/gpu.sh run", carry=[".whl"], timeout_s=600)'
}

run() {
    if [[ "${INSTALL:-1}" == 1 ]]; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "bench/gpu.sh: no wheels in .whl/: run 'bash bench/gpu.sh prepare' here first, and carry .whl" >&2; exit 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, keras; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| keras', keras.__version__)"
    local status=0
    # -p no:cacheprovider: the tree there may be read-only; -o addopts=: select the gpu tier
    python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests/test_fast_layers.py || status=$?
    for batch in ${BATCHES:-512 1024}; do
        python3 bench/train.py --backend torch --fast on --cuda-graphs --backbone "${BACKBONE:-efficientnetb1}" \
            --image-size "${SIZE:-240}" --precision bf16 --batch-size "$batch" --steps "${STEPS:-30}" || status=$?
    done
    return "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    run)
        if [[ -n "${OUT:-}" ]]; then
            run 2>&1 | tee "$OUT/gpu.log"  # pipefail (above): run's status, not tee's
        else
            run
        fi ;;
    *) echo "usage: bash bench/gpu.sh prepare|run" >&2; exit 2 ;;
esac
