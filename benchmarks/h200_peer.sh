#!/bin/bash
# mlaprop against SGLang's own code on the H200, real SGLang 0.5.11 (one device call, about 5-8 minutes).
#
# The device gets only the repository: carry a folder (ignored by git) holding ../shared/h200, its
# bundle.tar (made by ../shared/h200/build_bundle.sh) and the MGSM-en file, e.g.
#   mkdir -p .h200 && cp -r ../shared/h200 .h200/ && cp /tmp/h200_bundle/bundle.tar .h200/ \
#     && cp ../shared/data/mgsm/mgsm_en.tsv .h200/
# then, on the device (run tool, carry [".h200"]):
#   bash benchmarks/h200_peer.sh .h200/bundle.tar .h200/h200 .h200/mgsm_en.tsv "$OUT"
# Prints A (mlaprop eval vs SGLang run_eval MGSM-en on one running server) and B (mlaprop run vs SGLang's
# MLA FP8 test flow: popen_launch_server + run_eval + kill_process_tree), mlaprop / SGLang; writes
# OUT/h200_peer.json and the logs. More options: benchmarks/h200_peer.py --help (--limit, --reps, ...).
set -euo pipefail
BUNDLE=${1:?bundle.tar}
H200=${2:?the shared/h200 folder (on_device.sh)}
DATASET=${3:?mgsm_en.tsv}
OUT=${4:-${OUT:-/tmp/h200-peer}}
shift $(( $# < 4 ? $# : 4 ))
# shellcheck disable=SC1091
source "$H200/on_device.sh" "$BUNDLE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
"$DEVICE_PYTHON" -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
exec "$DEVICE_PYTHON" benchmarks/h200_peer.py --dataset "$DATASET" --out "$OUT" "$@"
