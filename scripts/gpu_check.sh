#!/usr/bin/env bash
# Every GPU measurement of the bench (docs/bench.md#gpu) in one call: ViLT and METER on NLVR2, baseline against the released PuMer
# setting, written as JSON/MD/PNG under "$OUT" (default results/bench/gpu), then summary.md/summary.json with the
# targets. Sized to finish in under 8 minutes on one H100/H200, torch.compile time included; stages run in order
# of importance and the ones that would start after GPU_CHECK_BUDGET_S seconds are skipped (and listed).
#
#   scripts/gpu_check.sh                          # on a GPU machine, from the repository root
#   GPU_CHECK_TINY=1 scripts/gpu_check.sh         # tiny presets, any machine (CPU smoke run: CUDA-only modes skipped)
#   OUT=/tmp/gpu GPU_CHECK_BUDGET_S=300 scripts/gpu_check.sh
#
# Stages (each one `python -m pumer_lightning.bench` call; the released setting "pumer" and the baseline):
#   users      fp16 weights (cast once) + whole-forward CUDA graph + the default reduction step (auto: compiled on
#              CUDA), batch 32 and 128: the path `python -m pumer_lightning test|predict` takes; the speed targets
#   eager      fp16 autocast, eager reduction step, batch 32: ops per forward, reducer share (profiler ranges),
#              training step (activation memory with its bound; forward + backward + AdamW throughput), op profile
#   compiled   fp16 autocast, compiled reduction step, batch 32: inductor's kernels per step and extern calls,
#              reducer share
#   half       fp16 weights, compiled reduction step, no graph, batch 32: reducer share without autocast's recasts
#   sweep      as "users" at batch 1, 8 and 256 (joined with its batch 32 and 128 into a 5-point sweep + plot)
#   eager128   fp16 autocast, eager reduction step, batch 128, training step
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/bench/gpu}
TINY=${GPU_CHECK_TINY:-0}
if [[ "$TINY" == 1 ]]; then BUDGET=${GPU_CHECK_BUDGET_S:-3600}; else BUDGET=${GPU_CHECK_BUDGET_S:-390}; fi
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

mkdir -p "$OUT/logs"
: >"$OUT/stages.tsv"
START=$(date +%s)

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    CUDA=1
else
    CUDA=0
fi
if [[ "$CUDA" == 0 && "$TINY" != 1 ]]; then
    echo "gpu_check: no CUDA device; run on a GPU machine, or GPU_CHECK_TINY=1 for a CPU smoke run" >&2
    exit 2
fi

COMMON=(--settings pumer --keep-sweep --out "$OUT")
QUIET=(--no-op-count --kernel-count none)  # the op counter and the kernel count run in "eager" and "compiled"
if [[ "$TINY" == 1 ]]; then
    COMMON+=(--tiny --rounds 2 --train-rounds 2 --warmup 1)
    [[ "$CUDA" == 0 ]] && COMMON+=(--threads 1)
else
    # about 4 s of timed rounds per experiment and batch size, at least 7 rounds of 0.05 s samples
    COMMON+=(--budget 4 --train-budget 4 --min-rounds 7 --max-rounds 15)
fi
# batch sizes: the issue's on a GPU; small ones for the tiny smoke run (a CPU has no use for 256)
if [[ "$TINY" == 1 ]]; then B32=4 B128=8 SWEEP=(1 2 16); else B32=32 B128=128 SWEEP=(1 8 256); fi
GRAPH=()
[[ "$CUDA" == 1 ]] && GRAPH=(--cuda-graph)
if [[ "$CUDA" == 1 ]]; then AUTOCAST=fp16; HALF=fp16-true; else AUTOCAST=bf16; HALF=bf16-true; fi

FAILED=0
stage() {  # stage NAME ARGS...: one bench call, skipped once the budget is spent, limited to what is left of it
    local name=$1
    shift
    local now left t0 status
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if ((left <= 0)); then
        printf '%s\tskipped (budget of %s s spent)\t0\n' "$name" "$BUDGET" >>"$OUT/stages.tsv"
        echo "== $name: skipped, the ${BUDGET} s budget is spent"
        return
    fi
    echo "== $name ($((now - START)) s in, ${left} s left): $PY -m pumer_lightning.bench $*"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=20 $((left + 60)) "$PY" -m pumer_lightning.bench "$@" 2>&1 |
        grep --line-buffered -v '^USDT:' | tee "$OUT/logs/$name.log"
    status=${PIPESTATUS[0]}
    if ((status == 0)); then
        printf '%s\tok\t%s\n' "$name" $(($(date +%s) - t0)) >>"$OUT/stages.tsv"
    else
        FAILED=1
        printf '%s\tfailed (exit %s, see logs/%s.log)\t%s\n' "$name" "$status" "$name" $(($(date +%s) - t0)) \
            >>"$OUT/stages.tsv"
        echo "== $name: FAILED with exit $status (log: $OUT/logs/$name.log)" >&2
    fi
}

EXPS=(vilt_nlvr2 meter_nlvr2)
stage users "${EXPS[@]}" "${COMMON[@]}" "${QUIET[@]}" --batch "$B32" "$B128" --precision "$HALF" --reducer-impl auto \
    "${GRAPH[@]}" --no-train
stage eager "${EXPS[@]}" "${COMMON[@]}" --batch "$B32" --precision "$AUTOCAST" --reducer-impl eager --kernel-count none \
    --profile
stage compiled "${EXPS[@]}" "${COMMON[@]}" --batch "$B32" --precision "$AUTOCAST" --reducer-impl compiled \
    --kernel-count released --no-train
stage half "${EXPS[@]}" "${COMMON[@]}" "${QUIET[@]}" --batch "$B32" --precision "$HALF" --reducer-impl compiled --no-train
stage sweep vilt_nlvr2 "${COMMON[@]}" "${QUIET[@]}" --batch "${SWEEP[@]}" --precision "$HALF" --reducer-impl auto \
    "${GRAPH[@]}" --no-train
stage eager128 "${EXPS[@]}" "${COMMON[@]}" "${QUIET[@]}" --batch "$B128" --precision "$AUTOCAST" --reducer-impl eager
stage sweep_meter meter_nlvr2 "${COMMON[@]}" "${QUIET[@]}" --batch "${SWEEP[@]}" --precision "$HALF" \
    --reducer-impl auto "${GRAPH[@]}" --no-train

echo "== summary ($(($(date +%s) - START)) s in)"
"$PY" -m pumer_lightning.bench.gpu_check "$OUT" || FAILED=1
echo "gpu_check: done in $(($(date +%s) - START)) s; results in $OUT (summary.md)"
exit $FAILED
