#!/bin/bash
# mlaprop against SGLang's own code on the H200, real SGLang 0.5.11 (one device call, about 5-8 minutes).
#
# The device gets only the repository: prepare the lead's .devwork/ layout on this machine with
#   bash benchmarks/h200_prepare.sh      (.devwork/bundle.tar, .devwork/h200/, .devwork/mgsm_en.tsv)
# then run on the device (run tool, carry [".devwork/bundle.tar", ".devwork/h200", ".devwork/mgsm_en.tsv"]):
#   bash benchmarks/h200_peer.sh [BUNDLE [H200_DIR [MGSM_TSV [OUT]]]] [-- h200_peer.py options]
# (defaults: .devwork/bundle.tar .devwork/h200 .devwork/mgsm_en.tsv $OUT); with OUT=$OUT the logs, reports
# and h200_peer.json come back. Prints A (mlaprop eval vs SGLang run_eval MGSM-en on one running server) and
# B (mlaprop run vs SGLang's MLA FP8 test flow: popen_launch_server + run_eval + kill_process_tree),
# mlaprop / SGLang. More options: benchmarks/h200_peer.py --help (--limit, --reps, --server-args, ...).
set -euo pipefail
ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ARGS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
BUNDLE=${ARGS[0]:-.devwork/bundle.tar}
H200=${ARGS[1]:-.devwork/h200}
DATASET=${ARGS[2]:-.devwork/mgsm_en.tsv}
OUT=${ARGS[3]:-${OUT:-/tmp/h200-peer}}
# shellcheck disable=SC1091
source "$H200/on_device.sh" "$BUNDLE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
"$DEVICE_PYTHON" -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
exec "$DEVICE_PYTHON" benchmarks/h200_peer.py --dataset "$DATASET" --out "$OUT" "$@"
