#!/usr/bin/env bash
# Every GPU measurement in one go, on a lent GPU machine (one H100/H200; README "Performance").
# It installs nothing from the network: wheels for what that machine lacks (diffusers, torch-fidelity)
# travel in .whl/, the golden vectors in .gpu/ (see DEVELOPERS.md for how to prepare both).
#
#   bash benchmarks/gpu_check.sh                     # every stage, most wanted first
#   bash benchmarks/gpu_check.sh train_bf16 sample   # only these stages
#   DIFFFIT_GPU_BUDGET=420 bash benchmarks/gpu_check.sh  # stop starting stages once 420 s are spent
#   DIFFFIT_BENCH_SMALL=1 bash benchmarks/gpu_check.sh   # CPU smoke run of the whole script: tiny sizes
#
# A lease is short (15 minutes in all, a start included), so stages run in order of how much their figure
# is wanted, each under its own limit, and with DIFFFIT_GPU_BUDGET set no stage starts or runs past it
# (what is left is listed as "out of time" in the merged file, to be run in a later call by name).
# Each stage's JSON and stderr go to a work folder; $OUT receives only the merged
# <gpu>_torch-<version>_<date>.json (the file to commit under benchmarks/results/) and stages-logs.tar.gz,
# because a lent machine returns at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/difffit-gpu-check}
WORK=$(mktemp -d /tmp/difffit-gpu-stages.XXXXXX)
mkdir -p "$OUT"
DEADLINE=$(( ${DIFFFIT_GPU_BUDGET:-0} > 0 ? SECONDS + DIFFFIT_GPU_BUDGET - 15 : 0 ))  # 15 s kept for the merge
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
  PIXART="--config tiny --t5 tiny --tokens 8 --batches 1,2 --precision no"
  T2IMEM="--device cpu --configs flux-tiny,sd35-tiny,pixart-tiny --px 64 --steps 1 --threads 1"
  BUCKETS="--config tiny --batch 2 --tokens 8 --sizes 64x64,80x48,128x32 --precision no --compile off --images 10000"
  TESTS="tests/test_fp8.py tests/test_fast_train.py"
  T2ISTEP="--device cpu --configs flux-tiny,sd35-tiny,pixart-tiny --px 64 --batch 1 --repeats 2 --threads 1"
else
  DEV=cuda; CFG=DiT-XL/2; LAT=32; B=32; BIG=64; SB=64; SSTEPS=25; FP8ANY=; R=5; NIMG=1000; T=0
  PIXART="--config alpha-512 --t5 xxl --tokens 120 --batches 8,16,32,64,128,256 --precision bf16"
  # FLUX.1-dev (12B, random weights built on the GPU) at 512 px, batch 1; fp8 through _scaled_mm only.
  T2IMEM="--device cuda --configs flux-dev --px 512 --steps 3 --fp8-matmul kernel --budget 130"
  TESTS="tests/test_cuda.py tests/test_fp8.py tests/test_t2i_memory.py tests/test_fast_train.py tests/test_dit.py tests/test_diffusion.py
    tests/test_flow_memory.py::test_flow_families_fit_and_sample_on_cuda"
  # Real widths, heads and tokens at 512 px, each stack cut to 3 blocks: five copies of each model (one per
  # method, full fine-tuning's with fp32 AdamW state) fit one GPU; the ratios are per block.
  T2ISTEP="--device cuda --configs pixart-alpha-512,sd35-large,flux-dev --blocks 3 --px 512 --batch 4 \
    --precision bf16 --repeats 5 --steps-per-repeat 3"
  BUCKETS="--config alpha-512 --batch 32 --tokens 120 --sizes 512x512,736x352,1024x256 --precision bf16 \
    --compile off,on --repeats 3"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

run_stage() {  # run_stage NAME TIMEOUT COMMAND...: stdout (one JSON object) -> $WORK/NAME.json
  local name=$1 limit=$2; shift 2
  if [ "$DEADLINE" -gt 0 ]; then  # never past the budget; a stage with under 30 s left is not started
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 30 ]; then echo "!! $name: out of time"; echo "out of time" > "$WORK/$name.rc"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit $limit s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.json" 2> "$WORK/$name.log"
  local rc=$?
  echo $rc > "$WORK/$name.rc"
  tail -n 30 "$WORK/$name.json"
  [ $rc -eq 0 ] || { echo "!! $name exited with $rc"; tail -n 15 "$WORK/$name.log"; }
  echo "-- $name: $((SECONDS - start)) s"
}

# Most wanted first: the training figures (DiT, then PixArt-α 512: DiffFit vs full), the memory of FLUX.1-dev
# (DiffFit with fp8 frozen weights and checkpointing against 24 GB), DiffFit's step on PixArt, SD3 and FLUX
# against LoRA and the frozen-weight floor, then sampling, the diffusers comparison,
# fp8 loss, FID, the CUDA tests (the fp8 loss stage already checks the fp8 path end to end), the text cache
# against encoding on the fly (PixArt with T5-XXL), the larger batch, and aspect-ratio buckets (PixArt
# steps at non-square buckets against the square, eager and compiled).
ALL="attention train_bf16 train_fp8 pixart t2i_memory t2i_step sample dit_forward fp8_loss fid tests pixart_text train_big buckets"
STAGES=${*:-$ALL}
TS="python3 benchmarks/train_step.py --device $DEV --config $CFG --latent $LAT --threads $T $FP8ANY"
for stage in $STAGES; do
  case $stage in
    tests) run_stage tests 180 python3 -m pytest -q -p no:cacheprovider -rs $TESTS ;;
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
    pixart) run_stage pixart 150 python3 benchmarks/pixart_train.py --device $DEV $PIXART --methods difffit,full \
      --text cached --repeats 3 ;;
    t2i_memory) run_stage t2i_memory 170 python3 benchmarks/t2i_memory.py $T2IMEM --batch 1 --methods difffit,lora,full \
      --rank 16 --precision fp8,bf16 --checkpointing on,off ;;
    t2i_step) run_stage t2i_step 240 python3 benchmarks/t2i_step.py $T2ISTEP ;;
    pixart_text) run_stage pixart_text 150 python3 benchmarks/pixart_train.py --device $DEV $PIXART --methods difffit \
      --text cached,encode --repeats 3 ;;
    buckets) run_stage buckets 240 python3 benchmarks/buckets.py --device $DEV $BUCKETS ;;
    fid) run_stage fid 180 python3 benchmarks/fid.py --device $DEV --num-images $NIMG --size 64 --batch-size 100 \
      --repeats 3 ;;
    *) echo "!! unknown stage $stage (known: $ALL)" ;;
  esac
done

# One file for this call, named by GPU, torch version and date; stages that failed are listed.
python3 - "$OUT" "$WORK" $STAGES <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from _timing import environment, result_name
import torch
out, work, stages = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
env = environment("cuda" if torch.cuda.is_available() else "cpu")
path = out / f"{result_name(env)}.json"
# A second call on the same day (the rest of the stages) adds to the first call's file.
merged = json.loads(path.read_text()) if path.exists() else {"environment": env, "stages": {}, "failed": []}
merged["failed"] = [s for s in merged["failed"] if s.split()[0] not in stages]
for stage in stages:
    text = (work / f"{stage}.json").read_text() if (work / f"{stage}.json").exists() else ""
    rc = (work / f"{stage}.rc").read_text().strip() if (work / f"{stage}.rc").exists() else "missing"
    if rc == "out of time":
        merged["failed"].append(f"{stage} (out of time)")
        continue
    try:
        merged["stages"][stage] = json.loads(text) if stage != "tests" else text.strip().splitlines()
    except json.JSONDecodeError:
        rc = rc if rc != "0" else "no JSON"
    if rc != "0":
        merged["failed"].append(f"{stage} (exit {rc})")
path.write_text(json.dumps(merged, indent=1))
print(f"wrote {path}; failed stages: {merged['failed'] or 'none'}")
EOF
tar -czf "$OUT/stages-logs.tar.gz" -C "$WORK" .
