"""The memory preflight on worked examples: the real FLUX.1-dev and SD3.5-Medium architectures (configs only, built
on the meta device: no weights), the activation formula, LoRA parameter counts against peft's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, T5Config

from learner.driver.cluster_checks import resource_demand, resource_shortfall
from learner.driver.preflight import (
    BUSY_TOKENS,
    Architecture,
    activation_gb,
    check_memory,
    diffusers_architecture,
    estimate_memory,
    learner_forward_tokens,
    lora_rank1_params,
    micro_batch_advice,
    suggested_micro_batch,
)
from services.config import ConfigError, load_config

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, projection_dim=1280)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)


def write_folder(root: Path, transformer, text_encoders: dict[str, tuple[str, dict]]) -> Path:
    """A pipeline folder holding only configs (what the preflight reads)."""
    family = "FluxPipeline" if type(transformer).__name__.startswith("Flux") else "StableDiffusion3Pipeline"
    index = {"_class_name": family, "transformer": ["diffusers", type(transformer).__name__],
             "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    transformer.save_config(root / "transformer")
    with torch.device("meta"):
        AutoencoderKL(**VAE16).save_config(root / "vae")
    for name, (cls, config) in text_encoders.items():
        (CLIPTextConfig if cls.startswith("CLIP") else T5Config)(**config).save_pretrained(root / name)
        index[name] = ["transformers", cls]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> Path:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are FLUX.1-dev's shape
    return write_folder(tmp_path_factory.mktemp("flux"), transformer,
                        {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)})


@pytest.fixture(scope="module")
def sd35_medium(tmp_path_factory) -> Path:
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return write_folder(tmp_path_factory.mktemp("sd35"), transformer, {
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL)})


def flux_cfg(path, *overrides):
    return load_config(["flux_dev"], [f"model.path={path}", *overrides])


def test_parameter_counts_of_the_real_architectures(flux_dev, sd35_medium):
    flux = diffusers_architecture(flux_cfg(flux_dev))
    assert flux.params["transformer"] == 11_901_408_320  # FLUX.1-dev: 11.9 B
    assert flux.params["text_encoder_2"] == 4_762_310_656  # the T5-XXL encoder
    assert flux.blocks == 19 + 38 and flux.hidden == 3072
    assert flux.image_tokens == (720 // 16) ** 2 and flux.text_tokens == 512
    # LoRA on the attention projections: 8 of 3072×3072 in a double block, 3 in a single one: in + out each
    assert flux.lora_params == 19 * 8 * 6144 + 38 * 3 * 6144
    sd3 = diffusers_architecture(load_config(["sd3_5_medium"], [f"model.path={sd35_medium}"]))
    assert 2.2e9 < sd3.params["transformer"] < 2.6e9  # SD3.5-Medium: 2.5 B
    assert sd3.image_tokens == (512 // 8 // 2) ** 2 and sd3.blocks == 24


def test_full_fine_tuning_of_flux_on_one_80_gb_learner_is_refused_naming_the_fields(flux_dev):
    cfg = flux_cfg(flux_dev, "model.lora_rank=0")
    with pytest.raises(ConfigError) as err:
        check_memory(cfg)
    msg = str(err.value)
    assert "learner needs ~" in msg and "80 GB GPU (cluster.gpu_memory_gb)" in msg and "model.lora_rank" in msg
    learner = next(r for r in estimate_memory(cfg) if r.role == "learner")
    # 11.9 B trained parameters × (4 fp32 weights + 4 gradients + 8 AdamW moments) = 190 GB
    states = sum(learner.parts[k] for k in ("transformer weights", "gradients (fp32)", "AdamW moments (fp32)"))
    assert states == pytest.approx(11_901_408_320 * 16 / 1e9, rel=1e-9)


def test_a_rollout_worker_that_does_not_fit_gets_advice_for_a_rollout_worker(flux_dev):
    """FLUX.1-dev on a 40 GB GPU (p4d): the rollout worker (~49 GB, bf16 weights, LoRA already) was told to train a
    LoRA, shard the learner and use bf16, none of which shrinks it."""
    with pytest.raises(ConfigError) as err:
        check_memory(flux_cfg(flux_dev, "cluster.gpu_memory_gb=40"))
    line = next(x for x in str(err.value).splitlines() if "rollout worker needs" in x)
    assert line.endswith("change model.weights_dtype=bfloat16 if it is float32, or GPUs with more memory: a rollout "
                         "worker holds the whole model for inference (LoRA and learner sharding do not shrink it)")


def test_the_flux_lora_preset_fits_and_full_fine_tuning_fits_a_bigger_device_only_with_checkpointing(flux_dev):
    estimates = {r.role: r for r in check_memory(flux_cfg(flux_dev))}
    assert estimates["learner"].fits and estimates["rollout worker"].fits
    assert estimates["learner"].total_gb < 40 and estimates["rollout worker"].total_gb < 60
    assert estimates["learner"].parts["transformer weights"] == pytest.approx(11_901_408_320 * 2 / 1e9)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):  # activations dominate without checkpointing
        check_memory(flux_cfg(flux_dev, "model.gradient_checkpointing=false", "learner.timesteps_per_backward=0",
                              "learner.micro_batch_size=12", "learner.gradient_accumulation_steps=8"))


def test_full_fine_tuning_of_flux_fits_when_sharded_over_learner_ranks(flux_dev):
    """FSDP over K ranks: each rank holds 1/K of the fp32 weights, gradients and AdamW moments (190 GB / K)."""
    full = ["model.lora_rank=0", "learner.micro_batch_size=1", "learner.gradient_accumulation_steps=96"]
    with pytest.raises(ConfigError, match="learner.sharding=fsdp"):  # the advice names the sharding fields
        check_memory(flux_cfg(flux_dev, *full))
    sharded = flux_cfg(flux_dev, *full, "learner.num_workers=8", "learner.sharding=fsdp")
    rank = next(r for r in check_memory(sharded) if r.role == "learner rank")
    states = sum(rank.parts[k] for k in ("transformer weights", "gradients (fp32)", "AdamW moments (fp32)"))
    assert states == pytest.approx(11_901_408_320 // 8 * 16 / 1e9, rel=1e-9)
    assert rank.fits and rank.total_gb < 80
    with pytest.raises(ConfigError, match="learner rank needs ~"):  # two ranks are not enough: 95 GB of states each
        check_memory(flux_cfg(flux_dev, *full, "learner.num_workers=2", "learner.sharding=fsdp"))


def test_activation_formula_worked_example():
    arch = Architecture(params={"transformer": 0}, lora_params=0, blocks=2, hidden=4, image_tokens=6, text_tokens=4,
                        latent_numel=1, decode_channels=0, pixels=1)
    # s·b·h = 10 tokens × 3 rows × 4 = 120 elements per block
    assert activation_gb(arch, 3, checkpointing=False, bf16=True) * 1e9 == pytest.approx(34 * 2 * 120)
    assert activation_gb(arch, 3, checkpointing=True, bf16=True) * 1e9 == pytest.approx((2 * 2 + 34) * 120)
    assert activation_gb(arch, 3, checkpointing=False, bf16=False) * 1e9 == pytest.approx(2 * 34 * 2 * 120)


def test_lora_count_matches_peft():
    from tests.unit.test_trainer_inprocess import small_policy

    base = small_policy()
    rank1 = lora_rank1_params(base.transformer)  # counted before peft wraps the layers
    with_lora = type(base)(base.config, base.transformer, base.text_encoder, lora_rank=4)
    assert rank1 > 0 and sum(p.numel() for p in with_lora.trainable_parameters()) == 4 * rank1


def test_cpu_roles_are_reported_not_checked():
    estimates = check_memory(load_config([]))  # the embedded default: every role on the CPU
    assert all(r.capacity_gb is None and r.fits for r in estimates)
    assert {r.role for r in estimates} == {"learner", "rollout worker", "reward shapes_reward", "reward shapes_verifier"}


def test_a_model_folder_of_another_family_or_a_size_it_cannot_draw_is_refused_before_ray(sd35_medium, flux_dev,
                                                                                         tmp_path, capsys):
    """These failed inside the rollout actors after Ray and Serve started (100-line tracebacks), or crashed the
    preflight itself (an SD3 folder read as FLUX: no num_single_layers)."""
    with pytest.raises(ConfigError, match=r"holds a StableDiffusion3Pipeline .*not a FluxPipeline for "
                                          r"model\.backend=flux; set model\.backend=sd3"):
        check_memory(flux_cfg(sd35_medium))
    with pytest.raises(ConfigError, match=r"holds a FluxPipeline .*set model\.backend=flux"):
        check_memory(load_config(["sd3_5_medium"], [f"model.path={flux_dev}"]))
    # SD3: VAE ×8 times 2×2 patches = 16; FLUX: ×8 times its 2×2 packing = 16
    with pytest.raises(ConfigError, match=r"model\.height/model\.width 520x512: must be multiples of 16 for this sd3 "
                                          r"model \(VAE ×8, times its 2×2 patches\), e\.g\. 512x512"):
        check_memory(load_config(["sd3_5_medium"], [f"model.path={sd35_medium}", "model.height=520"]))
    with pytest.raises(ConfigError, match="must be multiples of 16 for this flux model"):
        check_memory(flux_cfg(flux_dev, "model.width=712"))
    with torch.device("meta"):
        schnell = FluxTransformer2DModel(guidance_embeds=False)
    folder = write_folder(tmp_path, schnell, {"text_encoder": ("CLIPTextModel", CLIP_L),
                                              "text_encoder_2": ("T5EncoderModel", T5_XXL)})
    with pytest.raises(ConfigError, match=r"model\.guidance_scale=3\.5: this FLUX transformer has no guidance"):
        check_memory(flux_cfg(folder))
    check_memory(flux_cfg(folder, "model.guidance_scale=1"))
    check_memory(flux_cfg(flux_dev, "model.guidance_scale=1"))  # FLUX.1-dev at 1: allowed, and said
    assert "guidance-distilled FLUX" in capsys.readouterr().err


def test_an_external_reward_service_asks_this_cluster_for_no_reward_replicas(sd35_medium):
    cfg = load_config(["sd3_5_medium"], [f"model.path={sd35_medium}", "reward.server.transport=http",
                                         "reward.server.url=http://rewards:8000"])
    assert resource_demand(cfg)["GPU"] == (5.0, ["rollout.num_workers × rollout.num_gpus",
                                                 "learner.num_workers × learner.num_gpus"])


def test_resources_the_cluster_lacks_are_named_with_their_fields(sd35_medium):
    cfg = load_config(["sd3_5_medium"], [f"model.path={sd35_medium}"])  # 4 rollout GPUs, 1 learner, 0.5 PickScore
    demand = resource_demand(cfg)
    assert demand["GPU"] == (5.5, ["rollout.num_workers × rollout.num_gpus", "learner.num_workers × learner.num_gpus",
                                   "reward.rewards.0.num_replicas × num_gpus"])
    assert demand["CPU"][0] == 4 * 4 + 4 + 1
    msg = resource_shortfall(cfg, {"CPU": 64.0})
    assert msg == "5.5 GPU asked (rollout.num_workers × rollout.num_gpus + learner.num_workers × learner.num_gpus + " \
                  "reward.rewards.0.num_replicas × num_gpus), the cluster has 0"
    assert resource_shortfall(cfg, {"CPU": 21.0, "GPU": 8.0}) is None
    assert "21 CPU asked" in resource_shortfall(cfg, {"CPU": 20.0, "GPU": 8.0})


def test_the_micro_batch_suggestion_keeps_each_step_and_feeds_the_gpu(sd35_medium, flux_dev):
    # the measured case: SD3.5-Medium at the benchmark's 3 × 4 on half an H200 (1,357 tokens a row: 4,071 a forward)
    h200 = ["cluster.gpu_memory_gb=143", "learner.num_gpus=0.5", "rollout.num_gpus=0.5", "grpo.group_size=12",
            "rollout.batch_size=12", "learner.micro_batch_size=3", "learner.gradient_accumulation_steps=4"]
    cfg = load_config(["sd3_5_medium", "mixgrpo"], [f"model.path={sd35_medium}", *h200])
    assert suggested_micro_batch(cfg) == 12  # 12 × 1,357 = 16,284 tokens ≥ BUSY_TOKENS; 6 × 1,357 falls short
    assert "learner.micro_batch_size=12 learner.gradient_accumulation_steps=1" in micro_batch_advice(cfg)
    assert "4,071 tokens" in micro_batch_advice(cfg)
    # the SD3.5 preset's 9 (12,213 tokens) already feeds the GPU: no line
    assert micro_batch_advice(load_config(["sd3_5_medium", "mixgrpo"], [f"model.path={sd35_medium}"])) is None
    # FLUX's preset, 3 × 32 (2,025 + 512 tokens a row): 96 per step; 8 is the smallest divisor of 96 that feeds it
    flux = flux_cfg(flux_dev)
    assert BUSY_TOKENS > 6 * 2537 and 8 * 2537 >= BUSY_TOKENS and suggested_micro_batch(flux) == 8
    # over 8 learner ranks the accumulation must stay a multiple of 8: 96 / 8 = 12 is, so 8 stays out and 12 is next
    ranks = flux_cfg(flux_dev, "learner.num_workers=8", "learner.micro_batch_size=3", "learner.gradient_accumulation_steps=32")
    assert suggested_micro_batch(ranks) == 12
    # what it suggests fits, and the next larger candidate would not be needed or would not fit
    for c in (cfg, flux, ranks):
        s = suggested_micro_batch(c)
        per_step = c.learner.micro_batch_size * c.learner.gradient_accumulation_steps
        trial = c.model_copy(deep=True)
        trial.learner.micro_batch_size, trial.learner.gradient_accumulation_steps = s, per_step // s
        assert per_step % s == 0 and check_memory(trial)
    # a small GPU: nothing feeds it, so the largest that fits (the estimate per sample: 3.5 GB / 3 at 720 px)
    small = flux_cfg(flux_dev, "cluster.gpu_memory_gb=34")
    s = suggested_micro_batch(small)
    assert 3 <= s < 8 and s * 2537 < BUSY_TOKENS
    # a learner on the CPU: no suggestion
    assert suggested_micro_batch(load_config([])) is None and micro_batch_advice(load_config([])) is None
    # the whole window of 4 steps in one forward (timesteps_per_backward 0): 3 × 4 × 1,357 = 16,284 tokens, fed
    whole = load_config(["sd3_5_medium", "mixgrpo"], [f"model.path={sd35_medium}", *h200,
                                                      "learner.timesteps_per_backward=0", "window.size=4"])
    assert learner_forward_tokens(whole, diffusers_architecture(whole)) == 3 * 4 * 1357
    assert micro_batch_advice(whole) is None and suggested_micro_batch(whole) == 3
    # an underfed forward with nothing larger that fits: no line (31 GB holds FLUX's learner at 3, 30.7 GB, not at 4)
    tight = flux_cfg(flux_dev, "cluster.gpu_memory_gb=31")
    assert suggested_micro_batch(tight) == 3 and micro_batch_advice(tight) is None
    # the tiny model on a GPU: its rows are far from the measured ones, so no line
    tiny_gpu = load_config([], ["model.device=cuda", "rollout.num_gpus=0.5", "learner.num_gpus=0.5"])
    assert suggested_micro_batch(tiny_gpu) is not None and micro_batch_advice(tiny_gpu) is None


def test_the_run_prints_the_micro_batch_line_after_the_memory_table(sd35_medium, tmp_path, capsys):
    from learner.main import preflight

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    cfg = load_config(["sd3_5_medium", "mixgrpo"], [
        f"model.path={sd35_medium}", f"rollout.prompts_file={tmp_path / 'p.txt'}",
        f"run.eval_prompts_file={tmp_path / 'p.txt'}", "run.eval_prompts=2", "learner.micro_batch_size=3",
        "learner.gradient_accumulation_steps=4", "grpo.group_size=12", "rollout.batch_size=12"])
    preflight(cfg)
    out = capsys.readouterr().out
    assert out.index("memory preflight (estimates):") < out.index("learner: micro-batch 3 runs 4,071 tokens")


def test_a_missing_or_bad_prompts_file_is_an_error_naming_its_field(sd35_medium, tmp_path):
    from learner.main import preflight

    good, bad = tmp_path / "p.txt", tmp_path / "bad.txt"
    good.write_text("a cat\na dog\n")
    bad.write_bytes(b"a cat\n\xff\xfe not utf-8\n")
    base = ["sd3_5_medium", "mixgrpo"]
    common = [f"model.path={sd35_medium}", "run.eval_prompts=2"]
    with pytest.raises(ConfigError, match=r"^rollout\.prompts_file: prompts file .*nowhere\.txt does not exist"):
        preflight(load_config(base, [*common, f"rollout.prompts_file={tmp_path / 'nowhere.txt'}",
                                     f"run.eval_prompts_file={good}"]))
    with pytest.raises(ConfigError, match=r"^run\.eval_prompts_file: .*bad\.txt: not UTF-8"):
        preflight(load_config(base, [*common, f"rollout.prompts_file={good}", f"run.eval_prompts_file={bad}"]))


def test_the_driver_refuses_what_a_local_ray_cannot_hold_and_unknown_rewards_before_ray(capsys):
    from learner.driver.cluster_checks import check_resources
    from learner.main import preflight

    cfg = load_config([], ["rollout.num_gpus=1"])  # 2 workers × 1 GPU on a cluster with none
    two_cpus = {"CPU": 2.0}
    with pytest.raises(ConfigError, match=r"^2 GPU asked \(rollout\.num_workers × rollout\.num_gpus\), the cluster has 0: "
                                          r"this local Ray has no more"):
        check_resources(cfg, two_cpus, local=True)  # Serve and the actors would wait for them forever
    check_resources(cfg, two_cpus, local=False)  # a cluster may still add nodes: a warning, and the run goes on
    assert "warning: 2 GPU asked" in capsys.readouterr().err
    check_resources(load_config([], []), two_cpus, local=True)  # the embedded default fits two CPUs
    with pytest.raises(ConfigError, match=r"^reward\.rewards\.1\.name: unknown reward scorer 'nope'; known scorers: aesthetic"):
        preflight(load_config([], ["reward.rewards=[{name: shapes_verifier}, {name: nope}]"]))


def test_start_actors_checks_resources_once(monkeypatch):
    """The driver checks before the rewards deploy and tells run_loop so: the shortfall warning prints once, not
    twice; a caller that did not check (benchmarks, tests) still gets the check from start_actors."""
    from learner.driver import cluster_checks, loop

    calls = []
    monkeypatch.setattr(cluster_checks, "check_resources", lambda cfg, available, *, local: calls.append(local))
    monkeypatch.setattr(loop.ray, "cluster_resources", lambda: {"CPU": 2.0})

    class Started(Exception):
        pass

    def no_actor(**_):
        raise Started
    monkeypatch.setattr(loop.SchedulerActor, "options", no_actor)
    cfg = load_config([], [])
    for checked, expected in ((True, []), (False, [False])):
        calls.clear()
        with pytest.raises(Started):
            loop.start_actors(cfg, "r", resources_checked=checked)
        assert calls == expected


def test_a_reward_without_its_weight_folder_is_refused_before_serve_deploys(tmp_path, capsys):
    """pickscore with no model_path, or with a folder that is not there: refused before the deploy (it failed only
    inside Serve's, a generic 'Deploying application rewards failed'); on a cluster an absent folder is a warning,
    since the reward nodes may have it; a reward service elsewhere (transport=http) is not this job's to check."""
    from learner.driver.cluster_checks import check_resources
    from reward_servers.scorers import check_reward_specs

    plenty = {"CPU": 64.0}
    rewards = "reward.rewards=[{name: shapes_verifier}, {name: pickscore%s}]"
    with pytest.raises(ConfigError, match=r"^reward\.rewards\.1\.model_path: pickscore loads its weights from a "
                                          r"local folder and none is set"):
        check_resources(load_config([], [rewards % ""]), plenty, local=False)
    from learner.main import preflight

    with pytest.raises(ConfigError, match=r"^reward\.rewards\.1\.model_path: pickscore loads"):
        preflight(load_config([], [rewards % ""]))  # the driver's, before Ray starts (it came ~15 s in)
    absent = load_config([], [rewards % f", model_path: {tmp_path / 'PickScore_v1'}"])
    with pytest.raises(ConfigError, match=r"^reward\.rewards\.1\.model_path: '.*PickScore_v1' \(pickscore's weights\) "
                                          r"is not a folder on this node$"):
        check_resources(absent, plenty, local=True)
    check_resources(absent, plenty, local=False)
    assert "warning: reward.rewards.1.model_path:" in capsys.readouterr().err
    (tmp_path / "PickScore_v1").mkdir()
    check_resources(absent, plenty, local=True)  # the folder is there: what is in it is the replica's to judge
    elsewhere = load_config([], [rewards % "", "reward.server.transport=http", "reward.server.url=http://r:8000"])
    check_resources(elsewhere, plenty, local=True)
    from services.config import RewardSpec

    with pytest.raises(ConfigError, match=r"^reward\.rewards\.1\.name: reward 'pickscore' is already "
                                          r"reward\.rewards\.0"):
        check_reward_specs([RewardSpec(name="pickscore"), RewardSpec(name="pickscore")])


def test_an_unreachable_redis_store_is_refused_before_any_actor(capsys):
    """It failed 30 s in, inside the window scheduler's start, with 147 lines of output."""
    import socket

    from learner.driver.cluster_checks import check_state_store

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    with pytest.raises(ConfigError, match=r"^cluster\.state_store: cannot reach the Redis state store at redis://"):
        check_state_store(url, local=True)
    check_state_store(url, local=False)
    assert "warning: cluster.state_store: cannot reach" in capsys.readouterr().err
    check_state_store("memory", local=True)  # nothing to reach
    secret = url.replace("redis://", "redis://:s3cretpw@")  # the password never reaches a message or a log
    with pytest.raises(ConfigError, match=r"at redis://:\*\*\*@127\.0\.0\.1:\d+/0: ") as e:
        check_state_store(secret, local=True)
    assert "s3cretpw" not in str(e.value)

