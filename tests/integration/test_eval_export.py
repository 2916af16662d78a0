"""`learner.tools.eval` (per-category scores, determinism, hybrid inference) and `learner.tools.export` (tiny checkpoint,
diffusers LoRA for SD3 / FLUX) on small models built in code; no Ray."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from learner.driver.build import policy_from_config
from learner.evaluation import AdapterOff, heldout_prompts, sample_images
from learner.tools import eval as evaluation
from learner.tools import export
from learner.training import save_checkpoint
from rollout_workers.policies.flux import FluxPolicy
from rollout_workers.policies.sd3 import SD3Policy
from rollout_workers.policies.tiny import TinyPolicy
from services import shapes_world
from services.config import ConfigError, dump_config, load_config
from tests.integration.test_policies_diffusers import PROMPTS, SIZE, TEXT_LEN, flux_dir, inputs, sd3_dir  # noqa: F401
from tests.integration.test_trainer_ray import small_checkpoint  # noqa: F401

pytestmark = pytest.mark.integration
EVAL = dict(per_category=2, num_steps=6, seed=0)


def make_run(run, *model):
    """A run folder: config.json and one checkpoint whose trainable weights are the start's plus noise."""
    (run / "eval_prompts.txt").write_text("\n".join(PROMPTS) + "\n")  # real backends are evaluated on a file
    cfg = load_config([], [f"run.output_dir={run}", "sampler.num_steps=6", "reward.rewards=[{name: shapes_verifier}]",
                           f"run.eval_prompts_file={run / 'eval_prompts.txt'}", *model])
    dump_config(cfg, run / "config.json")
    policy = policy_from_config(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():  # LoRA: A and B, so the adapter is not the identity
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_checkpoint(run / "checkpoints", 0, policy.trainable_state_dict(), {}, {"version": 1, "run_id": "t"})
    return cfg, run / "checkpoints" / "iter_000000", policy


def scores(result):
    return {k: result[k] for k in ("overall", "per_category")}


def test_eval_per_category_deterministic_and_hybrid(small_checkpoint, tmp_path):  # noqa: F811
    cfg, ckpt, _ = make_run(tmp_path, f"model.path={small_checkpoint}", "run.eval_rewards=[shapes_verifier]")
    full = evaluation.evaluate_checkpoint(cfg, ckpt, **EVAL)
    assert list(full["per_category"]) == list(shapes_world.CATEGORIES)
    for m in [*full["per_category"].values(), full["overall"]]:
        assert set(m) - {"n"} == {"shapes_verifier", "verifier_score", "verifier_strict"}
        assert all(0.0 <= m[k] <= 1.0 for k in m if k != "n")
    # the verifier scorer behind Serve and the rule verifier are the same function
    assert full["overall"]["shapes_verifier"] == pytest.approx(full["overall"]["verifier_score"], abs=1e-6)
    assert scores(evaluation.evaluate_checkpoint(cfg, ckpt, **EVAL)) == scores(full)  # deterministic
    base = evaluation.evaluate_checkpoint(cfg, None, **EVAL)
    assert scores(evaluation.evaluate_checkpoint(cfg, ckpt, hybrid_fraction=0.0, **EVAL)) == scores(base)
    assert scores(evaluation.evaluate_checkpoint(cfg, ckpt, hybrid_fraction=1.0, **EVAL)) == scores(full)
    half = evaluation.evaluate_checkpoint(cfg, ckpt, hybrid_fraction=0.5, **EVAL)
    assert half["hybrid_trained_steps"] == 3 and scores(half) not in (scores(full), scores(base))


def test_hybrid_sampling_switches_models_at_the_fraction(small_checkpoint, tmp_path):  # noqa: F811
    cfg, ckpt, _ = make_run(tmp_path, f"model.path={small_checkpoint}")
    trained, base = evaluation.load_models(cfg, ckpt, need_base=True)
    prompts = heldout_prompts(1, 0)
    kw = dict(num_steps=6, shift=3.0, seed=3, batch_size=3)
    t_img, b_img = sample_images(trained, prompts, **kw), sample_images(base, prompts, **kw)
    assert not np.array_equal(t_img, b_img)
    assert np.array_equal(sample_images(trained, prompts, base=base, fraction=0.0, **kw), b_img)
    half = sample_images(trained, prompts, base=base, fraction=0.5, **kw)
    assert not np.array_equal(half, t_img) and not np.array_equal(half, b_img)


def test_lora_base_is_the_policy_with_its_adapter_off(small_checkpoint, tmp_path):  # noqa: F811
    cfg, ckpt, _ = make_run(tmp_path, f"model.path={small_checkpoint}", "model.lora_rank=4")
    trained, base = evaluation.load_models(cfg, ckpt, need_base=True)
    assert isinstance(base, AdapterOff)
    start = TinyPolicy.load(small_checkpoint)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.4])
    cond = start.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(base.velocity(x, sigma, cond), start.velocity(x, sigma, cond))
        assert not torch.allclose(trained.velocity(x, sigma, cond), start.velocity(x, sigma, cond))


def test_eval_cli_writes_json(small_checkpoint, tmp_path, capsys, monkeypatch):  # noqa: F811
    make_run(tmp_path, f"model.path={small_checkpoint}")
    out = tmp_path / "eval.json"
    assert evaluation.main(["--run", str(tmp_path), "--per-category", "1", "--num-steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith("iter_000000") and result["num_steps"] == 4
    assert "| **overall** |" in capsys.readouterr().out and "requirements" not in result
    assert evaluation.main(["--run", str(tmp_path), "--per-category", "1", "--num-steps", "4", "--breakdown",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["requirements"]) == {*shapes_world.CATEGORIES, "all"}
    assert result["requirements"]["position"]["relation"] in (0.0, 1.0)  # one position prompt
    assert "| held-out | **all** | 4 |" in capsys.readouterr().out
    sd3 = load_config([], ["model.backend=sd3", "model.path=/nonexistent",
                           f"run.eval_prompts_file={tmp_path / 'eval_prompts.txt'}"])
    with pytest.raises(ConfigError, match="tiny backend only"):  # named before any model is loaded
        evaluation.evaluate_checkpoint(sd3, None, breakdown=True)
    assert evaluation.main(["--run", str(tmp_path / "nowhere")]) == 2
    monkeypatch.setattr(evaluation, "load_models", lambda *a, **k: pytest.fail("a wrong path loads no model"))
    assert evaluation.main(["--run", str(tmp_path), "--checkpoint", str(tmp_path / "checkpoints" / "iter_999")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [0, 4])
def test_export_tiny_loads_with_the_trained_weights(small_checkpoint, tmp_path, lora):  # noqa: F811
    _, ckpt, trained = make_run(tmp_path, f"model.path={small_checkpoint}", f"model.lora_rank={lora}",
                                "model.lora_alpha=8")
    out = tmp_path / "exported"
    assert export.main(["--run", str(tmp_path), "--out", str(out)]) == 0
    loaded = TinyPolicy.load(out)
    assert loaded.trainable.lora_rank == 0  # a plain checkpoint: the adapter is fused
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.4])
    cond = loaded.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, cond), trained.velocity(x, sigma, cond),
                                   rtol=1e-5, atol=1e-5)
    info = json.loads((out / "export.json").read_text())
    assert info["iteration"] == 0 and info["guidance_scale"] == 1.0
    assert export.main(["--run", str(tmp_path), "--out", str(out)]) == 2  # never overwrites


@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_export_lora_loads_into_the_diffusers_pipeline(backend, sd3_dir, flux_dir, tmp_path):  # noqa: F811
    base_dir = {"sd3": sd3_dir, "flux": flux_dir}[backend]
    _, ckpt, trained = make_run(tmp_path, f"model.backend={backend}", f"model.path={base_dir}", "model.lora_rank=4",
                                "model.lora_alpha=8", f"model.height={SIZE}", f"model.width={SIZE}",
                                f"model.guidance_scale={3.5 if backend == 'flux' else 1.0}")
    out = tmp_path / "lora"
    assert export.main(["--run", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # safetensors writes 0600: an export for others must be readable by them (umask allowing)
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f

    pipe_cls, policy_cls = {"sd3": (StableDiffusion3Pipeline, SD3Policy), "flux": (FluxPipeline, FluxPolicy)}[backend]
    pipe = pipe_cls.from_pretrained(base_dir, local_files_only=True)
    plain = policy_cls(pipe, height=SIZE, width=SIZE, lora_rank=0, max_sequence_length=TEXT_LEN,
                       **({"guidance_scale": 3.5} if backend == "flux" else {}))
    trained.max_sequence_length = TEXT_LEN
    x, sigma = inputs(plain)
    cond = plain.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = plain.velocity(x, sigma, cond)
        pipe.load_lora_weights(out)  # the exported folder, as a user would load it
        after = plain.velocity(x, sigma, cond)
        expected = trained.velocity(x, sigma, cond)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)  # rank and alpha (scale 2) preserved
