"""On a GPU (`python -m pytest -m gpu`; skipped without CUDA): every model and tensor of a role on CUDA, the same
seeded noise as on the CPU, ratio 1 at the first update under bf16 autocast with bf16 inference weights, and a
two-iteration run of the SD3 architecture on one GPU through Ray with every weight sync verified."""

from __future__ import annotations

import json

import pytest
import torch

from learner.algo import Window
from learner.driver.build import build_learner, build_worker, policy_from_config
from learner.driver.loop import run_loop
from reward_servers.client import LocalRewards
from reward_servers.service import reward_service
from services.config import load_config
from tests.integration.test_policies_diffusers import SIZE, sd3_dir  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
PROMPTS = ["a cat on a mat", "a red bicycle", "two dogs playing", "a bowl of soup"]


def gpu_cfg(model_dir, tmp_path, *extra):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return load_config(["sd3_5_medium", "mixgrpo"], [
        f"model.path={model_dir}", f"model.height={SIZE}", f"model.width={SIZE}", "model.device=cuda", "sampler.num_steps=6",
        "window.size=2", "window.shift_interval=1", "grpo.group_size=4", "rollout.batch_size=16",
        "learner.micro_batch_size=4", "learner.gradient_accumulation_steps=2", "rollout.num_workers=1",
        "rollout.num_gpus=0.5", "learner.num_gpus=0.5", "rollout.num_cpus=0.5", "learner.num_cpus=0.5",
        f"rollout.prompts_file={tmp_path / 'p.txt'}", f"run.eval_prompts_file={tmp_path / 'p.txt'}",
        "run.eval_prompts=4", "run.iterations=2", "run.eval_every=0", f"run.output_dir={tmp_path / 'run'}",
        "reward.rewards=[{name: jpeg_incompressibility, num_cpus: 0.25}]", *extra])


def test_roles_hold_their_models_on_cuda_in_their_precision(sd3_dir, tmp_path):  # noqa: F811
    cfg = gpu_cfg(sd3_dir, tmp_path)
    rollout, learner = policy_from_config(cfg.model, "rollout"), policy_from_config(cfg.model, "learner")
    for name, p in rollout.pipe.transformer.named_parameters():
        assert p.is_cuda and p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in rollout.vae.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in learner.trainable_parameters())  # fp32 master
    assert learner.vae is None and learner.pipe.text_encoder_3 is None  # only the role that needs them


def test_cpu_and_gpu_runs_of_one_seed_start_from_the_same_noise_and_the_first_ratio_is_one(sd3_dir, tmp_path):  # noqa: F811
    cfg = gpu_cfg(sd3_dir, tmp_path)
    rewards = LocalRewards.from_specs(cfg.reward.rewards)
    gpu_worker, learner = build_worker(cfg, rewards), build_learner(cfg)
    cpu_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "cpu"})})
    cpu_worker = build_worker(cpu_cfg, rewards)
    window = (1, 2)
    init_gpu, sde_gpu = gpu_worker._noise(0, [0, 1], Window(*window))
    init_cpu, sde_cpu = cpu_worker._noise(0, [0, 1], Window(*window))
    assert torch.equal(init_gpu, init_cpu) and torch.equal(sde_gpu, sde_cpu)  # drawn on the CPU, then moved
    gpu_worker.sync_weights(learner.get_weights())
    batch = gpu_worker.rollout(0, window, PROMPTS, [0, 1, 2, 3])
    assert batch.latents.device.type == "cpu" and batch.latents.dtype == torch.float32  # fp32 across processes
    stats = learner.update(batch)
    print(f"first ratio deviation under bf16 autocast on {torch.cuda.get_device_name()}: {stats['first_ratio_dev']:.2e}")
    assert stats["first_ratio_dev"] < 1e-3
    assert learner.policy.device.type == "cuda"


def test_two_iterations_of_the_sd3_architecture_on_one_gpu(ray_cluster, sd3_dir, tmp_path):  # noqa: F811
    cfg = gpu_cfg(sd3_dir, tmp_path)
    with reward_service(cfg.reward):
        run_loop(cfg, tmp_path / "run", "t-gpu")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["weight_version"] for r in train] == [1, 2]  # every broadcast verified by version and checksum
    assert all(r["first_ratio_dev"] < 1e-3 for r in train)
    assert [e["iteration"] for e in recs if e["kind"] == "eval"] == [-1, 1]


def test_the_weight_fingerprint_is_the_same_number_on_the_gpu_as_on_the_cpu():
    from services.broadcast import WeightPacket, tensor_fingerprint, verify_loaded, weights_checksum

    torch.manual_seed(0)
    state = {"a": torch.randn(4097, 33), "b": torch.randn(300, dtype=torch.bfloat16), "c": torch.arange(5, dtype=torch.uint8),
             "d": torch.randn(40_000_000, dtype=torch.bfloat16)}  # d: three levels of folding, three chunks
    cuda = {k: v.cuda() for k, v in state.items()}
    for k in state:
        assert int(tensor_fingerprint(cuda[k])) == int(tensor_fingerprint(state[k])), k
    # a byte view that starts mid-word, a transposed (non-contiguous) view
    for t in (torch.arange(9, dtype=torch.uint8)[1:], state["a"].t()):
        assert int(tensor_fingerprint(t.cuda())) == int(tensor_fingerprint(t))
    mixed = {"a": cuda["a"], "b": state["b"]}  # one state on two devices: the fingerprint, each where it is
    assert weights_checksum(mixed) == weights_checksum({"a": state["a"], "b": state["b"]}, "fp")
    packet = WeightPacket.build(3, cuda)  # a GPU sender: the fingerprint, taken on the GPU
    assert packet.checksum == weights_checksum(state, "fp") and packet.checksum.startswith("fp:")
    verify_loaded(packet, cuda, 3)  # a GPU receiver
    verify_loaded(packet, packet.state, 3)  # a CPU one
