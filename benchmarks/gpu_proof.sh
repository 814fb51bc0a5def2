#!/usr/bin/env bash
# The GPU proof: everything hf_zero claims about one GPU, measured in one go (≤ 9 minutes on one
# H100/H200, no network), written as a dated section into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_proof.sh                 # on a GPU machine, from anywhere
#   bash benchmarks/gpu_proof.sh --cpu-dry-run   # the same steps on tiny configs, on this CPU
#                                                  (PROOF_TEST_PATHS limits its tests, sm_90a only)
#
# Steps: the environment; the single-process tests on the device (`pytest -m on_device --device
# cuda`: the engine, fp16 and the Triton kernels for real against their references); every kernel
# variant compiled for sm_80/sm_90a (registers, spills, vector accesses); the optimizer step tail
# with and without the skip flag against the one-pass floor; the Trainer table for GPT-2 124M and
# the Llama-1.1B config (plain Trainer against stages 1/2/3, fp16, CPU optimizer offload exact and
# delayed, stage 3 with parameters and optimizer offloaded); one step by phase. Logs go to
# $PROOF_LOG_DIR (default: $OUT/proof when $OUT is set, else a new temporary folder). Every step
# runs even when one before it failed; the exit status is non-zero when any failed, and the
# section says which.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --cpu-dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_proof.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

LOG_DIR=${PROOF_LOG_DIR:-${OUT:+$OUT/proof}}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
export TRITON_DEFAULT_FP_FUSION=1

if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu
    # CI runs every test and compiles every kernel on its own; a dry run can take fewer.
    read -r -a TEST_PATHS <<<"${PROOF_TEST_PATHS:-tests}"
    ARCHS=(90)
    MODELS=(tiny)
    STEPS=4
    ELEMENTS=1e5
    RESULTS=${PROOF_RESULTS:-$LOG_DIR/RESULTS.md}
    TITLE="GPU proof, CPU dry run ($(date -u +%F))"
else
    DEVICE=cuda
    TEST_PATHS=(tests)
    ARCHS=(80 90)
    MODELS=(gpt2-124m llama-1b)
    STEPS=15
    ELEMENTS=1e9
    RESULTS=${PROOF_RESULTS:-benchmarks/RESULTS.md}
    TITLE="GPU proof ($(date -u +%F), $(python -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo 'no GPU seen'))"
    if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_proof: torch sees no GPU; on a CPU machine run: bash benchmarks/gpu_proof.sh --cpu-dry-run" >&2
        exit 2
    fi
    # The device image has no registry: install hf_zero itself only.
    python -c "import hf_zero" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . || exit 2
fi

FAILED=()
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append stdout to LOG
    local name=$1 seconds=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "== $name: $*" >&2
    timeout "$seconds" "$@" >>"$LOG_DIR/$log" 2>>"$LOG_DIR/stderr.txt"
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" >&2
    if [[ $status != 0 ]]; then
        FAILED+=("$name (exit $status)")
        echo "{\"failed\": \"$name\", \"exit\": $status}" >>"$LOG_DIR/failures.jsonl"
    fi
}

step env 60 env.txt python -c "from hf_zero.cli import main; raise SystemExit(main(['env']))"

if [[ $DRY_RUN == 1 ]]; then
    TESTS_ENV=(env TRITON_INTERPRET=1 HF_ZERO_TEST_DEVICE=cpu)
else
    TESTS_ENV=(env -u TRITON_INTERPRET HF_ZERO_TEST_DEVICE=cuda)
fi
step tests 240 tests.txt "${TESTS_ENV[@]}" python -m pytest -q -p no:cacheprovider -m on_device --device "$DEVICE" "${TEST_PATHS[@]}"

step compile 120 compile.jsonl env -u TRITON_INTERPRET python -m hf_zero.testing.kernel_compile --arch "${ARCHS[@]}"

if [[ $DRY_RUN == 1 ]]; then
    step step-tail 120 step_tail.jsonl env TRITON_INTERPRET=1 python benchmarks/adam_step_bench.py "$ELEMENTS" --device cpu
else
    step step-tail 120 step_tail.jsonl python benchmarks/adam_step_bench.py "$ELEMENTS" --dtype fp16
fi

# The trainer table's setups (trainer_bench.py's arguments after the model and before the steps,
# then its options) and the phases profiled.
SETUPS=("plain" "zero1" "zero2" "zero3" "zero2 --precision fp16" "zero2 --offload cpu"
    "zero2 --offload cpu --delayed" "zero3 --offload cpu --offload-params")
for model in "${MODELS[@]}"; do
    if [[ $DRY_RUN == 1 ]]; then
        # One process for all setups: torch and transformers are imported once (seconds per run here).
        runs=()
        for setup in "${SETUPS[@]}"; do
            read -r -a words <<<"$setup"
            runs+=(${runs:+--then} "$model" "${words[0]}" "$STEPS" "${words[@]:1}")
        done
        step "trainer $model (${#SETUPS[@]} setups, one process)" 300 trainer.jsonl \
            python benchmarks/one_process.py benchmarks/trainer_bench.py "${runs[@]}"
        step "profile $model zero2, zero3" 240 profile.jsonl python benchmarks/one_process.py \
            benchmarks/step_profile.py "$model" --stage 2 --then "$model" --stage 3
        continue
    fi
    for setup in "${SETUPS[@]}"; do
        read -r -a words <<<"$setup"
        step "trainer $model $setup" 150 trainer.jsonl \
            python benchmarks/trainer_bench.py "$model" "${words[0]}" "$STEPS" "${words[@]:1}"
    done
    for stage in 2 3; do
        step "profile $model zero$stage" 120 profile.jsonl python benchmarks/step_profile.py "$model" --stage "$stage"
    done
done

python benchmarks/proof_report.py "$LOG_DIR" "$RESULTS" --title "$TITLE" >/dev/null || FAILED+=("report")
echo "gpu_proof: logs in $LOG_DIR, section appended to $RESULTS" >&2
if [[ ${#FAILED[@]} != 0 ]]; then
    printf 'gpu_proof: failed: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
