"""Config: presets validate; typos and impossible combinations are rejected naming the field."""

import json

import pytest

from services.config import (
    METHODS,
    PRESET_DIR,
    Config,
    ConfigError,
    dump_config,
    load_config,
    parse_override,
)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config([preset])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["tiny_cpu", "flux_dev", "sd3_5_medium"])
def test_methods_compose_with_models(method, model):
    cfg = load_config([model, method])
    assert cfg.run.method == method
    assert cfg.window.start + cfg.window.size <= cfg.sampler.num_steps - 1


def test_method_presets_define_the_methods():
    flash_star = load_config(["mixgrpo_flash_star"])
    assert (flash_star.window.strategy, flash_star.sampler.post_window, flash_star.sampler.compress_ratio) == (
        "frozen", "dpm", 0.2)
    dance = load_config(["flux_dev", "dance_grpo"])
    assert (dance.sampler.sde_kind, dance.sampler.eta, dance.window.size, dance.grpo.train_fraction) == (
        "dance", 0.3, 24, 0.6)


def test_defaults_are_the_tiny_job():
    cfg = Config()
    assert cfg.model.backend == "tiny" and cfg.model.path is None
    assert cfg.rollout.batch_size % cfg.grpo.group_size == 0
    embedded = load_config(["tiny_cpu"])  # what `python learner/main.py` runs: the defaults + AWM's matching term
    assert embedded.grpo.matching_aux == 1.0 and cfg.grpo.matching_aux == 0.0
    assert embedded.learner.num_threads == embedded.rollout.num_threads == 0  # auto: from the node's cores
    assert cfg.learner.num_threads == cfg.rollout.num_threads == 0  # every config: auto unless set
    assert embedded.learner.lr == 2 * cfg.learner.lr  # 6e-5, chosen on the refiner base (README)
    assert embedded.model_copy(update={"grpo": embedded.grpo.model_copy(update={"matching_aux": 0.0,
                                                                                  "matching_times": 6}),
                                       "learner": embedded.learner.model_copy(update={"lr": cfg.learner.lr}),
                                       "run": embedded.run.model_copy(update={"iterations": 60, "eval_every": 20})}) == cfg


def test_guidance_reaches_the_policy_and_below_one_is_refused_by_name():
    from learner.driver.build import policy_from_config

    policy = policy_from_config(load_config([], ["model.guidance_scale=2.5"]).model, "rollout")
    assert policy.guidance_scale == 2.5 and policy.cfg
    for backend in ("tiny", "sd3"):
        with pytest.raises(ConfigError, match=f"guidance_scale must be >= 1 for the {backend} backend"):
            load_config([], [f"model.backend={backend}", "model.guidance_scale=0.5", "model.path=/x"])
    # FLUX's is the distilled guidance embedding's value, not a CFG scale: any value in range
    assert load_config(["flux_dev"], ["model.guidance_scale=0.5", "model.path=/x"]).model.guidance_scale == 0.5


@pytest.mark.parametrize("cores, workers, ranks, mode, expected", [
    (2, 2, 1, "sync", (1, 2, 0)),     # the default job: each worker a core while sampling, the update both
    (2, 2, 1, "async", (1, 1, 1)),    # overlapped: one core samples (two workers share it), one updates; then both
    (16, 2, 1, "sync", (8, 16, 0)),
    (16, 2, 1, "async", (4, 8, 8)),   # 8 cores for the workers, 8 for the learner; the learner all 16 after
    (16, 4, 2, "sync", (4, 8, 0)),
    (16, 4, 2, "async", (2, 4, 4)),   # two ranks: 4 + 4 threads each once the rollout is done
    (3, 4, 1, "sync", (1, 3, 0)),     # more workers than cores: never 0 threads
    (1, 2, 1, "async", (1, 1, 0)),    # nothing left over to add
])
def test_auto_threads_fill_every_core_without_oversubscribing(cores, workers, ranks, mode, expected):
    from learner.driver.build import auto_threads

    cfg = load_config(["tiny_cpu"], [f"rollout.num_workers={workers}", f"learner.num_workers={ranks}",
                                     f"learner.gradient_accumulation_steps={ranks}",
                                     f"run.async_rollout={str(mode == 'async').lower()}"])
    got = auto_threads(cfg, cores)
    assert (got.rollout.num_threads, got.learner.num_threads, got.learner.overlap_threads) == expected
    sampling, updating = workers * got.rollout.num_threads, ranks * got.learner.num_threads
    if mode == "sync":  # each phase alone on the node: no more threads than cores (one each at least)
        assert sampling <= max(cores, workers) and updating == cores
    else:  # overlapped: together no more than the cores (one thread per actor at least); the update alone after
        assert sampling + updating <= max(cores, workers + ranks)
        assert ranks * (got.learner.num_threads + got.learner.overlap_threads) == max(cores, ranks) - cores % ranks
    fixed = load_config([], ["rollout.num_threads=3", "learner.num_threads=5", "learner.overlap_threads=2"])
    assert auto_threads(fixed, cores) == fixed  # explicit counts are kept
    explicit = load_config([], ["rollout.num_threads=3", "learner.num_threads=5", "run.async_rollout=true"])
    assert auto_threads(explicit, cores).learner.overlap_threads == 0  # an explicit learner count: no more added
    with pytest.raises(ValueError, match="cores"):
        auto_threads(cfg, 0)


def test_dotted_overrides():
    cfg = load_config([], ["window.size=6", "run.seed=3", "learner.betas=[0.8, 0.9]", "reward.rewards.0.weight=2"])
    assert cfg.window.size == 6 and cfg.run.seed == 3 and cfg.learner.betas == (0.8, 0.9)
    assert cfg.reward.rewards[0].weight == 2.0


@pytest.mark.parametrize("override,needle", [
    ("window.sise=6", "window.sise"),                       # typo in a field
    ("windw.size=6", "windw"),                              # typo in a section
    ("sampler.eta=1.5", "sampler.eta"),                     # out of range
    ("sampler.sde_kind=ddpm", "sampler.sde_kind"),          # not an option
    ("window.size=20", "window.size"),                      # window past the trainable steps
    ("rollout.batch_size=60", "grpo.group_size"),           # batch not divisible by the group size
    ("learner.micro_batch_size=24", "learner.micro_batch_size"),
    ("sampler.compress_ratio=0.4", "sampler.compress_ratio"),  # compress without DPM
    ("model.backend=flux", "model.path"),                   # FLUX needs a local path
    ("reward.rewards.0.max_batch_size=600", "max_ongoing_requests"),
    ("cluster.state_store=mongo://x", "state_store"),
    ("reward.server.transport=http", "server.url"),
])
def test_bad_configs_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["learner.num_workers=3", "learner.gradient_accumulation_steps=4"], "multiple of learner.num_workers"),
    (["learner.sharding=fsdp", "model.lora_rank=0"], "learner.num_workers > 1"),
    (["learner.sharding=fsdp", "learner.num_workers=2", "learner.gradient_accumulation_steps=2",
      "model.lora_rank=4"], "model.lora_rank=0"),
    (["learner.sharding=ddp"], "learner.sharding"),
    (["learner.num_workers=0"], "learner.num_workers"),
])
def test_learner_group_configs_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in str(err.value)


def test_a_learner_group_config_loads():
    cfg = load_config([], ["learner.num_workers=2", "learner.gradient_accumulation_steps=2", "learner.sharding=fsdp",
                           "model.lora_rank=0"])
    assert cfg.learner.num_workers == 2 and cfg.learner.sharding == "fsdp"


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("window.size")
    with pytest.raises(ConfigError, match="unknown preset 'mixgrpo_turbo'.*mixgrpo_flash"):
        load_config(["mixgrpo_turbo"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(["/nonexistent/x.yaml"])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config([listy])


def test_resolved_config_round_trips_as_json(tmp_path):
    cfg = load_config(["flux_dev", "mixgrpo_flash"], ["window.size=6"])
    path = dump_config(cfg, tmp_path / "run" / "config.json")
    again = Config.model_validate(json.loads(path.read_text()))
    assert again == cfg and again.window.size == 6


def test_driver_rejects_bad_config_before_starting_anything(capsys, tmp_path):
    from learner import main as driver

    assert driver.main(["window.sise=6"]) == 2
    assert "window.sise" in capsys.readouterr().err
    assert driver.main(["--resume", str(tmp_path)]) == 2  # not a run directory
    assert "no config.json" in capsys.readouterr().err


def test_driver_preflight_names_a_missing_eval_prompts_file(capsys, tmp_path):
    from learner import main as driver

    args = ["model.backend=sd3", f"model.path={tmp_path}", "model.height=64", "model.width=64",
            f"run.eval_prompts_file={tmp_path / 'missing.txt'}", f"run.output_dir={tmp_path / 'run'}"]
    assert driver.main(args) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_device_cuda_needs_gpus_for_the_model_roles():
    with pytest.raises(ConfigError, match=r"model\.device=cuda .*rollout\.num_gpus, learner\.num_gpus is 0"):
        load_config([], ["model.device=cuda"])
    cfg = load_config([], ["model.device=cuda", "rollout.num_gpus=1", "learner.num_gpus=1"])
    assert cfg.model.device == "cuda"
    with pytest.raises(ConfigError, match="grpo.kl_beta"):
        load_config([], ["grpo.kl_beta=-0.1"])


def test_retired_run_resume_field(tmp_path):
    """Old run directories' config.json hold `run.resume: null` and still load; a value is refused, as an override is."""
    old = json.loads(json.dumps(Config().model_dump(mode="json")))
    old["run"]["resume"] = None
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_config([tmp_path / "config.json"]) == Config()
    old["run"]["resume"] = "runs/x"
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"run\.resume is no longer a config field; resume a run with"):
        load_config([tmp_path / "config.json"])
    with pytest.raises(ConfigError, match=r"run\.resume"):
        load_config([], ["run.resume=runs/x"])


def test_every_config_field_is_read_somewhere():
    """A field nothing reads is a defect: setting it would silently do nothing. Each field must be read as
    `.<field>` outside its declaration; the window section is passed whole to `window_at` (its fields are
    window_at's parameters: tests/unit/test_scheduler_store.py)."""
    import re
    from pathlib import Path

    from services.config import WindowConfig, sections

    root = Path(__file__).resolve().parents[2]
    code = "\n".join(p.read_text() for d in ("learner", "rollout_workers", "reward_servers", "services")
                     for p in (root / d).rglob("*.py") if p.name != "sections.py")
    unread = [f"{cls.__name__}.{f}" for cls in vars(sections).values()
              if isinstance(cls, type) and issubclass(cls, sections._Section) and cls not in (sections._Section,
                                                                                              WindowConfig)
              for f in cls.model_fields if not re.search(rf"\.{f}\b", code)]
    assert not unread


def test_a_run_labelled_one_method_never_computes_another():
    """`--config awm --config mixgrpo` was labelled mixgrpo in the banner and report while every update was AWM's (a
    preset sets only its own fields); run.method=X with another method's defining fields likewise."""
    with pytest.raises(ConfigError, match=r"^--config: two method presets \(awm from awm, mixgrpo from mixgrpo\); a "
                                          r"preset does not reset another's fields"):
        load_config(["awm", "mixgrpo"])
    with pytest.raises(ConfigError, match=r"run\.method=mixgrpo needs sampler\.post_window=euler, not dpm \(it would "
                                          r"run another method under mixgrpo's name"):
        load_config(["mixgrpo"], ["sampler.post_window=dpm"])  # that is MixGRPO-Flash
    with pytest.raises(ConfigError, match=r"run\.method=awm needs grpo\.objective=awm, not grpo"):
        load_config(["awm"], ["grpo.objective=grpo", "grpo.awm_lagged_beta=0"])
    with pytest.raises(ConfigError, match=r"run\.method=g2rpo needs sampler\.branching=granular, not none"):
        load_config(["mixgrpo"], ["run.method=g2rpo"])
    # a method's other fields stay free to ablate under its name; model presets combine with one method preset
    assert load_config(["mixgrpo"], ["window.strategy=random", "sampler.group_noise=independent"]).run.method == "mixgrpo"
    assert load_config(["tiny_cpu", "mixgrpo_flash"]).sampler.post_window == "dpm"


@pytest.mark.parametrize("preset", ["tempflow_grpo", "g2rpo", "awm", "diffusion_nft"])
def test_reward_aggregation_is_refused_where_nothing_reads_it(preset):
    """These methods form their own advantages (credit.py): grpo.reward_aggregation=reward was accepted and ignored."""
    with pytest.raises(ConfigError, match=r"grpo\.reward_aggregation=reward z-scores the window rollouts'"):
        load_config([preset], ["grpo.reward_aggregation=reward"])
    assert load_config(["flow_grpo"]).grpo.reward_aggregation == "reward"  # where it is read: the window GRPO


def test_a_batch_that_does_not_divide_names_the_sizes_that_would():
    """`--config sd3_5_medium --config tempflow_grpo` was refused with the numbers only (180 vs 144)."""
    with pytest.raises(ConfigError, match=r"rollout\.batch_size \(180\) must be divisible by grpo\.group_size × "
                                          r"window\.size \(144\).*; rollout\.batch_size=720 would fit$"):
        load_config(["sd3_5_medium", "tempflow_grpo"], ["model.path=/x"])
    with pytest.raises(ConfigError, match=r"\(8\); rollout\.batch_size=96 or rollout\.batch_size=112 would fit$"):
        load_config([], ["rollout.batch_size=100"])
    load_config(["sd3_5_medium", "tempflow_grpo"], ["model.path=/x", "rollout.batch_size=720"])
