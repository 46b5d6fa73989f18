#!/usr/bin/env bash
# Fetch, on a machine with internet access, the wheels an offline GPU machine lacks, into .whl/
# (ignored by git), for its Python (3.12 here). An offline machine that has torch, triton,
# pytest, pytest-benchmark and matplotlib still lacks liger-kernel (a benchmark peer). Copy
# .whl/ with the repository; tools/gpu/device_run.sh installs them there.
#
#   bash tools/gpu/fetch_wheels.sh                 # liger-kernel==0.8.5
#   LIGER_VERSION=0.8.5 EXTRA="pkg==1.0" bash tools/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}" ${EXTRA:-}
ls -l .whl
