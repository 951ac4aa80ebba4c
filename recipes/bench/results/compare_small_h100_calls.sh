# The three GPU calls behind recipes/bench/results/compare_small_*_h100.* (issue 20, 2026-12-06,
# each run as `run` on one H100 with .whl and .bench carried; .bench/c2runs held call 2's
# finished run folders without checkpoints). Kept as the record of how the tables were made.
# They ran `python3 -m memopt compare`, written below as today's `python3 -m memopt.recipes compare`.

######## call 1: .bench/call1.sh
#!/usr/bin/env bash
# Call 1 of issue 20's GPU study: seed-0 lr sweeps and DCT/Muon variants, small preset, 2000 steps.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > $OUT/install.log 2>&1 || { tail $OUT/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $OUT/gpu.txt
MPS=0
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c "import torch; print(torch.ones(4, device='cuda').sum().item())"; then MPS=1
  else echo quit | nvidia-cuda-mps-control; sleep 1; fi
fi
if [ $MPS = 0 ]; then unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
echo "MPS=$MPS setup $(( $(date +%s) - T0 )) s" | tee $OUT/mps.txt
LEFT=$(( ${BUDGET:-560} - ($(date +%s) - T0) ))
run() { name=$1; jobs=$2; shift 2
  timeout -s INT $LEFT python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 --seeds 1 \
    --jobs $jobs --no-progress --out /tmp/sw/$name "$@" > /tmp/sw-$name.log 2>&1 & }
mkdir -p /tmp/sw
run main 12 --optimizers galore,dct,muon,polargrad --lrs galore=5e-3,1e-2,2e-2 --lrs dct=5e-3,1e-2,2e-2 \
    --lrs muon=0.01,0.02,0.04 --lrs polargrad=0.1,0.3,1.0
run dct-rot200 1 --optimizers dct --lrs 1e-2 --set moments_on_refresh=rotate
run dct-keep50 1 --optimizers dct --lrs 1e-2 --set update_proj_gap=50
run dct-rot50 1 --optimizers dct --lrs 1e-2 --set update_proj_gap=50 --set moments_on_refresh=rotate
run dct-rot10 1 --optimizers dct --lrs 1e-2 --set update_proj_gap=10 --set moments_on_refresh=rotate
run dct-rot1 1 --optimizers dct --lrs 1e-2 --set update_proj_gap=1 --set moments_on_refresh=rotate
run dct-ef 1 --optimizers dct --lrs 1e-2 --set error_feedback=fp32
run muon-wd 1 --optimizers muon --lrs 0.02 --set weight_decay=0.1
run peers 3 --optimizers peer-galore-torch,peer-torch-muon,fira --lrs peer-galore-torch=1e-2 --lrs peer-torch-muon=0.02 --lrs fira=1e-2
if [ $MPS = 1 ]; then
  run wave2 6 --optimizers adamw,fira,dct8bit --lrs adamw=5e-4,1e-3,2e-3 --lrs fira=5e-3,2e-2 --lrs dct8bit=1e-2
fi
sleep 60; nvidia-smi > $OUT/smi.txt; top -bn1 | head -20 >> $OUT/smi.txt
wait
pkill -f "memopt train"; sleep 2
echo "total $(( $(date +%s) - T0 )) s" | tee -a $OUT/mps.txt
cp /tmp/sw-*.log $OUT/ 2>/dev/null; 
tar -C /tmp/sw --exclude=checkpoint.pt -czf $OUT/sw.tgz .
for f in /tmp/sw/*/results.json; do echo "== $f"; python3 -c "
import json; r=json.load(open('$f')); print(r['table'])
for x in r['runs']: print(x['optimizer'], x.get('lr'), x['config']['seed'] if 'config' in x else '', x.get('status'), x.get('val_loss'), x.get('ms_per_step'))
"; done
tail -5 /tmp/sw-main.log

######## call 2: .bench/call2.sh
#!/usr/bin/env bash
# Call 2 of issue 20's GPU study: the final runs of adamw/galore/fira/muon (default lr, 3 seeds;
# x0.5 and x2 on seed 0) and seed-0 probes of DCT refresh modes and PolarGrad scalings.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > /tmp/install.log 2>&1 || { tail /tmp/install.log; exit 1; }
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY /tmp/sw
nvidia-cuda-mps-control -d && echo MPS on
LEFT=$(( ${BUDGET:-560} - ($(date +%s) - T0) ))
run() { name=$1; jobs=$2; shift 2
  timeout -s INT $LEFT python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 \
    --jobs $jobs --no-progress --out /tmp/sw/$name "$@" > /tmp/sw/$name.log 2>&1 & }
run seeds 12 --seeds 3 --optimizers adamw,galore,fira,muon
run lrs 8 --lrs x0.5,x2 --optimizers adamw,galore,fira,muon
run dct-fill200 1 --optimizers dct --lrs x1 --set moments_on_refresh=rotate_fill
run dct-fill50 1 --optimizers dct --lrs x1 --set moments_on_refresh=rotate_fill --set update_proj_gap=50
run dct-fill10 1 --optimizers dct --lrs x1 --set moments_on_refresh=rotate_fill --set update_proj_gap=10
run dct-keep10 1 --optimizers dct --lrs x1 --set update_proj_gap=10
run pg-rel 3 --optimizers polargrad --lrs 0.01,0.02,0.04 --set scaling=relative_nuclear_norm --set weight_decay=0.1
run pg-wd 1 --optimizers polargrad --lrs x1 --set weight_decay=0.01
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > /tmp/sw/smi.txt; uptime >> /tmp/sw/smi.txt
wait
echo "total $(( $(date +%s) - T0 )) s" | tee /tmp/sw/total.txt
tar -C /tmp/sw --exclude=checkpoint.pt -czf $OUT/sw2.tgz .
for f in /tmp/sw/*/results.json; do echo "== $f"; python3 -c "
import json; r=json.load(open('$f')); print(r['table'])"; done

######## call 3: .bench/call3.sh
#!/usr/bin/env bash
# Call 3 of issue 20's GPU study: DCT, DCT8bit, PolarGrad with the new defaults (3 seeds; x0.5,
# x2 on seed 0), Muon and Fira seeds left from call 2, then the two tables over every run
# (call 2's finished runs carried in .bench/c2runs, kept by --resume).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation . > /tmp/install.log 2>&1 || { tail /tmp/install.log; exit 1; }
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY /tmp/sw
nvidia-cuda-mps-control -d && echo MPS on
LEFT=$(( ${BUDGET:-440} - ($(date +%s) - T0) ))
C="python3 -m memopt.recipes compare --device cuda --preset small --steps 2000 --no-progress"
run() { name=$1; shift; timeout -s INT $LEFT $C --out /tmp/sw/$name "$@" > /tmp/sw/$name.log 2>&1 & }
mkdir -p /tmp/sw/c && cp -r .bench/c2runs/runs /tmp/sw/c/
run a --seeds 3 --optimizers dct,dct8bit,polargrad --jobs 9
run b --lrs x0.5,x2 --optimizers dct,polargrad --jobs 4
run c --seeds 3 --optimizers muon,fira --resume --jobs 4
run d --lrs x2 --optimizers muon --jobs 1
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > /tmp/sw/smi.txt; uptime >> /tmp/sw/smi.txt
wait
echo "trained $(( $(date +%s) - T0 )) s" | tee /tmp/sw/total.txt
mkdir -p /tmp/final/runs
cp -r .bench/c2runs/runs/* /tmp/final/runs/
for d in a b c d; do for s in $(cd /tmp/sw/$d && find runs -name summary.json); do
  f=$(dirname $s); mkdir -p /tmp/final/$f; cp /tmp/sw/$d/$f/* /tmp/final/$f/ 2>/dev/null; done; done
rm -f /tmp/final/runs/*/*/*/checkpoint.pt
mkdir -p /tmp/final-lrs && cp -r /tmp/final/runs /tmp/final-lrs/
ALL=adamw,galore,fira,dct,dct8bit,muon,polargrad
timeout -s INT 40 $C --seeds 3 --optimizers $ALL --resume --jobs 1 --out /tmp/final > /tmp/sw/table-seeds.log 2>&1
timeout -s INT 40 $C --lrs x0.5,x1,x2 --lrs fira=x1 --lrs dct8bit=x1 --lrs muon=x1,x2 --optimizers $ALL \
  --resume --jobs 1 --out /tmp/final-lrs > /tmp/sw/table-lrs.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" | tee -a /tmp/sw/total.txt
cp /tmp/final/results.json /tmp/sw/results-seeds.json; cp /tmp/final-lrs/results.json /tmp/sw/results-lrs.json
cp /tmp/final/loss_curves.png /tmp/sw/ 2>/dev/null
tar -C /tmp/sw --exclude=checkpoint.pt -czf $OUT/sw3.tgz .
tail -22 /tmp/sw/table-seeds.log; tail -30 /tmp/sw/table-lrs.log | head -28
