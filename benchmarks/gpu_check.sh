#!/usr/bin/env bash
# Every measurement of issue 13 in one go, on a lent GPU machine (one H100/H200; README "Performance").
# It installs nothing from the network: wheels for what that machine lacks (diffusers, torch-fidelity)
# travel in .whl/, the golden vectors in .gpu/ (see DEVELOPERS.md for how to prepare both).
#
#   bash benchmarks/gpu_check.sh                     # every stage (about 20+ min on an H200: split it, below)
#   bash benchmarks/gpu_check.sh train_bf16 sample   # only these stages
#   DIFFFIT_BENCH_SMALL=1 bash benchmarks/gpu_check.sh   # CPU smoke run of the whole script: tiny sizes
#
# Stages (estimated H200 minutes, unmeasured): tests 2, attention 0.5, train_bf16 5 (3 methods x compile
# off/on, batch 32), train_fp8 3.5 (difffit, bitfit x bf16/fp8, compiled), train_big 3 (batch 64),
# fp8_loss 2.5 (300 steps each), sample 2.5, dit_forward 2, fid 1.5. One 10-minute call holds about
# "tests attention train_bf16 train_fp8"; a second "fp8_loss sample dit_forward fid train_big".
# Each stage writes $OUT/<stage>.json (its JSON) and $OUT/<stage>.log (stderr); at the end all stages
# of this call are merged into $OUT/<gpu>_torch-<version>_<date>.json, the file to commit under
# benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/difffit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 DIFFFIT_NO_DOWNLOAD=1
# Compiled graphs shared between stages (train_step's first compiled worker still starts cold).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/difffit-inductor}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
[ -f .gpu/dit_reference_small.safetensors ] && export DIFFFIT_GOLDEN="$PWD/.gpu/dit_reference_small.safetensors"

if [ -n "${DIFFFIT_BENCH_SMALL:-}" ] && [ "${DIFFFIT_BENCH_SMALL}" != 0 ]; then
  # The same commands at toy sizes on the CPU: fp8 takes its dequantizing path (no tensor cores).
  DEV=cpu; CFG=DiT-S/2; LAT=8; B=4; BIG=8; SB=4; SSTEPS=2; FP8ANY=--fp8-anywhere; R=2; NIMG=20; T=1
  TESTS="tests/test_fp8.py tests/test_fast_train.py"
else
  DEV=cuda; CFG=DiT-XL/2; LAT=32; B=32; BIG=64; SB=64; SSTEPS=25; FP8ANY=; R=7; NIMG=1000; T=0
  TESTS="tests/test_cuda.py tests/test_fp8.py tests/test_fast_train.py tests/test_dit.py tests/test_diffusion.py"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

run_stage() {  # run_stage NAME TIMEOUT COMMAND...: stdout (one JSON object) -> $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo $rc > "$OUT/$name.rc"
  tail -n 30 "$OUT/$name.json"
  [ $rc -eq 0 ] || { echo "!! $name exited with $rc"; tail -n 15 "$OUT/$name.log"; }
  echo "-- $name: $((SECONDS - start)) s"
}

ALL="tests attention train_bf16 train_fp8 train_big fp8_loss sample dit_forward fid"
STAGES=${*:-$ALL}
TS="python3 benchmarks/train_step.py --device $DEV --config $CFG --latent $LAT --threads $T $FP8ANY"
for stage in $STAGES; do
  case $stage in
    tests) run_stage tests 240 python3 -m pytest -q -p no:cacheprovider -rs $TESTS ;;
    attention) run_stage attention 60 python3 benchmarks/attention.py --device $DEV --batch $B ;;
    train_bf16) run_stage train_bf16 420 $TS --batch $B --methods difffit,bitfit,full --precision bf16 \
      --compile off,on --repeats $R ;;
    train_fp8) run_stage train_fp8 300 $TS --batch $B --methods difffit,bitfit --precision bf16,fp8 \
      --compile on --repeats $R ;;
    train_big) run_stage train_big 300 $TS --batch $BIG --methods difffit,full --precision bf16,fp8 \
      --compile on --repeats $R ;;
    fp8_loss) run_stage fp8_loss 300 python3 benchmarks/fp8_loss.py --device $DEV --config $CFG --latent $LAT \
      --batch $B --compile on $FP8ANY ;;
    sample) run_stage sample 300 python3 benchmarks/sample_throughput.py --device $DEV --config $CFG \
      --latent $LAT --batch $SB --steps $SSTEPS --precision bf16,fp8 --compile off,on --repeats $R $FP8ANY ;;
    dit_forward) run_stage dit_forward 240 python3 benchmarks/dit_forward.py --device $DEV --config $CFG \
      --latent $LAT --batch $B --precision bf16 --compile on --repeats $R ;;
    fid) run_stage fid 180 python3 benchmarks/fid.py --device $DEV --num-images $NIMG --size 64 --batch-size 100 \
      --repeats 3 ;;
    *) echo "!! unknown stage $stage (known: $ALL)" ;;
  esac
done

# One file for this call, named by GPU, torch version and date; stages that failed are listed.
python3 - "$OUT" $STAGES <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from _timing import environment, result_name
import torch
out, stages = Path(sys.argv[1]), sys.argv[2:]
env = environment("cuda" if torch.cuda.is_available() else "cpu")
path = out / f"{result_name(env)}.json"
# A second call on the same day (the rest of the stages) adds to the first call's file.
merged = json.loads(path.read_text()) if path.exists() else {"environment": env, "stages": {}, "failed": []}
merged["failed"] = [s for s in merged["failed"] if s.split()[0] not in stages]
for stage in stages:
    text = (out / f"{stage}.json").read_text() if (out / f"{stage}.json").exists() else ""
    rc = (out / f"{stage}.rc").read_text().strip() if (out / f"{stage}.rc").exists() else "missing"
    try:
        merged["stages"][stage] = json.loads(text) if stage != "tests" else text.strip().splitlines()
    except json.JSONDecodeError:
        rc = rc if rc != "0" else "no JSON"
    if rc != "0":
        merged["failed"].append(f"{stage} (exit {rc})")
path.write_text(json.dumps(merged, indent=1))
print(f"wrote {path}; failed stages: {merged['failed'] or 'none'}")
EOF
