#!/usr/bin/env bash
# The prepared GPU run for a session that is lent a machine (device tool: `run`, one call, a timeout that leaves
# room for a rerun). Everything it measures lands in $OUT (or ./gpu_out): the gpu test tier, then the GPU
# benchmarks, each bounded so that one slow part cannot eat the others' time.
#
#   bash benchmarks/gpu_check.sh            # ~10 min on one H200
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPUs')" \
  | tee -a "$OUT/gpu.txt"
timeout 240 python -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
timeout 120 python benchmarks/weight_sync.py --device cuda --dtype bf16 --sizes 1e8 2.5e9 --max-params 3e9 \
  --workers 1 --repeats 2 --out "$OUT/weight_sync_gpu.md" 2>&1 | tail -15
timeout 300 python benchmarks/compare_methods.py --architecture sd3_5_medium --device cuda \
  --methods dance_grpo mixgrpo mixgrpo_flash mixgrpo_flash_star --iterations 3 --workdir /tmp/arch \
  --out "$OUT/compare_sd35_medium.md" 2>&1 | grep -v "^INFO\|logging.cc" | tail -30
ls -la "$OUT"
