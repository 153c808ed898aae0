#!/bin/bash
# CPU side of issue 16 (tp=2 on two H200s) and of issue 13's venv-runner check: builds what the device
# cannot download, under .devwork/ (ignored: /.devwork/ is in .git/info/exclude), to be `carry`-ed:
#   bash benchmarks/h200_prepare.sh
#   .devwork/bundle.tar     SGLang 0.5.11 and its kernels (57 MiB; shared/h200/build_bundle.sh)  call 1
#   .devwork/h200/          shared/h200's tools (on_device.sh installs the bundle)                 call 1
#   .devwork/mgsm_en.tsv    MGSM-en (the device has no network and no ../shared)                   both
#   .devwork/toxwheels/     tox + hatchling, which the device image lacks (7 MiB)                  call 2
#   .devwork/extra/         jiter, which openai (SGLang's run_eval) imports and the bundle lacks   call 1
# Existing files are kept. The bundle and the tox wheels do not fit one call (64 MiB per call), so
# benchmarks/h200_tp2.sh runs in two phases.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${MLAPROP_SHARED:-$REPO/../shared}
D=$REPO/.devwork
PIP=${PIP:-"python3 -m pip"}
mkdir -p "$D"
git -C "$REPO" check-ignore -q "$D" || { echo "error: $D is not ignored by git; add /.devwork/ to .git/info/exclude" >&2; exit 2; }
if [ ! -f "$D/bundle.tar" ]; then
  PIP=$PIP bash "$SHARED/h200/build_bundle.sh" /tmp/h200_bundle
  cp /tmp/h200_bundle/bundle.tar "$D/bundle.tar"
fi
[ -f "$D/h200/on_device.sh" ] || { mkdir -p "$D/h200" && cp "$SHARED"/h200/*.sh "$SHARED"/h200/*.py "$D/h200/"; }
[ -f "$D/mgsm_en.tsv" ] || cp "$SHARED/data/mgsm/mgsm_en.tsv" "$D/mgsm_en.tsv"
# The device image (python3 3.12 at /opt/torch/.venv) already has pytest, pytest-xdist, hypothesis, psutil,
# requests, tqdm, packaging, tokenizers, pluggy, pathspec, filelock, colorama (device KINDS.md); it lacks tox
# and hatchling (mlaprop's build backend: tox builds mlaprop's wheel).
if ! ls "$D"/toxwheels/tox-*.whl >/dev/null 2>&1; then
  mkdir -p "$D/toxwheels"
  $PIP download -q -d "$D/toxwheels" --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any tox hatchling
fi
# openai's chat client imports jiter, which the bundle lacks (SGLang's run_eval needs it on the device)
if ! ls "$D"/extra/jiter-*.whl >/dev/null 2>&1; then
  mkdir -p "$D/extra"
  $PIP download -q -d "$D/extra" --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 jiter
fi
du -sh "$D/extra" "$D/bundle.tar" "$D/h200" "$D/mgsm_en.tsv" "$D/toxwheels"
