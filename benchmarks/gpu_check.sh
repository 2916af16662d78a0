#!/usr/bin/env bash
# The prepared GPU run for a session that is lent a machine (device tool: `run`). Everything it measures lands in
# $OUT (or ./gpu_out), each part bounded so that one slow part cannot eat the others' time.
#
# What it cost on one H200 (2026-12-04, two sessions): unpacking the site 10 s; the gpu tier 57–94 s; cfg_backward
# ~50 s; the SD3.5-Medium comparison 35–60 s to build the random-weight pipeline and start Ray, then per method ~45 s
# of start-up and evaluations plus its iterations. At learner micro-batch 3 × 4 those were DanceGRPO 47 + 45 s,
# MixGRPO 19 + 17 s, Flash 15 + 13 s and Flash* 14 + 13 s: 385 s for the four methods. The learner now runs at
# 12 × 1 on a GPU, where MixGRPO took 13 + 11 s, so expect less. A call runs 600 s at most and a session has
# 15 minutes of device time, so make each call at once after the last, while the machine is warm. What is still
# unmeasured, in order (cfg_backward has its GPU numbers: CFGB=0 unless its code changes):
#
#   TESTS=1 SYNC=1 CFGB=0 COMPARE=0 bash benchmarks/gpu_check.sh   # ~4 min: gpu tier (the fp checksum on CUDA), weight sync, checksums
#   TESTS=0 SYNC=0 CFGB=0 bash benchmarks/gpu_check.sh        # ~5 min: the four methods at micro-batch 12, 2 iterations
#   TESTS=0 SYNC=0 CFGB=0 ARCH=flux_dev METHODS="mixgrpo_flash" ITERATIONS=2 bash benchmarks/gpu_check.sh   # FLUX, untimed yet
#
# A machine without network that lacks Ray, diffusers or the Serve stack gets them from .whl/site.tar.xz when it
# is there (benchmarks/device_site.sh packs it; carry `.whl` with the working tree).
set -u
OUT=${OUT:-gpu_out} ARCH=${ARCH:-sd3_5_medium}
mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site || { echo "could not unpack .whl/site.tar.xz"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.device_count(), 'GPUs; ray', ray.__version__, 'diffusers', diffusers.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cores: /' | tee -a "$OUT/gpu.txt"
echo "settings: TESTS=${TESTS:-1} SYNC=${SYNC:-1} CFGB=${CFGB:-1} COMPARE=${COMPARE:-1} ARCH=$ARCH METHODS=${METHODS:-default}" \
  "ITERATIONS=${ITERATIONS:-2} GPU_TESTS_S=${GPU_TESTS_S:-200} SYNC_S=${SYNC_S:-90} COMPARE_S=${COMPARE_S:-480}" | tee -a "$OUT/gpu.txt"
# after each part: no Ray process a bound cut short keeps the GPU (the tarball installs no `ray` command)
ray_stop() { python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1; }
# the gpu tier only: collecting the whole suite would import the CPU tiers' optional test tools
[ "${TESTS:-1}" = 1 ] && timeout -k 15 ${GPU_TESTS_S:-200} python3 -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
ray_stop
[ "${SYNC:-1}" = 1 ] && timeout -k 15 ${SYNC_S:-90} python3 benchmarks/weight_sync.py --device cuda --dtype bf16 --sizes 1e8 2.5e9 --max-params 3e9 \
  --workers 1 --repeats 2 --out "$OUT/weight_sync_gpu.md" 2>&1 | grep -v "^INFO\|logging.cc" | tee "$OUT/weight_sync.log" | tail -15
ray_stop
# the two checksums side by side on the GPU: blake2b after a copy to the host against the fingerprint on the device
[ "${SYNC:-1}" = 1 ] && timeout -k 10 ${CHECKSUMS_S:-60} python3 benchmarks/checksums.py --device cuda --dtype bf16 \
  --sizes 1e8 2.5e9 --repeats 2 --out "$OUT/checksums_gpu.md" 2>&1 | tee "$OUT/checksums.log" | tail -6
# the learner's step under CFG, reference way against ours, at SD3.5-Medium's real per-GPU shape (~1 min)
[ "${CFGB:-1}" = 1 ] && timeout -k 15 ${CFGB_S:-150} python3 benchmarks/cfg_backward.py --device cuda --layers 24 \
  --size 512 --text 333 --checkpointing --rows 3 --out "$OUT/cfg_backward_gpu.md" 2>&1 | tail -6
if [ "${COMPARE:-1}" = 1 ]; then
  rm -rf "/tmp/arch_$ARCH"  # metrics.jsonl appends: a rerun on a warm machine must not mix two runs
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> "$OUT/gpu.txt"
  timeout -k 15 ${COMPARE_S:-480} python3 benchmarks/compare_methods.py --architecture $ARCH --device cuda \
    --methods ${METHODS:-dance_grpo mixgrpo mixgrpo_flash mixgrpo_flash_star} --iterations ${ITERATIONS:-2} \
    --workdir /tmp/arch_$ARCH --out "$OUT/compare_$ARCH.md" 2>&1 | grep -v "^INFO\|logging.cc" | tee "$OUT/compare.log" | tail -30
  # each run's iterations as they were logged, also when the table above was cut short by the timeout
  ARCH=$ARCH python3 - <<'PY' 2>&1 | tee -a "$OUT/compare.log"
import json, os, pathlib
for f in sorted(pathlib.Path(f"/tmp/arch_{os.environ['ARCH']}").glob("*/metrics.jsonl")):
    recs = []
    for line in f.read_text().splitlines():  # a line cut by the kill is skipped, not fatal
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    train = [r for r in recs if r.get("kind") == "train"]
    for a, b in zip([None] + train, train):
        t = b["rollout_timings"]
        print(f.parent.name, "iter", b["iteration"], "s/iter", None if a is None else round(b["time"] - a["time"], 2),
              "rollout_s", round(t["rollout_s"], 2), "update_s", round(b["update_s"], 2), "fwd+bwd_s",
              round(b["forward_backward_s"], 2), "optimizer_s", round(b["optimizer_s"], 2), "nfe", b["nfe"],
              "image_evals", b["image_evals"], "steps/row", b["steps_per_row"], "ratio_dev", b["first_ratio_dev"],
              "version", b["weight_version"])
PY
  ray_stop
fi
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$OUT/gpu.txt"
ls -la "$OUT"
