#!/usr/bin/env bash
# GPU readiness (issue #12): every CUDA test and the GPU benchmarks, in at most 5 minutes on one
# GPU, results in benchmarks/results_gpu.md.
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine, from a fresh clone or a checkout
#   bash benchmarks/gpu.sh --cpu-check     # functional check of this script without a GPU
#
# Steps:
#   1. install, only if needed: `pip install torch==2.13.0 -e ".[test]"` when torch is missing;
#      with torch present but the package or its test extras missing, the same command pinned to
#      the installed torch (so pip never replaces it);
#   2. refuse (exit 3) unless torch sees a CUDA device;
#   3. the CUDA tests: every test marked `gpu` or carrying a skipif whose reason names CUDA
#      (selected by a small pytest plugin written below, so a CUDA test is found whatever its
#      name); none of them may skip (time limit 90 s);
#   4. benchmarks/bench_gpu.py: MBF/Adam and MBF/KFAC on ResNet32 and VGG16-BN, MBF/SGD-m on the
#      MNIST autoencoder, timings synchronised (time limit 200 s; 120 s of timed rounds);
#   5. where 2 CUDA devices exist: `train` under torchrun on 2 GPUs (nccl) against one process
#      on one GPU (per-step losses, float64, mlp-digits: mbf, kfac, kpsvd), and
#      benchmarks/bench_torchrun.py --device cuda (steps/s, 1 GPU against 2); skipped otherwise;
#   6. benchmarks/results_gpu.md: machine, commit, the test summary and the benchmark tables.
# The exit status is 0 only if the tests passed and the benchmarks ran.
#
# --cpu-check runs steps 3-5 on the CPU without refusing: the CUDA tests are selected and must
# all skip for want of CUDA, and bench_gpu.py runs with `--device cpu --quick` on ResNet32 at
# batch 2. It writes to $GPU_SH_OUT (default benchmarks/results_gpu_cpu_check.md), never to
# results_gpu.md.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
mode=gpu
if [[ $# -gt 0 ]]; then
    if [[ $1 == --cpu-check && $# -eq 1 ]]; then
        mode=cpu
    else
        echo "gpu.sh: unknown arguments '$*'; usage: bash benchmarks/gpu.sh [--cpu-check]" >&2
        exit 2
    fi
fi
if [[ $mode == gpu ]]; then
    out=benchmarks/results_gpu.md
else
    out=${GPU_SH_OUT:-benchmarks/results_gpu_cpu_check.md}
fi
python=${PYTHON:-python}
start=$SECONDS

# ---------------------------------------------------------------- 1. install if needed
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu.sh: torch is missing; installing torch==2.13.0 and the package with its test extras"
    "$python" -m pip install torch==2.13.0 -e ".[test]" || exit 1
elif ! "$python" -c "import mbf_analysis, pytest, backpack, hypothesis" 2>/dev/null; then
    torch_version=$("$python" -c "import torch; print(torch.__version__)")
    echo "gpu.sh: installing the package and its test extras next to torch $torch_version"
    "$python" -m pip install "torch==$torch_version" -e ".[test]" || exit 1
fi

# ---------------------------------------------------------------- 2. CUDA or refuse
if [[ $mode == gpu ]]; then
    if ! "$python" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    sys.exit(
        f"gpu.sh: refused: torch {torch.__version__} ({build}) sees no CUDA device "
        "(torch.cuda.is_available() is False), so the CUDA tests and GPU benchmarks cannot "
        "run. Run this script on a machine with an NVIDIA GPU and a CUDA build of torch "
        "2.13.0; `bash benchmarks/gpu.sh --cpu-check` checks the script itself on a CPU."
    )
print(f"gpu.sh: {torch.cuda.device_count()} CUDA device(s); using {torch.cuda.get_device_name(0)}")
EOF
    then
        exit 3
    fi
fi

# ---------------------------------------------------------------- 3. the CUDA tests
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/cuda_tests_only.py" <<'EOF'
"""pytest plugin: keep only the CUDA tests (marked ``gpu``, or skipped when CUDA is missing)."""


def _is_cuda_test(item):
    if item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        if "cuda" in str(mark.kwargs.get("reason", "")).lower():
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _is_cuda_test(item)]
    dropped = [item for item in items if not _is_cuda_test(item)]
    config.hook.pytest_deselected(items=dropped)
    items[:] = keep
EOF
echo "gpu.sh: CUDA tests"
PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" timeout 90 "$python" -m pytest -q -rA \
    -p cuda_tests_only -p no:cacheprovider tests > "$work/tests.log" 2>&1
tests_rc=$?
cat "$work/tests.log"
summary=$(grep -E "(passed|failed|skipped|error|no tests ran)" "$work/tests.log" | tail -1)
skipped=$(grep -c "^SKIPPED" "$work/tests.log")
passed=$(grep -c "^PASSED" "$work/tests.log")
if [[ $tests_rc -eq 124 ]]; then
    tests_verdict="timed out after 90 s"
elif [[ $mode == gpu && $tests_rc -eq 0 && $skipped -eq 0 && $passed -gt 0 ]]; then
    tests_verdict="all passed"
elif [[ $mode == cpu && $tests_rc -eq 0 && $passed -eq 0 && $skipped -gt 0 ]]; then
    tests_verdict="selected and skipped without CUDA, as expected"
    tests_rc=0
else
    tests_verdict="FAILED (pytest exit $tests_rc, $passed passed, $skipped skipped)"
    [[ $tests_rc -eq 0 ]] && tests_rc=1
fi
echo "gpu.sh: CUDA tests: $tests_verdict"

# ---------------------------------------------------------------- 4. the GPU benchmarks
echo "gpu.sh: benchmarks"
if [[ $mode == gpu ]]; then
    bench_args=(--time-limit 120)
else
    bench_args=(--device cpu --quick --problems resnet32 --batch 2)
fi
timeout 200 "$python" benchmarks/bench_gpu.py "${bench_args[@]}" --out "$work/bench.md" \
    2> "$work/bench.log"
bench_rc=$?
tail -5 "$work/bench.log"
if [[ $bench_rc -ne 0 ]]; then
    echo "gpu.sh: bench_gpu.py failed (exit $bench_rc); its log ends:" >&2
    tail -20 "$work/bench.log" >&2
fi

# ---------------------------------------------------------------- 5. two GPUs under torchrun
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
ddp_rc=0
if [[ $mode == gpu && $gpus -ge 2 ]]; then
    echo "gpu.sh: train under torchrun on 2 GPUs against one process on one GPU"
    train=(train --problem mlp-digits --optimizer mbf,kfac,kpsvd --max-steps 20 --dtype float64
           --device cuda --no-progress)
    cat > "$work/compare_ddp.py" <<'EOF'
import sys

import pandas as pd

work = sys.argv[1]
one, two = (
    pd.read_csv(f"{work}/{d}/train_log.csv").query("kind == 'step'").set_index(["optimizer", "step"])
    for d in ("one", "two")
)
relative = ((one.loss - two.loss).abs() / one.loss.abs()).groupby("optimizer").max()
print("## Two GPUs under torchrun (nccl) against one GPU\n")
print("mlp-digits, 20 steps, float64; largest relative difference of the per-step losses:\n")
for name, value in relative.items():
    print(f"- {name}: {value:.2e}")
sys.exit(0 if (relative < 1e-8).all() else 1)
EOF
    {
        timeout 100 "$python" -m mbf_analysis "${train[@]}" --out "$work/one" &&
            timeout 100 "$python" -m torch.distributed.run --standalone --nproc-per-node 2 \
                -m mbf_analysis "${train[@]}" --out "$work/two" &&
            "$python" "$work/compare_ddp.py" "$work" > "$work/ddp.md"
    } > "$work/ddp.log" 2>&1
    ddp_rc=$?
    data=(--only resnet32)
    [[ -d ../shared/data ]] && data=(--data-dir ../shared/data)
    timeout 140 "$python" benchmarks/bench_torchrun.py --device cuda "${data[@]}" \
        --out "$work/ddp_bench.md" >> "$work/ddp.log" 2>&1 || ddp_rc=1
    if [[ $ddp_rc -ne 0 ]]; then
        echo "gpu.sh: the 2-GPU case failed; its log ends:" >&2
        tail -20 "$work/ddp.log" >&2
    fi
else
    echo "gpu.sh: 2-GPU torchrun case skipped ($gpus CUDA device(s), mode $mode)"
fi

# ---------------------------------------------------------------- 6. the results file
{
    echo "# GPU readiness: CUDA tests and GPU benchmarks (benchmarks/gpu.sh)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ); mode: $mode; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + local changes'); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo 'no nvidia-smi'); total $((SECONDS - start)) s."
    echo
    echo "## CUDA tests"
    echo
    echo "Selected: every test marked \`gpu\` or skipped when CUDA is missing. Verdict: $tests_verdict."
    echo "pytest: \`${summary:-no summary}\`."
    echo
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$work/tests.log" | sed 's/^/- /'
    echo
    if [[ $mode == gpu && $gpus -ge 2 ]]; then
        [[ -f "$work/ddp.md" ]] && cat "$work/ddp.md" && echo
        [[ -f "$work/ddp_bench.md" ]] && sed 's/^#/##/' "$work/ddp_bench.md" && echo
        if [[ $ddp_rc -ne 0 ]]; then
            echo "The 2-GPU case FAILED (exit $ddp_rc); see the script's output."
            echo
        fi
    else
        echo "## Two GPUs under torchrun"
        echo
        echo "Skipped: $gpus CUDA device(s) in mode $mode (needs 2)."
        echo
    fi
    if [[ $bench_rc -eq 0 ]]; then
        sed 's/^#/##/' "$work/bench.md"
    else
        echo "## Benchmarks"
        echo
        echo "bench_gpu.py failed (exit $bench_rc). Log tail:"
        echo
        echo '```'
        tail -20 "$work/bench.log"
        echo '```'
    fi
} > "$out"
echo "gpu.sh: wrote $out ($((SECONDS - start)) s)"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && $ddp_rc -eq 0 ]]
