#!/usr/bin/env bash
# The GPU rows of issue 9's target table in one run on a lent GPU machine (an H200 here),
# from the repository root. Every GPU figure in BENCHMARKS.md comes from this script.
#
# Prepare on the build machine (once; .gl/ is ignored through .git/info/exclude and carried):
#   - the Vulkan loader packages in .gl/*.deb (the device README says which);
#   - .gl/gca-hng-vulkan.xz: `cargo build --release --features vulkan`, stripped, compressed
#     with `xz` (gzip, `.gz`, also works; xz keeps the carried tree under its 64 MiB limit)
#     (`vulkan` implies `wgpu`; burn's autotune and fusion are left out, see Cargo.toml's
#     `gpu-tuning`);
#   - optionally .gl/gca-hng-cuda.xz, the same with `--features cuda` (its build downloads
#     LLVM, so it is built only where the network allows);
#   - .gl/release/ (the authors' release tree) and .gl/release-tools/make_fixtures.py (from
#     ../shared/tools/release/), for the release's head step on CUDA.
# Run: run(command="bash scripts/device-check.sh", carry=[".gl"], timeout_s=600).
# Every step has its own time limit so that the whole run ends inside 9.5 minutes (the session's
# device time is 15 minutes, start-up included); a step that
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
deadline=$((SECONDS + ${DEVICE_CHECK_SECONDS:-560}))

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
  line=$(grep -E "median|-> (PASS|FAIL)" "$tmp" | tail -3 | tr '\n' ' ')
  echo "$name: rc $rc, $((SECONDS - start)) s: ${line:-see log.txt}" | tee -a "$summary"
  rm -f "$tmp"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"
echo "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(grep -o -w 'avx512f' /proc/cpuinfo | head -1 || echo no-avx512)" | tee -a "$summary"
bins=()
for b in vulkan cuda; do
  if [ -f ".gl/gca-hng-$b.xz" ]; then
    xz -dc ".gl/gca-hng-$b.xz" > "/tmp/gca-hng-$b" && chmod +x "/tmp/gca-hng-$b" && bins+=("$b")
  elif [ -f ".gl/gca-hng-$b.gz" ]; then
    gunzip -c ".gl/gca-hng-$b.gz" > "/tmp/gca-hng-$b" && chmod +x "/tmp/gca-hng-$b" && bins+=("$b")
  else
    echo "gca-hng-$b: not carried, its rows are not measured" | tee -a "$summary"
  fi
done
torch_ok=0
python3 -c "import torch, torchvision; assert torch.cuda.is_available()" 2>>"$log" && torch_ok=1
[ "$torch_ok" = 1 ] || echo "pytorch: torch with CUDA is not available, its rows are not measured" | tee -a "$summary"
release_ok=0
[ -d .gl/release ] && [ -f .gl/release-tools/make_fixtures.py ] && release_ok=1

# The head step first: the cheapest rows, and the ones a session most needs.
for b in "${bins[@]}"; do
  step "head step 27x3 d512 L2 H4, $b:0" 60 "/tmp/gca-hng-$b" --device "$b:0" bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --warmup 3 --iters 10
done
if [ "$torch_ok" = 1 ] && [ "$release_ok" = 1 ]; then
  step "release head step 27x3 d512 L2 H4, cuda" 60 env PYTHONUNBUFFERED=1 python3 scripts/release_step_device.py .gl/release-tools .gl/release cuda 27 3 512 2 4 10
fi
for b in "${bins[@]}"; do
  # Autotune times its candidates during the warm-up iterations.
  step "resnet50 b81 224 fwd+bwd f32, $b:0" 120 "/tmp/gca-hng-$b" --device "$b:0" bench backbone --arch resnet50 --batch 81 --size 224 --warmup 3 --iters 10
done
# The same with burn-cubecl's own (direct) convolutions instead of the lowering to matrix
# products that GPUs use by default (src/backbones/conv.rs): the comparison behind that choice.
for b in "${bins[@]}"; do
  step "resnet50 b81 224 fwd+bwd f32, $b:0, GCA_CONV=burn" 45 env GCA_CONV=burn "/tmp/gca-hng-$b" --device "$b:0" bench backbone --arch resnet50 --batch 81 --size 224 --warmup 1 --iters 2
done
if [ "$torch_ok" = 1 ]; then
  step "pytorch resnet50 b81 224 fwd+bwd, f32 and TF32" 90 env PYTHONUNBUFFERED=1 python3 scripts/torch_resnet50_bench.py
fi
for b in "${bins[@]}"; do
  bin=/tmp/gca-hng-$b
  for p in bf16 f16; do
    step "resnet50 b81 224 fwd+bwd $p, $b:0" 75 "$bin" --device "$b:0" bench backbone --arch resnet50 --batch 81 --size 224 --warmup 3 --iters 10 --precision $p
  done
  # Parameters after AdamW steps under the GPU rule; every other row at its CPU tolerance.
  step "verify reference, $b:0" 60 "$bin" --device "$b:0" verify reference --quiet tests/fixtures/tiny.safetensors
  # Whole training steps (backbone + head + three optimisers), random images.
  step "bench train cub-resnet50 synthetic f32, $b:0" 75 "$bin" --device "$b:0" bench train --preset cub-resnet50 --synthetic --warmup 3 --steps 10
  step "bench train cub-resnet50 synthetic bf16, $b:0" 60 "$bin" --device "$b:0" bench train --preset cub-resnet50 --synthetic --warmup 3 --steps 10 --precision bf16
  step "bench train demo synthetic, $b:0" 45 "$bin" --device "$b:0" bench train --preset demo --synthetic --warmup 3 --steps 10
done
# The host's CPU, all cores, for the CPU rows on a second kind of processor.
for b in "${bins[@]}"; do
  step "head step 27x3 d512 L2 H4, host cpu" 45 "/tmp/gca-hng-$b" --device cpu bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --warmup 1 --iters 3
  break
done
if [ "$release_ok" = 1 ] && python3 -c "import torch" 2>>"$log"; then
  step "release head step 27x3 d512 L2 H4, host cpu" 45 env PYTHONUNBUFFERED=1 python3 scripts/release_step_device.py .gl/release-tools .gl/release cpu 27 3 512 2 4 3
fi
