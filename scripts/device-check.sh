#!/usr/bin/env bash
# The GPU rows of issue 9's target table in one run on a lent GPU machine (an H200 here),
# from the repository root. Every GPU figure in BENCHMARKS.md comes from this script.
#
# Prepare on the build machine (once; .gl/ is ignored through .git/info/exclude and carried):
#   - the Vulkan loader packages in .gl/*.deb (the device README says which);
#   - .gl/gca-hng-vulkan.gz: `cargo build --release --features vulkan`, stripped, gzipped
#     (`vulkan` implies `wgpu`, autotune and fusion);
#   - optionally .gl/gca-hng-cuda.gz, the same with `--features cuda` (its build downloads
#     LLVM, so it is built only where the network allows);
#   - .gl/release/ (the authors' release tree) and .gl/release-tools/make_fixtures.py (from
#     ../shared/tools/release/), for the release's head step on CUDA.
# Run: run(command="bash scripts/device-check.sh", carry=[".gl"], timeout_s=600).
# Every step has its own time limit so that the whole run ends inside 9 minutes; a step that
# fails or runs out leaves its log and the next one runs. Writes $OUT/log.txt (everything)
# and $OUT/summary.txt (one line per row).
set -u
out=${OUT:-/tmp/gca-hng-device}
mkdir -p "$out"
log=$out/log.txt
summary=$out/summary.txt
: > "$log"; : > "$summary"
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
deadline=$((SECONDS + 540))

# step NAME LIMIT_S COMMAND...: runs with the smaller of LIMIT_S and the time left, logs
# everything, and puts the command's last `median`/`PASS`/`FAIL` line in the summary.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "$name: skipped, out of time" >> "$summary"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS tmp
  tmp=$(mktemp)
  timeout "$limit" "$@" > "$tmp" 2>&1
  local rc=$?
  cat "$tmp" >> "$log"
  local line
  line=$(grep -E "median|-> (PASS|FAIL)" "$tmp" | tail -2 | tr '\n' ' ')
  echo "$name: rc $rc, $((SECONDS - start)) s: ${line:-see log.txt}" | tee -a "$summary"
  rm -f "$tmp"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"
bins=()
for b in vulkan cuda; do
  if [ -f ".gl/gca-hng-$b.gz" ]; then
    gunzip -c ".gl/gca-hng-$b.gz" > "/tmp/gca-hng-$b" && chmod +x "/tmp/gca-hng-$b" && bins+=("$b")
  else
    echo "gca-hng-$b: not carried, its rows are not measured" | tee -a "$summary"
  fi
done

for b in "${bins[@]}"; do
  bin=/tmp/gca-hng-$b
  dev=$b:0
  # Parameters after AdamW steps under the GPU rule; every other row at its CPU tolerance.
  step "verify reference, $dev" 120 "$bin" --device "$dev" verify reference --quiet tests/fixtures/tiny.safetensors
  # Autotune times its candidates during the warm-up iterations.
  step "resnet50 b81 224 fwd+bwd f32, $dev" 150 "$bin" --device "$dev" bench backbone --arch resnet50 --batch 81 --size 224 --warmup 3 --iters 10
  step "head step 27x3 d512 L2 H4, $dev" 90 "$bin" --device "$dev" bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --warmup 3 --iters 10
done

if python3 -c "import torch, torchvision; assert torch.cuda.is_available()" 2>>"$log"; then
  step "pytorch resnet50 b81 224 fwd+bwd, f32 and TF32" 150 env PYTHONUNBUFFERED=1 python3 scripts/torch_resnet50_bench.py
  if [ -d .gl/release ] && [ -f .gl/release-tools/make_fixtures.py ]; then
    step "release head step 27x3 d512 L2 H4, cuda" 90 env PYTHONUNBUFFERED=1 python3 scripts/release_step_device.py .gl/release-tools .gl/release cuda 27 3 512 2 4 10
  else
    echo "release head step: .gl/release or .gl/release-tools not carried" | tee -a "$summary"
  fi
else
  echo "pytorch: torch with CUDA is not available, its rows are not measured" | tee -a "$summary"
fi
echo "f16/bf16 rows: not measured, gca-hng has no --precision yet" | tee -a "$summary"
