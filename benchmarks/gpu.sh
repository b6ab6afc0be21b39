#!/usr/bin/env bash
# The CUDA checks and benchmarks in one call, for a GPU machine lent for a few minutes.
#
#   OUT=/some/dir bash benchmarks/gpu.sh        # default OUT: benchmarks/results/gpu
#
# Writes under $OUT (six files):
#   cuda-tests.log     pytest tests/test_cuda.py tests/test_compile.py -k cuda (-rs: skips shown)
#   gpu.json           benchmarks/gpu.py: unroll time, Checkpointed memory, clients vs a loop
#   compile-cuda.json  benchmarks/compile.py --devices cuda --quick
#   memory-cuda.json   benchmarks/memory.py --device cuda: peak memory of the methods vs plain
#   memory-cuda.png    the same, log-log against K
#   gpu.log            everything printed, with each part's time and the total
#
# Needs: a CUDA build of torch, and numpy, pytest, hypothesis and optree (plus optree's own
# typing-extensions); pytest-xdist and pytest-timeout are used when present. Nothing is
# downloaded: the package runs from src/ (PYTHONPATH). Wheels for missing packages can be carried
# in .whl/ (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl
# optree==0.20.0, then name .whl in the device call's carry); they are installed from there into
# a temporary folder. A missing package or GPU stops the script at once with a message.
#
# Every part runs under `timeout`, within a total budget (GPU_BUDGET_S, default 600 s): a part
# that would not fit is skipped and said so, so one stuck part cannot eat the session.
#
# HYPERGRAD_GPU_SH_CPU=1 rehearses the script on a machine without a GPU: the tests run on the
# CPU (HYPERGRAD_TEST_DEVICE=cpu) without the compiled cases, gpu.py runs --device cpu --quick,
# and compile.py is skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_BUDGET_S:-600}"
REHEARSAL="${HYPERGRAD_GPU_SH_CPU:-0}"
T0=$SECONDS

main() { # the body is not indented: it holds a here-document
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

echo "== benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S}s, OUT=$OUT"
echo "   commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PY" --version 2>&1)"

# --------------------------------------------------------------------------- dependencies
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/hypergrad-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/hypergrad-site"
fi
missing="$("$PY" - <<'EOF'
import importlib

missing = []
for name in ("torch", "numpy", "optree", "pytest", "hypothesis"):
    try:
        importlib.import_module(name)
    except Exception as error:  # an ImportError, or a broken install
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("; ".join(missing))
EOF
)"
if [[ -n "$missing" ]]; then
    echo "gpu.sh: missing Python packages, nothing run: $missing."
    echo "  This machine cannot download. Carry wheels in .whl/, e.g. on a machine with pip:"
    echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\"
    echo "      --implementation cp --platform manylinux_2_28_x86_64 \\"
    echo "      --platform manylinux_2_17_x86_64 -d .whl optree==0.20.0"
    exit 3
fi
"$PY" -c "import hypergrad, optree, torch; print('   torch', torch.__version__, \
'(CUDA', torch.version.cuda, ') optree', optree.__version__, 'hypergrad from', hypergrad.__file__)"

# --------------------------------------------------------------------------- the GPU
DEVICE=cuda
if [[ "$REHEARSAL" == 1 ]]; then
    DEVICE=cpu
    echo "== HYPERGRAD_GPU_SH_CPU=1: a rehearsal on the CPU, not a GPU measurement"
else
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu.sh: no nvidia-smi on this machine: no NVIDIA GPU; nothing run."
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: torch.cuda.is_available() is False (torch built without CUDA, or no"
        echo "  usable GPU); nothing run."
        exit 2
    fi
    "$PY" -c "import torch; print('  ', torch.cuda.get_device_name(), \
torch.cuda.get_device_capability())"
fi

# --------------------------------------------------------------------------- parts
SUMMARY=()
STATUS=0

# part NAME CAP LOG CMD...: run CMD under timeout (CAP, or what is left of the budget), its
# output also copied to LOG when LOG is not empty; skipped when under 30 s of budget are left.
part() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET_S - (SECONDS - T0) - 10))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        echo "== $name: SKIPPED, ${left}s of the budget left"
        SUMMARY+=("$name: skipped (budget)")
        STATUS=1
        return 0
    fi
    echo
    echo "== $name (timeout ${limit}s): $*"
    local start=$SECONDS rc=0
    if [[ -n "$log" ]]; then
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log" || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    fi
    local what="ok"
    if ((rc == 124 || rc == 137)); then
        what="TIMED OUT after ${limit}s"
    elif ((rc != 0)); then
        what="FAILED (exit $rc)"
    fi
    ((rc == 0)) || STATUS=1
    SUMMARY+=("$name: $what, $((SECONDS - start))s")
    echo "== $name: $what, $((SECONDS - start))s"
}

# 1. The CUDA tests. -W: torch's note that TF32 is off (raised by inductor when a float32 graph
#    compiles on an Ampere-or-later GPU) would be an error under filterwarnings = error.
#    -p no:benchmark: pytest-benchmark (in the GPU image) warns under xdist, an error here too.
test_env=(HYPERGRAD_TEST_DEVICE="$DEVICE") # cuda: fail, rather than skip, if CUDA is not usable
pytest_args=(tests/test_cuda.py tests/test_compile.py -k cuda -rs -v -p no:cacheprovider
    -p no:benchmark -W "ignore:TensorFloat32 tensor cores:UserWarning")
if "$PY" -c "import xdist" 2>/dev/null; then
    # the cold compiles run side by side, 4 processes x 4 inductor compile threads
    pytest_args+=(-n "${GPU_TEST_WORKERS:-4}")
    test_env+=(TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-4}")
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    pytest_args+=(--timeout 200)
fi
if [[ "$REHEARSAL" == 1 ]]; then
    pytest_args+=(-k "cuda and not compiled") # the last -k wins: no cold compiles on the CPU
fi
part "tests" 210 "$OUT/cuda-tests.log" env "${test_env[@]}" "$PY" -m pytest "${pytest_args[@]}"

# 2. compile=True on CUDA: cold compiles (mlp64, SGD and Adam, 5 steps and 1 step per graph).
if [[ "$REHEARSAL" == 1 ]]; then
    SUMMARY+=("compile.py: skipped (rehearsal)")
else
    part "compile.py" 150 "" "$PY" benchmarks/compile.py --devices cuda --quick \
        --output "$OUT/compile-cuda.json"
fi

# 3. The eager benchmarks, told their budget so that they end cleanly with what they measured.
left=$((BUDGET_S - (SECONDS - T0) - 10))
gpu_args=(--device "$DEVICE" --output "$OUT/gpu.json" --budget $((left > 40 ? left - 25 : 15)))
if [[ "$REHEARSAL" == 1 ]]; then
    gpu_args+=(--quick)
fi
part "gpu.py" 240 "" "$PY" benchmarks/gpu.py "${gpu_args[@]}"

# 4. Peak memory of hg.Checkpointed(slots=4) (and micro-batches) against plain training on a
#    3.3M- and a 106M-parameter GPT-like model (torch.cuda.max_memory_allocated).
memory_args=(--device "$DEVICE" --results "$OUT")
if [[ "$REHEARSAL" == 1 ]]; then
    memory_args=(--device cpu --quick --results "$OUT")
fi
part "memory.py" 180 "" "$PY" benchmarks/memory.py "${memory_args[@]}"

# --------------------------------------------------------------------------- summary
echo
echo "== summary ($((SECONDS - T0))s in all, budget ${BUDGET_S}s)"
for line in "${SUMMARY[@]}"; do echo "   $line"; done
if [[ -f "$OUT/cuda-tests.log" ]]; then
    echo "   pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/cuda-tests.log" \
        | grep -E '^=+ .* in [0-9.]+s' | tail -1 || echo 'no summary line (cut off?)')"
fi
echo "   files: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "== total time: $((SECONDS - T0))s"
return "$STATUS"
}

# Everything printed also goes to gpu.log; the pipeline waits for tee, so the log is complete
# when the script returns, and pipefail gives main's status.
main 2>&1 | tee "$OUT/gpu.log"
