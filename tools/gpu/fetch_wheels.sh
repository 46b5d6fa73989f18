#!/usr/bin/env bash
# Fetch, on a machine with internet access, the wheels an offline GPU machine lacks, into .whl/
# (ignored by git), for its Python (3.12 here). The GPU image has torch, triton, transformers,
# accelerate, peft, pyarrow, pandas, huggingface-hub, fsspec, xxhash, pytest, pytest-benchmark
# and matplotlib, but not the benchmark peers nor TRL: liger-kernel, cut-cross-entropy, trl and
# what trl imports that the image lacks (datasets, and datasets' dill and multiprocess). Every
# wheel is pure Python (~2.5 MB together). Copy .whl/ with the repository (carry=[".whl"]);
# tools/gpu/device_run.sh installs them there with --no-deps, after the image's own packages.
#
#   bash tools/gpu/fetch_wheels.sh
#   EXTRA="pkg==1.0" bash tools/gpu/fetch_wheels.sh      # one more
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}" \
  "trl==${TRL_VERSION:-1.16.0}" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" \
  ${EXTRA:-}
ls -l .whl
