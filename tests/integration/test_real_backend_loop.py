"""The driver loop with a real diffusers backend: a tiny SD3 pipeline built in code (16×16 images, 8×8 latents
with 4 channels) through one iteration and its evaluations, scored by the configured reward through the run's
reward service, never by the 32×32 shapes verifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from learner import evaluation
from learner.driver.build import policy_from_config
from learner.driver.loop import run_loop
from learner.outputs.grids import PAD, default_scale
from reward_servers.client import LocalRewards
from services.config import load_config
from tests.integration.conftest import own_reward_service
from tests.integration.test_policies_diffusers import SIZE, sd3_dir  # noqa: F401

pytestmark = pytest.mark.integration

TRAIN_PROMPTS = ["a cat on a mat", "a red bicycle", "two dogs playing", "a bowl of soup"]
EVAL_PROMPTS = ["a green bird", "a tall tree", "a blue car"]


def sd3_cfg(model_dir, out):
    (out / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (out / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n# a comment line, skipped\n")
    return load_config([], [
        "model.backend=sd3", f"model.path={model_dir}", f"model.height={SIZE}", f"model.width={SIZE}",
        "model.lora_rank=4", "sampler.num_steps=4", "window.size=2", "grpo.group_size=2", "rollout.batch_size=4",
        "rollout.num_workers=1", "rollout.num_cpus=0.25", "learner.num_cpus=0.25", "learner.micro_batch_size=4",
        "rollout.prompts=file", f"rollout.prompts_file={out / 'train.txt'}", f"run.eval_prompts_file={out / 'eval.txt'}",
        "run.eval_prompts=2", "run.iterations=1", "run.eval_every=0", "learner.checkpoint_every=1", "learner.lr=1e-3",
        f"run.output_dir={out}", "reward.rewards=[{name: jpeg_incompressibility, num_cpus: 0.1}]",
    ])


def test_sd3_loop_trains_and_evaluates_with_the_configured_reward(ray_cluster, sd3_dir, tmp_path):  # noqa: F811
    cfg = sd3_cfg(sd3_dir, tmp_path)
    with own_reward_service(cfg.reward):
        result = run_loop(cfg, tmp_path, "t-sd3")
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(train) == 1 and train[0]["first_ratio_dev"] < 1e-5 and train[0]["weight_version"] == 1
    assert [e["iteration"] for e in evals] == [-1, 0]
    assert result["final_eval"] == {k: v for k, v in evals[-1].items() if k != "time"}
    for e in evals:  # scored by the configured reward on the prompts file's first two prompts; no verifier
        assert e["eval_columns"] == ["jpeg_incompressibility"] and e["eval_num_prompts"] == 2
        assert not any("verifier" in k for k in e) and e["eval_jpeg_incompressibility"] > 0

    # the base evaluation through Serve equals the same evaluation done in-process from the saved pipeline
    base = policy_from_config(cfg.model)
    local = evaluation.evaluate(base, evaluation.run_prompts(cfg), **evaluation.settings(cfg),
                                rewards=LocalRewards.from_specs(cfg.reward.rewards).fns)
    assert evals[0]["eval_jpeg_incompressibility"] == pytest.approx(local["overall"]["jpeg_incompressibility"],
                                                                   rel=1e-6)
    grid = np.asarray(Image.open(tmp_path / evals[0]["samples"]))
    scale = default_scale(SIZE)  # small cells are upscaled to ~128 px
    assert grid.shape == (SIZE * scale, (2 * SIZE + PAD) * scale, 3)  # two 16×16 cells in a row, not 32×32 shapes
    assert (tmp_path / "checkpoints" / "iter_000000" / "state.json").is_file()
    weights = torch.load(tmp_path / "checkpoints" / "iter_000000" / "optimizer.pt", weights_only=True)
    assert weights["state"]  # the LoRA adapter was trained
