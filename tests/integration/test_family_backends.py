"""The rest of the family on the real backends: TempFlow-GRPO, G²RPO, AWM and DiffusionNFT, each through the
config → build → rollout worker → learner path (`run_inprocess`, two iterations) on the tiny SD3 and FLUX pipelines
(LoRA; tiny transformers, VAEs and text encoders built from configs). The Ray driver around them is backend-agnostic
and runs every method on the tiny backend (test_trainer_ray.py, test_matching_ray.py, test_branched_ray.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from learner.driver.inprocess import run_inprocess
from reward_servers.client import LocalRewards
from services.config import load_config
from tests.integration.test_policies_diffusers import SIZE, flux_dir, sd3_dir  # noqa: F401

pytestmark = pytest.mark.integration
PROMPTS = ["a cat on a mat", "a red bicycle", "two dogs playing", "a bowl of soup"]


def cfg_for(backend: str, path: str, preset: str, tmp: Path):
    (tmp / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    rows = ["rollout.batch_size=8", "grpo.group_size=2", "window.size=2"]  # branched: 2 prompts × 2 steps × 2
    return load_config([preset], [
        f"model.backend={backend}", f"model.path={path}", f"model.height={SIZE}", f"model.width={SIZE}",
        "model.lora_rank=4", "sampler.num_steps=4", *rows, "learner.micro_batch_size=4",
        "learner.gradient_accumulation_steps=1", "rollout.num_workers=2", "run.iterations=2", "grpo.matching_times=2",
        "rollout.prompts=file", f"rollout.prompts_file={tmp / 'train.txt'}", f"run.eval_prompts_file={tmp / 'train.txt'}",
        "run.eval_prompts=2", "reward.rewards=[{name: jpeg_compressibility}]", "learner.lr=1e-3",
    ])


@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_every_family_method_on_the_real_backends(backend, request, tmp_path):
    path = request.getfixturevalue(f"{backend}_dir")
    for preset in ("tempflow_grpo", "g2rpo", "awm", "diffusion_nft"):
        cfg = cfg_for(backend, path, preset, tmp_path)
        stats, windows, learner = run_inprocess(cfg, LocalRewards.from_specs(cfg.reward.rewards))
        assert [s["weight_version"] for s in stats] == [1, 2], preset
        for s in stats:
            assert math.isfinite(s["loss"]) and s["grad_norm"] > 0, (preset, s)
        if preset in ("tempflow_grpo", "g2rpo"):  # the learner's log-prob of each child's step equals the worker's
            assert stats[0]["first_ratio_dev"] < 1e-5 and stats[0]["trained_steps"] == [0, 1], (preset, stats[0])
            assert stats[0]["images_scored"] == (16 if preset == "g2rpo" else 8)
        else:
            assert stats[0]["objective"] == {"awm": "awm", "diffusion_nft": "nft"}[preset]
        if preset != "diffusion_nft":  # workers sample with θ (NFT: with its lagged φ)
            packet = learner.get_weights()
            assert all(packet.state[k].equal(v) for k, v in learner.policy.trainable_state_dict().items())
