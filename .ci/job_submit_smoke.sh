#!/usr/bin/env bash
# A real cluster end to end: `ray start --head`, `ray job submit --working-dir . -- python learner/main.py …`,
# then check the job SUCCEEDED and wrote its metrics. Token auth is disabled for this throwaway cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled
out=$(mktemp -d)/run
ray stop --force >/dev/null 2>&1 || true
ray start --head --num-cpus=2 --disable-usage-stats --dashboard-host=127.0.0.1 >/dev/null
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
export RAY_ADDRESS=http://127.0.0.1:8265
ray job submit --working-dir . -- python learner/main.py \
  run.iterations=2 run.eval_prompts=8 run.eval_every=0 rollout.batch_size=16 grpo.group_size=4 \
  learner.micro_batch_size=8 sampler.num_steps=8 window.shift_interval=1 "run.output_dir=$out"
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
train = [r for r in recs if r["kind"] == "train"]
evals = [r for r in recs if r["kind"] == "eval"]
assert [r["iteration"] for r in train] == [0, 1], train
assert all({"reward_mean", "window_start", "iteration_seconds"} <= r.keys() for r in train)
assert evals and "eval_verifier_score" in evals[-1]
assert (out / "config.json").is_file() and any((out / "checkpoints").iterdir())
print(f"job submit smoke test ok: {len(train)} iterations, final eval {evals[-1]['eval_verifier_score']:.3f}")
PY
