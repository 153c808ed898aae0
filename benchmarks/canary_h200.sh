# The canary proof on the H200 device with real SGLang 0.5.11 (shared/h200/README.md), from the repo root:
#   MGSM=.devwork/mgsm_en.tsv BUNDLE=.devwork/bundle.tar H200=.devwork/h200 bash benchmarks/canary_h200.sh
#   CANARY_LM_VARIANT=1 also trains a variant with a prompt LM loss and reports its rope sensitivity (+~70 s).
# Results (JSON, logs) under $OUT: build.log, canary.json, candidates.json, ready.json, results.jsonl, servers.log.
set -u
export PYTHONUNBUFFERED=1
source ${H200:-.devwork/h200}/on_device.sh ${BUNDLE:-.devwork/bundle.tar}
D=benchmarks
export PYTHONPATH=$PWD:$PYTHONPATH
PY=$DEVICE_PYTHON
DS=$PWD/${MGSM:-.devwork/mgsm_en.tsv}
echo "start $(date -u +%T)"; nvidia-smi --query-gpu=name,memory.used --format=csv
$PY -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
$PY $D/canary_h200.py build $DS /tmp/cache $OUT 2>&1 | tee $OUT/build.log
M=$(cat /tmp/canary_path) || exit 1
du -sh $M; ls -la $M
FACT=$($PY -c "import json,sys;sys.path.insert(0,'$D');from canary_h200 import CORRUPTIONS as K;c=json.load(open('$OUT/candidates.json'));print(next((k for k in K if c[k]<245),K[-1]))")
OVK=$($PY -c "import json;c=json.load(open('$OUT/candidates.json'));print(next((k for k in ('rope_theta_1e6','no_yarn','rms_eps_1e-2') if c[k]<245),'rms_eps_1e-2'))")
case $OVK in rope_theta_1e6) OVR='{"rope_theta": 1000000}';; no_yarn) OVR='{"rope_scaling": null}';; *) OVR='{"rms_norm_eps": 0.01}';; esac
echo "corruption $FACT; override $OVR"
$PY $D/canary_h200.py corrupt $M /tmp/corrupt $FACT
$PY $D/canary_h200.py tiny /tmp/tiny
C="--trust-remote-code --grammar-backend none --skip-server-warmup --mem-fraction-static 0.3 --max-total-tokens 600000 --host 127.0.0.1"
launch() { p=$1; shift; $PY -m sglang.launch_server --port $p $C "$@" > /tmp/s$p.log 2>&1 & }
TS=$(date +%s)
launch 30001 --model-path $M --kv-cache-dtype fp8_e5m2 --enable-deterministic-inference
launch 30002 --model-path $M --kv-cache-dtype auto --attention-backend triton --enable-deterministic-inference
launch 30003 --model-path /tmp/corrupt --kv-cache-dtype fp8_e5m2 --enable-deterministic-inference
launch 30004 --model-path $M --kv-cache-dtype fp8_e5m2 --enable-deterministic-inference --json-model-override-args "$OVR"
launch 30005 --model-path /tmp/tiny --kv-cache-dtype fp8_e5m2 --enable-deterministic-inference
launch 30006 --model-path /tmp/tiny --kv-cache-dtype fp8_e5m2
$PY $D/canary_h200.py wait 260 $TS 30001 30002 30003 30004 30005 30006 | tee $OUT/ready.json
for p in 30001 30002 30003 30004; do echo "{\"port\": $p, \"eval\": $($PY $D/canary_h200.py eval $p $DS $M 2>&1 | tail -1)}" >> $OUT/results.jsonl; done
for p in 30005 30006; do echo "{\"port\": $p, \"probe\": $($PY $D/canary_h200.py probe $p 2>&1 | tail -1)}" >> $OUT/results.jsonl; done
cat $OUT/results.jsonl
for p in 30001 30002 30003 30004 30005 30006; do echo "=== $p"; grep -aiE "missing|not initialized|warn|error|Traceback|backend|fired up|KV Cache is allocated" /tmp/s$p.log | head -30; tail -5 /tmp/s$p.log; done > $OUT/servers.log 2>&1
echo "end $(date -u +%T)"
