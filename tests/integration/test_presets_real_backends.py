"""The real-model presets (`sd3_5_medium`, `flux_dev`) on CPU, end to end: tiny SD3 / FLUX pipelines and a tiny CLIP
PickScore built from configs into temporary folders, every MixGRPO method for two iterations with the presets' own
settings (LoRA, bf16 autocast, gradient checkpointing, one backward per timestep; SD3's CFG and KL), evaluation
records from the configured reward, a checkpoint, and (through `python learner/main.py`) an exported LoRA that
diffusers loads. Sizes and GPU counts are overridden to fit two CPU cores; nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from learner.driver.loop import run_loop
from reward_servers.service import reward_service
from rollout_workers.policies.flux import FluxPolicy
from services.config import load_config
from tests.integration.test_policies_diffusers import SIZE, flux_dir, inputs, sd3_dir  # noqa: F401
from tests.redis_server import free_port
from tests.unit.test_scorers import _tiny_clip

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRAIN = ["a cat on a mat", "a red bicycle", "two dogs playing", "a bowl of soup"]
HELD_OUT = ["a green bird", "a tall tree"]


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> str:
    return _tiny_clip(tmp_path_factory.mktemp("pickscore") / "PickScore_v1")


def overrides(model_dir, out: Path, clip: str) -> list[str]:
    """What a two-core CPU changes in a real-model preset: paths, sizes, CPUs instead of GPUs."""
    (out / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (out / "heldout.txt").write_text("\n".join(HELD_OUT) + "\n")
    return [
        f"model.path={model_dir}", f"model.height={SIZE}", f"model.width={SIZE}", "sampler.num_steps=4",
        "window.size=2", "window.shift_interval=1", "grpo.group_size=2", "rollout.batch_size=4",
        "learner.micro_batch_size=2", "learner.gradient_accumulation_steps=1", "rollout.num_workers=1",
        "rollout.num_gpus=0", "learner.num_gpus=0", "rollout.num_cpus=0.25", "learner.num_cpus=0.25",
        f"rollout.prompts_file={out / 'train.txt'}", f"run.eval_prompts_file={out / 'heldout.txt'}",
        "run.eval_prompts=2", "run.iterations=2", "run.eval_every=0", "learner.checkpoint_every=1",
        f"reward.rewards=[{{name: pickscore, model_path: {clip}, num_gpus: 0, num_cpus: 0.1}}]",
        f"reward.server.port={free_port()}", f"run.output_dir={out}",
    ]


def records(out: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "eval"]


def check_run(out: Path, method: str) -> None:
    train, evals = records(out)
    assert [r["iteration"] for r in train] == [0, 1] and [r["weight_version"] for r in train] == [1, 2]
    # on-policy across processes under bf16 autocast: the learner recomputes the rollout's log-probs
    assert train[0]["first_ratio_dev"] < 1e-3, train[0]["first_ratio_dev"]
    assert all(r["num_updates"] == 2 for r in train)  # 4 samples per iteration, 2 per optimizer step
    starts = [r["window_start"] for r in train]
    assert starts == ([0, 0] if method == "mixgrpo_flash_star" else [0, 1])
    assert [e["iteration"] for e in evals] == [-1, 1]
    for e in evals:  # the configured reward judges the real backend, never the 32×32 verifier
        assert e["eval_columns"] == ["pickscore"] and not any("verifier" in k for k in e)
    assert (out / "checkpoints" / "iter_000001" / "state.json").is_file()


@pytest.mark.parametrize("preset, model_fixture, methods", [
    ("sd3_5_medium", "sd3_dir", ["mixgrpo", "mixgrpo_flash_star"]),  # mixgrpo_flash: on FLUX, through main.py
    ("flux_dev", "flux_dir", ["mixgrpo", "mixgrpo_flash_star"]),  # mixgrpo_flash: through main.py, below
])
def test_every_mixgrpo_method_on_the_real_model_presets(ray_cluster, request, pickscore_dir, tmp_path, preset,
                                                          model_fixture, methods):
    model_dir = request.getfixturevalue(model_fixture)
    for m in methods:
        (tmp_path / m).mkdir()
    cfgs = {m: load_config([preset, m], overrides(model_dir, tmp_path / m, pickscore_dir)) for m in methods}
    first = next(iter(cfgs.values()))
    assert first.model.lora_rank == 32 and first.model.autocast_bf16 and first.learner.timesteps_per_backward == 1
    if preset == "sd3_5_medium":
        assert first.model.guidance_scale == 4.5 and first.grpo.kl_beta == 0.01
    with reward_service(first.reward):
        for method, cfg in cfgs.items():
            run_loop(cfg, Path(cfg.run.output_dir), f"t-{preset}-{method}")
    for method, cfg in cfgs.items():
        check_run(Path(cfg.run.output_dir), method)
        if preset == "sd3_5_medium":
            assert all(r["kl"] >= 0.0 for r in records(Path(cfg.run.output_dir))[0])


def test_flux_preset_through_main_then_its_exported_lora_loads_in_diffusers(flux_dir, pickscore_dir,  # noqa: F811
                                                                               tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "learner/main.py", "--config", "flux_dev", "--config", "mixgrpo_flash",
           *overrides(flux_dir, out, pickscore_dir), "cluster.num_cpus=2", "cluster.dashboard=false"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "held-out pickscore=" in done.stdout
    check_run(out, "mixgrpo_flash")
    exported = tmp_path / "lora"
    done = subprocess.run([sys.executable, "-m", "learner.tools.export", "--run", str(out), "--out", str(exported)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the exported adapter, loaded into the base pipeline as a user would, gives the trained policy's velocity
    from learner.tools.eval import load_models
    from learner.training import latest_checkpoint

    trained, _ = load_models(load_config([out / "config.json"]), latest_checkpoint(out / "checkpoints"), False)
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    plain = FluxPolicy(pipe, height=SIZE, width=SIZE, lora_rank=0, guidance_scale=trained.guidance_scale,
                       autocast_bf16=trained.autocast_bf16)  # the preset's bf16 autocast on both sides
    x, sigma = inputs(plain)
    cond = plain.encode_prompts(HELD_OUT)
    with torch.no_grad():
        before = plain.velocity(x, sigma, cond)
        pipe.load_lora_weights(exported)
        after, expected = plain.velocity(x, sigma, cond), trained.velocity(x, sigma, cond)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
