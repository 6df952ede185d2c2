#!/usr/bin/env bash
# Wheels the GPU image lacks (it has torch + triton, Python 3.12, no open_clip), fetched here into
# .whl/ (ignored by git) so that a device run can carry them: see benchmarks/gpu_check.sh and
# /work/.library/device/README.md. Pure-Python wheels, so the platform flags only satisfy pip.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl   # one version of each package, or the install there stops
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 inf-cl==1.2.1
# (einops, hypothesis, pytest-benchmark, matplotlib, timm, regex are in the image: KINDS.md)
ls -l .whl
