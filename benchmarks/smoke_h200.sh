#!/bin/bash
# Smoke mode gated on the canary (issue 11) and the determinism check biting (issue 10), on one H200 with real
# SGLang 0.5.11, through `tox -e gpu-nvidia` as the README says for a venv runner. Prepare on the CPU machine:
#   bash benchmarks/h200_prepare.sh
# Then device calls back to back (the machine stays warm only briefly; /tmp persists while it does):
#   run(kind="nvidia-h200", carry=[".devwork/bundle.tar", ".devwork/h200", ".devwork/mgsm_en.tsv"],
#       command="OUT=$OUT bash benchmarks/smoke_h200.sh prepare", timeout_s=600)
#   run(kind="nvidia-h200", carry=[".devwork/toxwheels", ".devwork/mgsm_en.tsv"],
#       command="OUT=$OUT bash benchmarks/smoke_h200.sh tox -k test_mla_fp8", timeout_s=600)
#   run(kind="nvidia-h200", carry=[".devwork/toxwheels", ".devwork/mgsm_en.tsv"],
#       command="OUT=$OUT bash benchmarks/smoke_h200.sh tox -k 'bites or seed'", timeout_s=600)
# prepare: installs the bundle and builds the canary into /tmp/xdg (`mlaprop canary build --json`), so the tox
#          run finds it cached. tox ARGS: installs tox from wheels, then
#          MLAPROP_PYTHON=/opt/torch/.venv/bin/python3 MLAPROP_SMOKE=1 tox -e gpu-nvidia -- ARGS
#          (MLAPROP_SMOKE_MODEL picks canary|random|dummy; default canary, gated at 0.98).
set -uo pipefail
PHASE=${1:?usage: smoke_h200.sh prepare | tox [pytest args]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/mlaprop-out}
mkdir -p "$OUT"
PY=/opt/torch/.venv/bin/python3
D=$REPO/.devwork
export XDG_CACHE_HOME=/tmp/xdg PYTHONUNBUFFERED=1
if [ -f "$D/h200/on_device.sh" ]; then
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"
else
  [ -f /tmp/site/.mlaprop-bundle ] || [ -d /tmp/site/sglang ] || { echo "error: the SGLang bundle is not installed on this machine (it went back?): run the prepare call first" >&2; exit 2; }
  export PYTHONPATH=/tmp/site TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_ENABLE_JIT_DEEPGEMM=0
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
export MLAPROP_DATASET=$D/mgsm_en.tsv
[ -f "$MLAPROP_DATASET" ] || { echo "error: .devwork/mgsm_en.tsv not carried (benchmarks/h200_prepare.sh writes it)" >&2; exit 2; }
SERVER_ARGS=${MLAPROP_SERVER_ARGS:-"--grammar-backend none --skip-server-warmup --mem-fraction-static 0.3"}
case $PHASE in
prepare)
  t0=$SECONDS
  PYTHONPATH=$REPO:$PYTHONPATH $PY -m mlaprop.cli canary build --dataset "$MLAPROP_DATASET" --json \
    > "$OUT/canary-build.json" 2> "$OUT/canary-build.log"
  echo "canary build exit $?, $((SECONDS - t0)) s"; tail -5 "$OUT/canary-build.log"
  ;;
tox)
  [ -d "$D/toxwheels" ] || { echo "error: .devwork/toxwheels not carried" >&2; exit 2; }
  [ -f /tmp/toxsite/tox/__init__.py ] || $PY -m pip install -q --no-index --no-deps --target /tmp/toxsite "$D"/toxwheels/*.whl || exit 2
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$D/toxwheels
  TOX=("$PY" -c "import sys; sys.path.insert(0, '/tmp/toxsite'); from tox.run import run; sys.argv[0] = 'tox'; run()")
  t0=$SECONDS
  MLAPROP_PYTHON=$PY MLAPROP_SMOKE=1 MLAPROP_TP=1 MLAPROP_SERVER_ARGS="$SERVER_ARGS" \
    MLAPROP_REPORT_DIR=/tmp/mlaprop-report/smoke MLAPROP_READY_TIMEOUT=300 \
    "${TOX[@]}" -e gpu-nvidia -- --junitxml="$OUT/junit-smoke.xml" "$@" 2>&1 | tail -80
  echo "tox exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
  cp /tmp/mlaprop-report/smoke/summary.json "$OUT/summary-smoke.json" 2>/dev/null
  ps -eo pid,args | grep -E "sglang" | grep -v grep || echo "no sglang process left"
  ;;
*) echo "usage: smoke_h200.sh prepare | tox [pytest args]" >&2; exit 2 ;;
esac
