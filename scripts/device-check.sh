#!/usr/bin/env bash
# GPU check, run on a lent GPU machine from the repository root (see BENCHMARKS.md).
# Expects the Vulkan build of gca-hng, stripped and gzipped, at .gl/gca-hng-vulkan.gz and the Vulkan loader packages in
# .gl/*.deb (the device README explains both). Writes logs to $OUT when it is set.
set -u
out=${OUT:-/tmp/gca-hng-device}
mkdir -p "$out"
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
bin=/tmp/gca-hng-vulkan
gunzip -c .gl/gca-hng-vulkan.gz > "$bin" && chmod +x "$bin"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

echo "== verify reference on vulkan:0"
timeout 300 "$bin" --device vulkan:0 verify reference tests/fixtures/tiny.safetensors > "$out/verify.txt" 2>&1
grep -E "FAIL|PASS" "$out/verify.txt" | tail -50
sort -g -k2 "$out/verify.txt" | grep "^fwd\.[a-z_.]* " | tail -5

if [ -f .gl/efficientnet_lite0_f16_expected.safetensors ]; then
  echo "== verify backbone efficientnet-lite0 (embedded f16 weights) on vulkan:0"
  timeout 300 "$bin" --device vulkan:0 verify backbone --arch efficientnet-lite0 \
    --weights assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors \
    --expected .gl/efficientnet_lite0_f16_expected.safetensors 2>&1 | tee "$out/verify-effnet.txt"
fi

echo "== bench backbone resnet50 batch 81 on vulkan:0"
timeout 300 "$bin" --device vulkan:0 bench backbone --arch resnet50 --batch 81 --size 224 --warmup 3 --iters 10 2>&1 | tee "$out/bench-resnet50-b81.txt"

echo "== bench step on vulkan:0"
timeout 300 "$bin" --device vulkan:0 bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --warmup 3 --iters 10 2>&1 | tee "$out/bench-27x3.txt"
timeout 300 "$bin" --device vulkan:0 bench step --classes 40 --per-class 2 --dim 512 --layers 1 --heads 2 --warmup 3 --iters 10 2>&1 | tee "$out/bench-40x2.txt"

echo "== PyTorch reference: ResNet-50 forward+backward, batch 81, 224 px, train mode"
PYTHONUNBUFFERED=1 timeout 240 python3 scripts/torch_resnet50_bench.py 2>&1 | tee "$out/torch-resnet50.txt"

echo "== bench step on the CPU of that machine (Flex)"
timeout 200 "$bin" --device cpu bench step --classes 27 --per-class 3 --dim 512 --layers 2 --heads 4 --iters 3 2>&1 | tee "$out/bench-cpu-27x3.txt"
