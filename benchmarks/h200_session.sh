#!/bin/bash
# The whole H200 proof for one session, in two device calls made back to back (the machine stays warm ~30 s;
# /tmp persists while it does). Real SGLang 0.5.11 from shared/h200. Prepare here: bash benchmarks/h200_prepare.sh
#   A: run(carry=[".devwork/bundle.tar", ".devwork/h200", ".devwork/mgsm_en.tsv"],
#          command="OUT=$OUT bash benchmarks/h200_session.sh A", timeout_s=600)
#      installs the bundle; then, concurrently on the one GPU (every server with --max-total-tokens 600000):
#      the canary proof (benchmarks/canary_h200.sh: build, reference, corrupted copy, numerics override,
#      fp8_e5m2 vs auto KV, random-weight batch dependence), the peer comparison (benchmarks/h200_peer.py:
#      mlaprop eval vs SGLang run_eval on one server, mlaprop run vs SGLang's test flow), and kill -9 of
#      mlaprop mid-eval (benchmarks/h200_kill9.py).
#   D: run(carry=[".devwork/bundle.tar", ".devwork/h200", ".devwork/mgsm_en.tsv", ".devwork/extra"],
#          command="OUT=$OUT bash benchmarks/h200_session.sh D", timeout_s=600)
#      the peer comparison alone (A then B, nothing else on the GPU), every log brought back
#   E: run(carry as D, command="OUT=$OUT bash benchmarks/h200_session.sh E", timeout_s=600)
#      D, then pytest tests/gpu (canary gate, determinism bites with and without the flag, seed failure)
#   B: run(carry=[".devwork/toxwheels", ".devwork/mgsm_en.tsv"],
#          command="OUT=$OUT bash benchmarks/h200_session.sh B", timeout_s=600)
#      the README's venv-runner command: MLAPROP_PYTHON=/opt/torch/.venv/bin/python3 MLAPROP_SMOKE=1
#      tox -e gpu-nvidia (canary gate, determinism check with and without the flag, seed failure), 3 workers.
set -uo pipefail
PHASE=${1:?usage: h200_session.sh A|B}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/mlaprop-out}
mkdir -p "$OUT"
D=$REPO/.devwork
PY=/opt/torch/.venv/bin/python3
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/xdg
jiter() {  # openai's chat client imports jiter, which the bundle lacks: without it every run_eval request
  # raises ModuleNotFoundError and run_eval backs off 1+2+4+8+16+32 s per question (score 0 after ~80 s)
  "$PY" -c "import jiter" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$D"/extra/jiter-*.whl
}
step() { echo; echo "=== $(date -u +%T) $*"; }
smi() { nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader; }

case $PHASE in
A)
  step "install the SGLang 0.5.11 bundle"
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"
  export PYTHONPATH=$REPO:$PYTHONPATH MLAPROP_DATASET=$D/mgsm_en.tsv
  jiter
  smi | tee "$OUT/smi-A-before.csv"
  mkdir -p /tmp/xdg/mlaprop && ln -sfn /tmp/cache /tmp/xdg/mlaprop/canary  # tox in B finds the canary cached
  step "canary proof, peer comparison, kill -9: concurrently"
  (MGSM=.devwork/mgsm_en.tsv bash benchmarks/canary_h200.sh > "$OUT/canary.log" 2>&1; echo "canary exit $?" >> "$OUT/canary.log") &
  CANARY=$!
  sleep 20  # the canary build holds the GPU briefly; the peer servers start meanwhile
  (timeout 480 "$PY" benchmarks/h200_peer.py --dataset "$D/mgsm_en.tsv" --out /tmp/peer \
      --server-args "--grammar-backend none --skip-server-warmup --mem-fraction-static 0.12 --max-total-tokens 600000" \
      > "$OUT/peer.log" 2>&1; echo "peer exit $?" >> "$OUT/peer.log"; cp /tmp/peer/h200_peer.json "$OUT/" 2>/dev/null) &
  PEER=$!
  (timeout 420 "$PY" benchmarks/h200_kill9.py --smoke-model dummy --settle 30 -- \
      --server-args="--grammar-backend none --skip-server-warmup --mem-fraction-static 0.12 --max-total-tokens 600000" \
      > "$OUT/kill9.json" 2> "$OUT/kill9.err"; echo "kill9 exit $?" >> "$OUT/kill9.err") &
  KILL=$!
  wait $KILL; step "kill -9 done"; cat "$OUT/kill9.json"; tail -3 "$OUT/kill9.err"
  wait $PEER; step "peer done"; tail -25 "$OUT/peer.log"
  wait $CANARY; step "canary done"; tail -30 "$OUT/canary.log"
  smi | tee "$OUT/smi-A-after.csv"
  ps -eo pid,etimes,args | grep -E "sglang|mlaprop" | grep -v grep || echo "no sglang or mlaprop process left"
  ;;
B)
  [ -f /tmp/site/.mlaprop-bundle ] || { echo "error: the bundle is not installed (the machine went back after A): run A again" >&2; exit 2; }
  export PYTHONPATH=/tmp/site TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_ENABLE_JIT_DEEPGEMM=0
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MLAPROP_DATASET=$D/mgsm_en.tsv
  [ -f /tmp/toxsite/tox/__init__.py ] || "$PY" -m pip install -q --no-index --no-deps --target /tmp/toxsite "$D"/toxwheels/*.whl || exit 2
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$D/toxwheels
  TOX=("$PY" -c "import sys; sys.path.insert(0, '/tmp/toxsite'); from tox.run import run; sys.argv[0] = 'tox'; run()")
  smi | tee "$OUT/smi-B-before.csv"
  step "MLAPROP_PYTHON=$PY MLAPROP_SMOKE=1 tox -e gpu-nvidia -- -n 3"
  t0=$SECONDS
  MLAPROP_PYTHON=$PY MLAPROP_SMOKE=1 \
    MLAPROP_SERVER_ARGS="--grammar-backend none --skip-server-warmup --mem-fraction-static 0.2 --max-total-tokens 600000" \
    MLAPROP_REPORT_DIR=/tmp/mlaprop-report/smoke MLAPROP_READY_TIMEOUT=300 \
    "${TOX[@]}" -e gpu-nvidia -- -n 3 --junitxml="$OUT/junit-gpu-nvidia.xml" 2>&1 | tee "$OUT/tox.log" | tail -70
  echo "tox exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
  cp /tmp/mlaprop-report/smoke/summary.json "$OUT/summary-smoke.json" 2>/dev/null
  smi | tee "$OUT/smi-B-after.csv"
  ps -eo pid,etimes,args | grep -E "sglang|mlaprop" | grep -v grep || echo "no sglang or mlaprop process left"
  ;;
C)
  # the peer comparison on the canary (both tools, same model), beside the determinism check's proof
  # (tests/gpu/test_determinism_bites.py: the random real-scale model with and without the flag)
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"
  export PYTHONPATH=$REPO:$PYTHONPATH MLAPROP_DATASET=$D/mgsm_en.tsv
  jiter
  ARGS="--grammar-backend none --skip-server-warmup --mem-fraction-static 0.12 --max-total-tokens 600000"
  (timeout 330 "$PY" benchmarks/h200_peer.py --dataset "$D/mgsm_en.tsv" --out /tmp/peer --server-args "$ARGS" \
      > "$OUT/peer.log" 2>&1; echo "peer exit $?" >> "$OUT/peer.log"; cp /tmp/peer/h200_peer.json "$OUT/" 2>/dev/null) &
  PEER=$!
  MLAPROP_EXPECT_VENDOR=nvidia MLAPROP_SMOKE=1 MLAPROP_SERVER_ARGS="$ARGS" MLAPROP_READY_TIMEOUT=300 \
    timeout 330 "$PY" -m pytest tests/gpu -m "gpu and nvidia" -k bites -p no:cacheprovider -rA \
    --junitxml="$OUT/junit-bites.xml" > "$OUT/bites.log" 2>&1
  echo "bites exit $?"; tail -5 "$OUT/bites.log"
  wait $PEER; tail -40 "$OUT/peer.log"
  ps -eo pid,etimes,args | grep -E "sglang|mlaprop" | grep -v grep || echo "no sglang or mlaprop process left"
  ;;
D)
  # the H200 peer comparison, both parts at once (A: mlaprop eval vs SGLang run_eval on one server;
  # B: mlaprop run --smoke vs SGLang's test flow), with every log brought back
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"
  export PYTHONPATH=$REPO:$PYTHONPATH MLAPROP_DATASET=$D/mgsm_en.tsv
  jiter
  "$PY" -c "import openai, httpx, jiter; print('openai', openai.__version__, 'httpx', httpx.__version__, 'jiter', jiter.__version__)"
  step "build the canary once (both parts serve it)"
  "$PY" -c "from mlaprop.canary import ensure_canary; print(ensure_canary('$D/mgsm_en.tsv'))" 2>&1 | tail -2
  ARGS="--grammar-backend none --skip-server-warmup --mem-fraction-static 0.12 --max-total-tokens 600000"
  (timeout ${PEER_TIMEOUT:-500} "$PY" benchmarks/h200_peer.py --dataset "$D/mgsm_en.tsv" --out /tmp/peer-a \
      --server-args "$ARGS" --skip-whole-run > "$OUT/peer-a.log" 2>&1; echo "peer A exit $?" >> "$OUT/peer-a.log") &
  PA=$!
  [ "${SEQUENTIAL:-1}" = 1 ] && wait $PA  # B's timings alone on the GPU unless SEQUENTIAL=0
  (timeout ${PEER_TIMEOUT:-500} "$PY" benchmarks/h200_peer.py --dataset "$D/mgsm_en.tsv" --out /tmp/peer-b \
      --server-args "$ARGS" --skip-eval > "$OUT/peer-b.log" 2>&1; echo "peer B exit $?" >> "$OUT/peer-b.log") &
  PB=$!
  wait $PA 2>/dev/null; wait $PB
  for f in /tmp/peer-a/*.log /tmp/peer-b/*.log /tmp/peer-a/*.json /tmp/peer-b/*.json; do
    [ -f "$f" ] && tail -c 200000 "$f" > "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  step "peer A"; cat "$OUT/peer-a.log"; step "peer B"; cat "$OUT/peer-b.log"
  grep -c "Rate limit exception" /tmp/peer-a/a-sglang-0.log 2>/dev/null | sed 's/^/run_eval retries: /'
  ps -eo pid,etimes,args | grep -E "sglang|mlaprop" | grep -v grep || echo "no sglang or mlaprop process left"
  ;;
E)
  # the final proof in one call: D (the peer comparison, alone on the GPU), then the GPU tests with the
  # canary gate and both determinism-bites cases, run directly with the device venv's pytest (3 workers)
  PEER_TIMEOUT=${PEER_TIMEOUT:-300} bash "$0" D
  # shellcheck disable=SC1091
  source "$D/h200/on_device.sh" "$D/bundle.tar"  # installed by D already: this only exports
  export PYTHONPATH=$REPO:$PYTHONPATH MLAPROP_DATASET=$D/mgsm_en.tsv
  step "pytest tests/gpu -m 'gpu and nvidia' -n 3 (smoke: canary gate, determinism bites, seed failure)"
  t0=$SECONDS
  MLAPROP_EXPECT_VENDOR=nvidia MLAPROP_SMOKE=1 MLAPROP_READY_TIMEOUT=300 \
    MLAPROP_SERVER_ARGS="--grammar-backend none --skip-server-warmup --mem-fraction-static 0.12 --max-total-tokens 600000" \
    MLAPROP_REPORT_DIR=/tmp/mlaprop-report/smoke timeout ${GPU_TIMEOUT:-240} "$PY" -m pytest tests/gpu -m "gpu and nvidia" \
    -n 3 -p no:cacheprovider -rA --junitxml="$OUT/junit-gpu.xml" > "$OUT/gpu.log" 2>&1
  echo "pytest exit $?, $((SECONDS - t0)) s"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu.log" | tail -12
  cp /tmp/mlaprop-report/smoke/summary.json "$OUT/summary-smoke.json" 2>/dev/null
  smi
  ps -eo pid,etimes,args | grep -E "sglang|mlaprop" | grep -v grep || echo "no sglang or mlaprop process left"
  ;;
*) echo "usage: h200_session.sh A|B|C|D|E" >&2; exit 2 ;;
esac
