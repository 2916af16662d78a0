"""Precision per role, on the CPU (the same code as on a GPU, where `auto` picks bf16): rollout workers hold bf16
inference weights, the learner fp32 master weights of what it trains under bf16 autocast; the weight packet is sent
in the workers' dtype, so every sync verifies exactly, for a LoRA adapter and for the whole transformer."""

from __future__ import annotations

import pytest
import torch

from learner.driver.build import build_learner, build_worker
from reward_servers.client import LocalRewards
from services.config import load_config
from tests.integration.test_policies_diffusers import SIZE, sd3_dir  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
PROMPTS = ["a cat on a mat", "a red bicycle"]


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_bf16_inference_weights_fp32_master_weights_and_exact_syncs(sd3_dir, tmp_path, lora_rank):  # noqa: F811
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config([], [
        "model.backend=sd3", f"model.path={sd3_dir}", f"model.height={SIZE}", f"model.width={SIZE}",
        f"model.lora_rank={lora_rank}", "model.weights_dtype=bfloat16", "model.autocast_bf16=true",
        "model.guidance_scale=3.0", "sampler.num_steps=4", "window.size=2", "grpo.group_size=2", "rollout.batch_size=4",
        "learner.micro_batch_size=4", "rollout.prompts=file", f"rollout.prompts_file={tmp_path / 'p.txt'}",
        f"run.eval_prompts_file={tmp_path / 'p.txt'}", "reward.rewards=[{name: jpeg_incompressibility}]"])
    learner = build_learner(cfg)
    worker = build_worker(cfg, LocalRewards.from_specs(cfg.reward.rewards))
    trained = {id(p) for p in learner.policy.trainable_parameters()}
    assert all(p.dtype == torch.float32 for p in learner.policy.trainable_parameters())  # fp32 master weights
    frozen = [p for p in learner.policy.transformer.parameters() if id(p) not in trained]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # (none at lora_rank 0: the whole transformer trains)
    assert learner.policy.vae is None  # the learner trains on recorded latents: no VAE, no text encoders
    worker_weights = dict(worker.policy.transformer.named_parameters())
    assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16) for n, p in worker_weights.items())

    assert worker.sync_weights(learner.get_weights()) == 0  # verified against the packet's checksum
    batch = worker.rollout(0, (1, 2), PROMPTS, [0, 1])
    assert batch.latents.dtype == torch.float32 and batch.log_probs.dtype == torch.float32
    # at the start the learner's fp32 master weights are the upcast of the workers' bf16 ones: ratio exactly 1
    assert learner.update(batch)["first_ratio_dev"] < 1e-6
    packet = learner.get_weights()
    assert {t.dtype for t in packet.state.values()} == {torch.float32 if lora_rank else torch.bfloat16}
    assert worker.sync_weights(packet) == 1  # loads exactly what was sent (checksum), in the worker's dtype
    # after an update too: LoRA has the fp32 adapter and bf16 base on both sides; a full fine-tune samples with
    # the bf16 rounding of the master weights, which is what bf16 autocast multiplies with in the learner
    # (measured 0.0 for both here; parameters that autocast leaves in fp32 would make the full fine-tune's ≈ 1e-3)
    dev = learner.update(worker.rollout(1, (1, 2), PROMPTS, [0, 1]))["first_ratio_dev"]
    assert dev < 1e-6, dev
