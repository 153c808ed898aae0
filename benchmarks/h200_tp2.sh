#!/bin/bash
# Issue 16 on nvidia-h200-x2 (and issue 13's "venv runner" check): the composed tp=2 plan on real SGLang
# 0.5.11, through the GPU test's MLAPROP_TP setting. Prepare on the CPU machine first:
#   bash benchmarks/h200_prepare.sh
# Then two device calls, back to back (the machine stays warm only ~30 s between calls; /tmp/site persists):
#   run(kind="nvidia-h200-x2", carry=[".devwork/bundle.tar", ".devwork/h200", ".devwork/mgsm_en.tsv"],
#       command="OUT=$OUT bash benchmarks/h200_tp2.sh phase1", timeout_s=600)
#   run(kind="nvidia-h200-x2", carry=[".devwork/toxwheels", ".devwork/mgsm_en.tsv"],
#       command="OUT=$OUT bash benchmarks/h200_tp2.sh phase2", timeout_s=600)
# (If the machine went back between the calls, phase2 says so: carry the phase1 paths as well, minus nothing
# else fits; or run phase1 again first.)
# phase1: installs the bundle; nvidia-smi; `mlaprop env` (2 GPUs); `mlaprop compose --tp 2 --explain`;
#         `--tp 3` refused before launch; the GPU test with MLAPROP_TP=2 MLAPROP_SMOKE=1 run by the image's
#         python3 + pytest (no tox); nvidia-smi and leftover processes after; report files to $OUT.
# phase2: installs tox from wheels, then exactly what the README says for a venv runner:
#         MLAPROP_PYTHON=/opt/torch/.venv/bin/python3 MLAPROP_SMOKE=1 MLAPROP_TP=2 tox -e gpu-nvidia
# Set MLAPROP_TP=1 for phase2 to check issue 13's single-GPU command on nvidia-h200.
set -uo pipefail
PHASE=${1:?usage: h200_tp2.sh phase1|phase2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/mlaprop-out}
mkdir -p "$OUT"
PY=/opt/torch/.venv/bin/python3
# NVLink multicast stays off (device KINDS.md): keep these set for every process SGLang starts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# 0.5.11 bundle: no xgrammar; small memory share; CUDA graphs off for a faster start; custom all-reduce off
# (CUDA IPC under gVisor is untested: plain NCCL is enough to check the tp=2 plan)
TP_ARGS=${MLAPROP_SERVER_ARGS:-"--grammar-backend none --skip-server-warmup --mem-fraction-static 0.3 --disable-cuda-graph --disable-custom-all-reduce"}
smi() { nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader | tee -a "$OUT/$1"; }
leftovers() { ps -eo pid,ppid,etimes,args | grep -E "sglang|mlaprop.simserver" | grep -v grep || echo "no sglang process left"; }
step() { echo; echo "=== $(date -u +%T) $*"; }

D=$REPO/.devwork
if [ ! -f /tmp/site/.mlaprop-bundle ]; then
  [ -f "$D/bundle.tar" ] && [ -f "$D/h200/on_device.sh" ] || { echo "error: the SGLang bundle is not installed on this machine and .devwork/bundle.tar + .devwork/h200 were not carried: run phase1 first (the machine may have gone back between calls)" >&2; exit 2; }
  step "installing the SGLang 0.5.11 bundle"
fi
if [ -f "$D/h200/on_device.sh" ]; then
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"
else
  export PYTHONPATH=/tmp/site TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_ENABLE_JIT_DEEPGEMM=0
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
# offline (on_device.sh sets HF_HUB_OFFLINE=1): the MGSM file must be carried
export MLAPROP_DATASET=$D/mgsm_en.tsv
[ -f "$MLAPROP_DATASET" ] || { echo "error: .devwork/mgsm_en.tsv not carried (benchmarks/h200_prepare.sh writes it)" >&2; exit 2; }

case $PHASE in
phase1)
  export PYTHONPATH=$REPO:$PYTHONPATH
  step "GPUs before"; smi smi-before.csv
  step "mlaprop env"; $PY -m mlaprop.cli env | tee "$OUT/env.txt"
  step "mlaprop compose --tp 2 --explain"; $PY -m mlaprop.cli compose --tp 2 --explain | tee "$OUT/compose-tp2.txt"
  step "mlaprop compose --tp 3 (must be refused, exit 2)"
  $PY -m mlaprop.cli compose --tp 3; echo "exit code $? (expected 2)" | tee "$OUT/compose-tp3.txt"
  step "GPU test, MLAPROP_TP=2, smoke, image python3 + pytest"
  t0=$SECONDS
  MLAPROP_EXPECT_VENDOR=nvidia MLAPROP_SMOKE=1 MLAPROP_TP=2 MLAPROP_SERVER_ARGS="$TP_ARGS" \
    MLAPROP_REPORT_DIR=/tmp/mlaprop-report/tp2 MLAPROP_READY_TIMEOUT=480 \
    $PY -m pytest tests/gpu -m "gpu and nvidia" -p no:cacheprovider -rA -s --junitxml="$OUT/junit-tp2.xml" \
    2>&1 | tail -60
  echo "pytest exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
  step "GPUs after"; smi smi-after.csv; leftovers | tee "$OUT/leftovers.txt"
  R=/tmp/mlaprop-report/tp2
  cp "$R/summary.json" "$OUT/summary-tp2.json" 2>/dev/null
  step "SGLang log lines: tp and attention backend"
  grep -E "tp_size|tp_rank|TP[01]|attention_backend|attention backend|Init torch distributed|Load weight end|KV Cache is allocated|fired up" "$R/server.log" | head -40 | tee "$OUT/server-log-lines.txt"
  tail -c 4000000 "$R/server.log" > "$OUT/server-tp2.log" 2>/dev/null
  ;;
phase2)
  step "installing tox from wheels"
  [ -d "$D/toxwheels" ] || { echo "error: .devwork/toxwheels not carried (benchmarks/h200_prepare.sh writes it)" >&2; exit 2; }
  [ -f /tmp/toxsite/tox/__init__.py ] || $PY -m pip install -q --no-index --no-deps --target /tmp/toxsite "$D"/toxwheels/*.whl || exit 2
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$D/toxwheels  # tox's pip: nothing from a registry
  # tox runs with /tmp/toxsite on its own sys.path only: PYTHONPATH (passed into the env) stays /tmp/site
  TOX=("$PY" -c "import sys; sys.path.insert(0, '/tmp/toxsite'); from tox.run import run; sys.argv[0] = 'tox'; run()")
  step "GPUs before"; smi smi-before-tox.csv
  step "MLAPROP_PYTHON=$PY MLAPROP_SMOKE=1 MLAPROP_TP=${MLAPROP_TP:-2} tox -e gpu-nvidia"
  t0=$SECONDS
  MLAPROP_PYTHON=$PY MLAPROP_SMOKE=1 MLAPROP_TP=${MLAPROP_TP:-2} \
    MLAPROP_SERVER_ARGS="$TP_ARGS" MLAPROP_REPORT_DIR=/tmp/mlaprop-report/tox MLAPROP_READY_TIMEOUT=480 \
    "${TOX[@]}" -e gpu-nvidia -- --junitxml="$OUT/junit-tox.xml" 2>&1 | tail -60
  echo "tox exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
  step "GPUs after"; smi smi-after-tox.csv; leftovers | tee "$OUT/leftovers-tox.txt"
  cp /tmp/mlaprop-report/tox/summary.json "$OUT/summary-tox.json" 2>/dev/null
  ;;
*) echo "usage: h200_tp2.sh phase1|phase2" >&2; exit 2 ;;
esac
