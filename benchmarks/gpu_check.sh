#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (one H100/H200; see README "Performance").
# It installs nothing from the network: wheels for what that machine lacks (diffusers, torch-fidelity)
# travel in .whl/, the golden vectors in .gpu/ (see README "GPU check" for how to prepare both).
#
#   bash benchmarks/gpu_check.sh            # prints JSON lines; with $OUT set, also writes $OUT/*.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/difffit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 DIFFFIT_NO_DOWNLOAD=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
[ -f .gpu/dit_reference_small.safetensors ] && export DIFFFIT_GOLDEN="$PWD/.gpu/dit_reference_small.safetensors"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

step() {  # step NAME TIMEOUT COMMAND...: run one check, keep its last JSON line
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log" | grep -v '^\s*$' | tail -n 25
  [ $rc -eq 0 ] || echo "!! $name exited with $rc"
}

step tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_dit.py tests/test_diffusion.py \
  tests/test_difffit.py
step train_step 200 python3 benchmarks/train_step.py --device cuda --config DiT-XL/2 --latent 32 --batch 32 \
  --precision bf16 --repeats 10 --warmup 3
step sample_throughput 120 python3 benchmarks/sample_throughput.py --device cuda --config DiT-XL/2 --latent 32 \
  --batch 64 --steps 250 --scheduler ddpm --cfg-scale 1.5 --precision bf16
step dit_forward 90 python3 benchmarks/dit_forward.py --device cuda --config DiT-XL/2 --latent 32 --batch 32
step fid 120 python3 benchmarks/fid.py --device cuda --num-images 1000 --size 64 --batch-size 100
