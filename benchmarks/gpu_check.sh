#!/usr/bin/env bash
# The prepared GPU run for a session that is lent a machine (device tool: `run`, one call, a timeout that leaves
# room for a rerun). Everything it measures lands in $OUT (or ./gpu_out): the gpu test tier, then the GPU
# benchmarks, each bounded so that one slow part cannot eat the others' time.
#
#   bash benchmarks/gpu_check.sh            # ~7 min on one H200
#   TESTS=0 SYNC=0 METHODS="dance_grpo mixgrpo" bash benchmarks/gpu_check.sh   # the timing alone
#
# A machine without network that lacks Ray, diffusers or the Serve stack gets them from .whl/site.tar.xz when it
# is there (benchmarks/device_site.sh packs it; carry it with the working tree).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.device_count(), 'GPUs; ray', ray.__version__, 'diffusers', diffusers.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/gpu.txt"
# the gpu tier only: collecting the whole suite would import the CPU tiers' optional test tools
[ "${TESTS:-1}" = 1 ] && timeout ${GPU_TESTS_S:-200} python3 -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
[ "${SYNC:-1}" = 1 ] && timeout ${SYNC_S:-70} python3 benchmarks/weight_sync.py --device cuda --dtype bf16 --sizes 1e8 2.5e9 --max-params 3e9 \
  --workers 1 --repeats 2 --out "$OUT/weight_sync_gpu.md" 2>&1 | grep -v "^INFO\|logging.cc" | tail -15
timeout ${COMPARE_S:-300} python3 benchmarks/compare_methods.py --architecture sd3_5_medium --device cuda \
  --methods ${METHODS:-dance_grpo mixgrpo mixgrpo_flash mixgrpo_flash_star} --iterations ${ITERATIONS:-2} \
  --workdir /tmp/arch --out "$OUT/compare_sd35_medium.md" 2>&1 | grep -v "^INFO\|logging.cc" | tee "$OUT/compare.log" | tail -30
# each run's iterations as they were logged, also when the table above was cut short by the timeout
python3 - <<'PY' 2>&1 | tee -a "$OUT/compare.log"
import json, pathlib
for f in sorted(pathlib.Path("/tmp/arch").glob("*/metrics.jsonl")):
    recs = [json.loads(line) for line in f.read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    for a, b in zip([None] + train, train):
        t = b["rollout_timings"]
        print(f.parent.name, "iter", b["iteration"], "s/iter", None if a is None else round(b["time"] - a["time"], 2),
              "rollout_s", round(t["rollout_s"], 2), "update_s", round(b["update_s"], 2), "nfe", b["nfe"],
              "image_evals", b["image_evals"], "steps/row", b["steps_per_row"], "ratio_dev", b["first_ratio_dev"],
              "version", b["weight_version"])
PY
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$OUT/gpu.txt"
ls -la "$OUT"
