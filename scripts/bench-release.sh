#!/usr/bin/env bash
# Side by side on this CPU, alternating so that both see the same machine load:
#   step      the release's head step (../shared/tools/release/bench_step.py, 27x3, d=512, L=2,
#             H=4) and `gca-hng bench step` on the same setting;
#   resnet50  torchvision's ResNet-50 (scripts/torch_resnet50_cpu_bench.py) and
#             `gca-hng bench backbone --arch resnet50`, batch 8 at 224 px, forward + backward;
#   demo      whole training steps (loader included) on the emoji demo setting: the release
#             through ../shared/tools/release/emoji_train.py (2 epochs, 22 steps, BatchNorm in
#             eval mode; steps 3-22 of epoch 2, timed by scripts/release_demo_steps.py) and
#             `gca-hng bench train --preset demo --steps 20 --warmup 2`. Needs DEMO_DATA, the
#             folder that ../shared/tools/release/emoji_data.py renders (its README says how),
#             and the EfficientNet-Lite0 environment variables of that README.
# Prints the CPU model and vector ISA, each run's median, the medians of the runs and the ratio
# ours / theirs. Both sides get the same number of threads (THREADS, default 2).
#
# usage: scripts/bench-release.sh [step|resnet50|demo] [ROUNDS]
# environment: PYTHON (PyTorch from PyPI), RELEASE (the release's tree), HARNESS (the
# release harness folder), BIN (gca-hng), THREADS.
set -euo pipefail
what=${1:-step}
rounds=${2:-3}
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-/work/venv-release/bin/python}
RELEASE=${RELEASE:-/work/release}
HARNESS=${HARNESS:-$here/../../shared/tools/release}
BIN=${BIN:-$here/../target/release/gca-hng}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS

model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo)
isa=""
for f in avx512f avx512bw avx512vl avx512_bf16 avx2 fma asimd sve; do
    case " $flags " in *" $f "*) isa="$isa $f" ;; esac
done
echo "cpu: $model; $(nproc) cores visible; ISA:$isa; threads per side: $THREADS"

case $what in
step)
    theirs_cmd=("$PYTHON" "$HARNESS/bench_step.py" "$RELEASE" 27 3 512 2 4 5)
    ours_cmd=("$BIN" bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --iters 5)
    ;;
resnet50)
    theirs_cmd=("$PYTHON" "$here/torch_resnet50_cpu_bench.py" 8 224 3 "$THREADS")
    ours_cmd=("$BIN" bench backbone --arch resnet50 --batch 8 --size 224 --iters 3)
    ;;
demo)
    : "${DEMO_DATA:?set DEMO_DATA to the emoji data folder that emoji_data.py renders}"
    theirs_cmd=("$PYTHON" "$here/release_demo_steps.py" 2 "$HARNESS/emoji_train.py" --method gca
        --seed 0 --data "$DEMO_DATA" --epochs 2 --max-steps 22 --bn-freeze 1)
    ours_cmd=("$BIN" bench train --preset demo --steps 20 --warmup 2)
    ;;
*)
    echo "usage: $0 [step|resnet50|demo] [ROUNDS]" >&2
    exit 2
    ;;
esac

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
theirs=()
ours=()
for r in $(seq "$rounds"); do
    line=$("${theirs_cmd[@]}" | tail -n1)
    echo "round $r theirs: $line"
    theirs+=("$(sed -E 's/.*median ([0-9.]+) s.*/\1/' <<<"$line")")
    line=$("${ours_cmd[@]}" | tail -n1)
    echo "round $r ours:   $line"
    ours+=("$(sed -E 's/.*median ([0-9.]+) s.*/\1/' <<<"$line")")
done
t=$(printf '%s\n' "${theirs[@]}" | median)
o=$(printf '%s\n' "${ours[@]}" | median)
echo "theirs: median of $rounds medians $t s (all: ${theirs[*]})"
echo "ours:   median of $rounds medians $o s (all: ${ours[*]})"
awk -v o="$o" -v t="$t" 'BEGIN {printf "ratio ours/theirs: %.2f\n", o / t}'
