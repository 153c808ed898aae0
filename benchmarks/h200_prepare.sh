#!/bin/bash
# CPU side of issue 16 (tp=2 on two H200s) and of issue 13's venv-runner check: builds what the device
# cannot download, into folders the repo ignores (/.devwork/ is in .git/info/exclude), to be `carry`-ed.
#   bash benchmarks/h200_prepare.sh
# Writes:
#   .devwork/h200/      SGLang 0.5.11 bundle.tar (57 MiB) + shared/h200 tools      -> carry in call 1
#   .devwork/h200-tox/  tox + hatchling wheels the device image lacks (about 7 MiB)  -> carry in call 2
# The two do not fit one call (64 MiB per call), so benchmarks/h200_tp2.sh runs in two phases.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${MLAPROP_SHARED:-$REPO/../shared}
OUT=$REPO/.devwork
mkdir -p "$OUT/h200" "$OUT/h200-tox"
git -C "$REPO" check-ignore -q "$OUT/h200" || { echo "error: $OUT is not ignored by git; add /.devwork/ to .git/info/exclude" >&2; exit 2; }
if [ ! -f "$OUT/h200/bundle.tar" ]; then
  bash "$SHARED/h200/build_bundle.sh" /tmp/h200_bundle
  cp /tmp/h200_bundle/bundle.tar "$OUT/h200/bundle.tar"
fi
cp "$SHARED/h200/on_device.sh" "$SHARED/h200/make_tiny_mla.py" "$SHARED/h200/determinism_probe.py" "$OUT/h200/"
# The device image (python3 3.12 at /opt/torch/.venv) already has pytest, pytest-xdist, hypothesis, psutil,
# requests, tqdm, packaging, tokenizers, pluggy, pathspec, filelock, colorama (device KINDS.md); it lacks tox
# and hatchling (mlaprop's build backend, needed to build the wheel tox installs).
PIP=${PIP:-"python3 -m pip"}
$PIP download -q -d "$OUT/h200-tox" --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any tox hatchling
du -sh "$OUT/h200" "$OUT/h200-tox"
