#!/usr/bin/env bash
# Issue 29, one GPU call: (1) fidelity, small preset, 2000 steps, seeds 0-2: GaLoreAdamW with
# full-precision weights, INT8 weights with stochastic rounding, INT8 with round-to-nearest,
# on Python source and on English prose, each run its own process under MPS, in the
# background; (2) in the foreground, the 7B memory rows of bench.memory, each row a fresh
# process (peak memory is per process; tokens/s is shared with the background runs);
# (3) the bf16 reference rows once the fidelity runs are done.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > $OUT/install.log 2>&1 || { tail $OUT/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, sys, transformers; print(torch.__version__, sys.version, transformers.__version__)" | tee -a $OUT/gpu.txt
MPS=0
[ "${FID_DATA:-stdlib}" = none ] && SKIP_MPS=1
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if [ -z "${SKIP_MPS:-}" ] && command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c "import torch; print(torch.ones(4, device='cuda').sum().item())"; then MPS=1
  else echo quit | nvidia-cuda-mps-control; sleep 1; fi
fi
if [ $MPS = 0 ]; then unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
echo "MPS=$MPS setup $(( $(date +%s) - T0 )) s" | tee $OUT/mps.txt
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - T0) )); }
mkdir -p /tmp/sw
fid() { name=$1; data=$2; shift 2
  timeout -s INT $(left) python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 \
    --data $data --seeds 3 --jobs 3 --no-progress --optimizers galore --out /tmp/sw/$name "$@" \
    > /tmp/sw-$name.log 2>&1 & }
for data in ${FID_DATA:-stdlib}; do
  [ "$data" = none ] && break
  fid fp32_$data $data
  fid sr_$data $data --quantize-weights 8
  fid rtn_$data $data --quantize-weights 8 --weight-rounding nearest
done
bench() { name=$1; shift
  L=$(( $(left) - 15 )); [ $L -lt 40 ] && { echo "skip $name: no time"; return; }
  echo "== $name ($L s left)"
  timeout -s INT $L python3 -m memopt.recipes.bench.memory --models 7b --steps 3 --timeout 120 \
    --out $OUT/mem_$name.json "$@" 2>&1 | grep -v "^$" | tail -45
}
bench int8_1024 --weights int8 --ranks 1024 --optimizers dct8bit,trion8bit
bench int8_1024g --weights int8 --ranks 1024 --optimizers galore8bit
bench bf16_dct --weights bf16 --optimizers dct8bit
bench int8_512 --weights int8 --ranks 512 --optimizers dct8bit,galore8bit
bench int8_2048 --weights int8 --ranks 1024 --optimizers trion8bit,dct8bit --seq-len 2048
bench int8_more --weights int8 --ranks 1024 --optimizers galoremuon8bit,fira8bit
echo "fidelity runs done? $(( $(date +%s) - T0 )) s"; wait; echo "waited until $(( $(date +%s) - T0 )) s"
bench bf16_ref --weights bf16 --optimizers adamw,galore8bit
echo "total $(( $(date +%s) - T0 )) s"
for f in /tmp/sw-*.log; do echo "== $f"; grep -E "^\[|^\| galore" $f | tail -4; done
cp /tmp/sw-*.log $OUT/ 2>/dev/null
tar -C /tmp/sw --exclude=checkpoint.pt -czf $OUT/fidelity.tgz .
