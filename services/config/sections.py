"""The sections of the run configuration, one pydantic model per role (see `services.config`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "flow_grpo", "dance_grpo")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    backend: Literal["tiny", "sd3", "flux"] = "tiny"
    """Policy backend: the built-in tiny pixel-space model, or diffusers SD3 / FLUX from a local path."""
    path: str | None = None
    """Local checkpoint directory. None means the tiny checkpoint shipped with the project."""
    lora_rank: int = Field(0, ge=0, le=1024)
    """LoRA rank on the transformer's attention projections; 0 trains all transformer weights."""
    lora_alpha: float = Field(0.0, ge=0.0)
    """LoRA alpha; 0 means alpha = rank."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each role runs the model: auto = the GPU Ray assigns the actor when its role asks for one
    (rollout.num_gpus, learner.num_gpus > 0), else the CPU; cuda insists on the GPU."""
    weights_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the frozen weights (VAE, text encoders, the base transformer under LoRA) and of the rollout
    workers' inference weights; auto = bfloat16 on a GPU, float32 on the CPU. What the learner trains (the
    LoRA adapter, or the transformer at lora_rank 0) is always held in fp32 (master weights)."""
    autocast_bf16: bool = False
    """bf16 autocast for forward passes (fp32 master weights; log-probs always fp32)."""
    gradient_checkpointing: bool = False
    height: int = Field(32, ge=8, le=4096)
    """Image height in pixels (the tiny model is fixed at 32)."""
    width: int = Field(32, ge=8, le=4096)
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0)
    """FLUX: the distilled guidance embedding value. SD3 and tiny: classifier-free guidance scale (1 = off; the tiny
    policy's negative prompt is the empty one, which a base pre-trained with `--p-uncond` has learned)."""

    @model_validator(mode="after")
    def _guidance(self) -> ModelConfig:
        if self.backend in ("sd3", "tiny") and self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 for the {self.backend} backend (1 = no classifier-free "
                             f"guidance), got {self.guidance_scale}")
        return self


class SamplerConfig(_Section):
    num_steps: int = Field(16, ge=2, le=1000)
    """N, the number of denoising steps (paper: 25)."""
    shift: float = Field(3.0, gt=0.0, le=100.0)
    """Timestep shift s of the sigma schedule (paper: 3)."""
    sde_kind: Literal["flow", "dance", "cps"] = "flow"
    """Transition inside the window: Flow-GRPO SDE (MixGRPO default), DanceGRPO SDE, or CPS."""
    eta: float = Field(0.7, ge=0.0, le=1.0)
    """Noise level η of the SDE (flow: 0.7, dance: 0.3)."""
    post_window: Literal["euler", "dpm"] = "euler"
    """Solver after the window: Euler on the full schedule, or DPM-Solver++ 2M on a compressed one (Flash)."""
    compress_ratio: float = Field(1.0, gt=0.0, le=1.0)
    """Flash: fraction of post-window steps kept by DPM-Solver++ (Flash 0.4, Flash* 0.2)."""
    branching: Literal["none", "tempflow", "granular"] = "none"
    """Rollout shape. none: each group member is one mixed trajectory, SDE over the window. tempflow
    (TempFlow-GRPO): a deterministic main path per prompt, and at every window step grpo.group_size SDE children
    finished by Euler, each with its own (process) reward and advantage within its branch step. granular
    (G²RPO): the same branching, each child finished on the grid of every `granularities` entry, advantages
    summed over them. Both train one transition per child; rollout.batch_size counts children."""
    group_noise: Literal["shared", "independent"] = "shared"
    """shared: a group's G members start from one initial noise (MixGRPO's and DanceGRPO's references,
    `--init_same_noise`), so the pre-window prefix and the window's first step are computed once per group.
    independent: each member from its own noise (Flow-GRPO's reference draws every image's latents), nothing shared.
    Branched rollouts need shared."""
    granularities: list[int] = Field(default_factory=lambda: [1, 2])
    """branching=granular: finish each child on every j-th step of the schedule for each j here, always down to
    σ = 0 (G²RPO's reference: 1 and 2)."""

    @model_validator(mode="after")
    def _group_noise(self) -> SamplerConfig:
        if self.group_noise == "independent" and self.branching != "none":
            raise ValueError(f"branching={self.branching} grows each group's children off one main path, so it needs "
                             "group_noise=shared")
        return self

    @model_validator(mode="after")
    def _granularities(self) -> SamplerConfig:
        if not self.granularities or any(j < 1 for j in self.granularities) or len(set(self.granularities)) != len(
                self.granularities):
            raise ValueError(f"granularities must be distinct integers >= 1, got {self.granularities}")
        return self


class WindowConfig(_Section):
    strategy: Literal["progressive", "frozen", "random", "linear_decay", "exp_decay"] = "progressive"
    """How the window moves (`learner.algo.window_at`). frozen reads start and size; random only size (a fresh
    uniform start every iteration); the others start, size, stride and shift_interval (and their decay fields)."""
    size: int = Field(4, ge=1)
    """w, the number of SDE (and trained) steps in the window (paper: 4); `all` in YAML means N−1."""
    shift_interval: int = Field(8, ge=1)
    """τ, iterations between window moves (paper: 25 for FLUX, 150 for SD3.5-M)."""
    stride: int = Field(1, ge=0)
    """s, steps the window moves each time (paper: 1; 0 freezes it)."""
    start: int = Field(0, ge=0)
    """First window step for the frozen strategy (and where the others begin)."""
    shift_interval_min: int = Field(1, ge=1)
    """linear_decay: τ decays linearly from shift_interval to this as the window moves."""
    decay_rate: float = Field(0.1, ge=0.0)
    """exp_decay: k in τ(l) = ⌈τ·exp(−k·max(0, l − l_thr))⌉."""
    decay_threshold: int = Field(13, ge=0)
    """exp_decay: l_thr."""


class GrpoConfig(_Section):
    group_size: int = Field(8, ge=2)
    """G, images per prompt sharing the initial noise (paper: 12)."""
    clip_range: float = Field(1e-4, gt=0.0, lt=1.0)
    """ε of the clipped ratio; tiny because log-probs are means over elements."""
    adv_clip_max: float = Field(5.0, gt=0.0)
    """Advantages are clipped to ±this: in the clipped policy loss, and in AWM's Ā = clip(A, ±c)/c and NFT's
    r = clip(A, ±c)/(2c) + ½ (all three references: 5)."""
    reward_aggregation: Literal["advantage", "reward"] = "advantage"
    """Multi-reward: weighted sum of per-reward advantages (paper default) or z-score of the weighted reward sum."""
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of window steps trained per iteration, chosen at random (DanceGRPO: 0.6 of all steps)."""
    train_selection: Literal["per_iteration", "per_sample"] = "per_iteration"
    """How the train_fraction subset is drawn: per_iteration, one subset of window steps for every row; per_sample,
    each row its own, redrawn every inner epoch (DanceGRPO's reference: a permutation per sample,
    fastvideo/train_grpo_flux.py `train_one_step`). Either way each row trains the same number of steps."""
    advantage_std: Literal["group", "global"] = "group"
    """Scale of the group-relative advantage (R − mean_group R) / scale: group, the group's unbiased std + 1e-8
    (MixGRPO, DanceGRPO); global, the population std of the whole batch + 1e-4 (Flow-GRPO's reference,
    flow_grpo/stat_tracking.py with `global_std=True`, its SD3 configs' setting), so a group whose rewards barely
    differ gets small advantages instead of unit ones."""
    kl_beta: float = Field(0.0, ge=0.0)
    """β of the KL penalty to the reference (starting) policy on each trained transition,
    β·mean_d (μ_θ − μ_ref)² / (2·std²): 0 in MixGRPO's FLUX reference, 0.01–0.04 in Flow-GRPO's SD3 configs.
    The reference is the model with its LoRA adapter switched off, or a frozen copy of the starting
    transformer when it trains fully (one more transformer in the learner's memory)."""
    num_inner_epochs: int = Field(1, ge=1, le=16)
    objective: Literal["grpo", "awm", "nft"] = "grpo"
    """grpo: the clipped ratio on the window's transitions (MixGRPO, Flow-GRPO, DanceGRPO); awm: advantage-weighted
    matching (METHODS.md §3), the flow-matching loss on re-noised final images weighted by the advantage; nft:
    DiffusionNFT (§4), implicit positive / negative policies around a lagged old policy that the workers sample
    with. awm and nft use no log-probs; their advantages are centred per group and scaled by the batch's std."""
    matching_aux: float = Field(0.0, ge=0.0)
    """objective=grpo: weight of AWM's advantage-weighted matching loss on the rollout's final images (the same
    advantages, `matching_times` stratified times, `awm_weighting`), added to the clipped ratio objective of the
    window's transitions; 0: GRPO alone. The ratio term credits only the noise the window injected; this term
    regresses the velocity at every noise level towards the group's better images and away from its worse ones."""
    awm_weighting: Literal["uniform", "ghuber"] = "ghuber"
    """AWM's weighting ψ: uniform (plain advantage-weighted flow matching) or the reference's default ghuber."""
    matching_times: int = Field(6, ge=1)
    """awm / nft: training times per micro-batch, stratified over the rollout's σ grid (AWM's reference: 6)."""
    nft_beta: float = Field(1.0, gt=0.0)
    """DiffusionNFT's β: v⁺ = β·v_θ + (1−β)·v_old (reference: 1; 0.1 for OCR / multi-reward)."""
    awm_lagged_beta: float = Field(0.0, ge=0.0)
    """AWM: weight of mean_d (v_θ − v_φ)², φ a lagged copy of the policy updated after each iteration as
    φ ← d·φ + (1−d)·θ, d = min(0.001·iteration, 0.3) (the reference's `ema_beta` = 1 with its "ema" adapter); 0: no
    lagged copy. The workers keep sampling with θ (the reference's off_policy=False)."""
    nft_decay_cap: float = Field(0.5, ge=0.0, le=1.0)
    """DiffusionNFT: after each iteration φ ← d·φ + (1−d)·θ, d = min(0.001·iteration, this) (reference: 0.5)."""


class RewardSpec(_Section):
    name: str
    """Scorer name, e.g. shapes_reward, shapes_verifier, pickscore, hpsv2."""
    weight: float = Field(1.0, gt=0.0)
    """Weight in the advantage aggregation (normalised to sum 1)."""
    model_path: str | None = None
    """Local directory for model-based scorers."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Scorer-specific constructor arguments."""
    num_replicas: int = Field(1, ge=1)
    """Serve replicas (ignored when autoscaling is set)."""
    autoscaling: dict[str, Any] | None = None
    """Serve autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4}."""
    num_cpus: float = Field(0.25, ge=0.0)
    """CPUs per replica; keep fractional on small machines or replicas wait forever."""
    num_gpus: float = Field(0.0, ge=0.0)
    max_batch_size: int = Field(32, ge=1)
    """Dynamic batching: most requests merged into one model call."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    """Backpressure: requests beyond this are refused (-1: unbounded)."""

    @model_validator(mode="after")
    def _batch_fits(self) -> RewardSpec:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}) or batches never fill"
            )
        return self


class RewardServerConfig(_Section):
    host: str = "127.0.0.1"
    """Bind address of the REST ingress; loopback unless deliberately exposed."""
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "rewards"
    route_prefix: str = "/"
    auth_token_env: str = "MIXGRPO_REWARD_TOKEN"
    """Environment variable holding the bearer token; when set, requests without it get 401."""
    max_request_bytes: int = Field(32 * 2**20, ge=1024)
    max_images_per_request: int = Field(512, ge=1)
    image_size_limit: int = Field(2048, ge=8)
    """Largest accepted image height or width."""
    max_decoded_bytes: int = Field(512 * 2**20, ge=2**20)
    """Most bytes one request's image files may decode to (B·H·W·3), checked from their headers before any pixel
    is decoded: a 413 past it. 512 MiB holds 170 images of 1024², or 512 images up to 591²."""
    transport: Literal["handle", "http"] = "handle"
    """How rollout workers reach the scorers: Serve handles in-cluster, or HTTP to an external service."""
    url: str | None = None
    """Base URL of an external reward service (transport=http)."""
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.2, ge=0.0)


def _default_rewards() -> list[RewardSpec]:
    # The learned reward model plus the rule verifier on train-split prompts (as Flow-GRPO trains on
    # GenEval's rules); held-out colour-shape combinations are never trained on and measure generalisation.
    return [RewardSpec(name="shapes_reward"), RewardSpec(name="shapes_verifier", num_cpus=0.1)]


class RewardConfig(_Section):
    rewards: list[RewardSpec] = Field(default_factory=_default_rewards)
    """Rewards used for training, each its own Serve deployment."""
    server: RewardServerConfig = Field(default_factory=RewardServerConfig)

    @model_validator(mode="after")
    def _names(self) -> RewardConfig:
        names = [r.name for r in self.rewards]
        if not names:
            raise ValueError("rewards: at least one reward is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique, got {names}")
        if self.server.transport == "http" and not self.server.url:
            raise ValueError("server.url is required when server.transport is 'http'")
        return self


class RolloutConfig(_Section):
    num_workers: int = Field(2, ge=1)
    num_cpus: float = Field(0.5, ge=0.0)
    """CPUs per rollout worker actor (fractional on small machines)."""
    num_gpus: float = Field(0.0, ge=0.0)
    batch_size: int = Field(64, ge=2)
    """Images per iteration = prompts per iteration × group size."""
    prompts: Literal["shapes", "file"] = "shapes"
    """Prompt source: the shapes world's train split, or a text file (one prompt per line)."""
    prompts_file: str | None = None
    log_images: int = Field(4, ge=0)
    """Rollout images per iteration logged to TensorBoard and wandb ("samples/rollout", with their prompts and
    rewards), spread over the batch; each worker ships this many with its shard. 0: none."""
    num_threads: int = Field(0, ge=0)
    """torch threads per worker (Ray sets OMP_NUM_THREADS=1 for fractional actors); 0 (the default): chosen by the
    driver from the cores of a node Ray reports (`learner.driver.build.auto_threads`): sync mode C // num_workers each (the learner
    waits while they sample); async mode the workers share half of the cores, the learner the other half."""
    max_restarts: int = Field(-1, ge=-1)
    """Ray restarts of a crashed worker actor (-1: unlimited). A restarted worker is brought to the learner's
    weights (checksum-verified) before it samples again. Needs cluster.weight_sync=object_store (a collective
    group cannot re-admit a process), so with `collective` workers are not restarted."""
    max_retries: int = Field(3, ge=0)
    """Re-runs of one shard of groups whose worker died mid-rollout, on the other workers in turn; the run
    fails with an error naming the groups when they are used up. Re-runs repeat the groups exactly (their
    noise is seeded by run seed, iteration and group id; the weights are those the rollout started with)."""
    restart_timeout_s: float = Field(300.0, gt=0.0)
    """How long to wait for a crashed worker to come back (a new node on a cluster can take minutes)."""


class LearnerConfig(_Section):
    lr: float = Field(3e-5, gt=0.0, lt=1.0)
    """AdamW learning rate (FLUX reference: 1e-5)."""
    weight_decay: float = Field(1e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clip."""
    micro_batch_size: int = Field(16, ge=1)
    """Samples per forward/backward."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step: an optimizer step (and its grad-norm clip) covers
    micro_batch_size × gradient_accumulation_steps samples (MixGRPO's FLUX reference: 96 = 32 ranks × 3;
    Flow-GRPO's SD3: 576), and an iteration takes rollout.batch_size / that many steps."""
    update_order: Literal["shuffled", "by_group"] = "by_group"
    """The order the update takes the batch's rows in: by_group keeps each group's rows together (groups shuffled), as
    MixGRPO's reference steps through a group's members, so the members in a micro-batch compute their common first
    window step once (learner/training/sharing.py); shuffled deals all rows in one random order."""
    timesteps_per_backward: int = Field(0, ge=0)
    """Window steps per forward/backward of a micro-batch; 0: the whole window at once (fast for small models).
    1 is what the references do (one backward per timestep): the activations of one step only, same gradient."""
    num_cpus: float = Field(0.5, ge=0.0)
    """CPUs per learner rank."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per learner rank."""
    num_workers: int = Field(1, ge=1)
    """K learner ranks (a placement group, one torch.distributed group: NCCL on GPU, gloo on CPU). The global
    batch of each optimizer step is split across them; K ranks compute what one would."""
    sharding: Literal["none", "fsdp"] = "none"
    """none: data parallel (every rank holds the model, gradients are summed); fsdp: the transformer is sharded
    with FSDP2 (full fine-tuning: model.lora_rank=0), its weights, gradients and AdamW moments 1/K per rank."""
    num_threads: int = Field(0, ge=0)
    """torch threads per learner rank; 0 (the default): chosen by the driver from the cores of a node (`auto_threads`): sync mode
    C // num_workers (the rollout workers wait during the update, so the update takes every core), async mode half
    of them (the other half samples the next batch meanwhile). Bitwise repeats need the same thread counts."""
    overlap_threads: int = Field(-1, ge=-1)
    """Async mode: torch threads each learner rank adds for the rest of an update once the rollout overlapping it has
    finished (its workers' cores would idle until the next rollout starts); restored when the update ends. -1: the
    cores the ranks leave to the rollout, (C − num_workers × num_threads) // num_workers, when num_threads is 0
    (auto), else 0; 0: never.
    Sync mode has nothing overlapping the update and ignores it. The moment the threads change depends on timing,
    so async runs that use it repeat to float tolerance (≈1e-6), not bit for bit."""
    checkpoint_every: int = Field(25, ge=0)
    """Iterations between checkpoints (0: only at the end). In async mode each checkpoint is a sync point (the next
    rollout does not overlap the update), so 1 makes an async run synchronous."""
    max_restarts: int = Field(3, ge=0)
    """Times a learner that died (any rank) is started again from the last checkpoint, the iterations since then
    replayed (learner/driver/recovery.py); past it the run stops naming the checkpoint to --resume from. Needs
    cluster.weight_sync=object_store (a collective group cannot re-admit a process)."""


class ClusterConfig(_Section):
    address: str | None = None
    """Ray address; None joins RAY_ADDRESS if set, else starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of a locally started Ray (None: all)."""
    dashboard: bool = True
    namespace: str = "mixgrpo"
    weight_sync: Literal["object_store", "collective"] = "object_store"
    """Weight broadcast path: put once in the object store, or a torch.distributed broadcast."""
    collective_backend: Literal["gloo", "nccl"] = "gloo"
    state_store: str = "memory"
    """Window scheduler state: memory, file:///path, or redis://host:port/db."""
    placement_timeout_s: float = Field(120.0, gt=0.0)
    """How long to wait for a placement group (the learner ranks) before failing with the resources it asked."""
    gpu_memory_gb: float = Field(80.0, gt=0.0)
    """Memory of one GPU of the cluster; the memory preflight checks every GPU role against it before any
    actor starts (H100 / A100-80GB: 80, H200: 141)."""

    @model_validator(mode="after")
    def _store(self) -> ClusterConfig:
        if not (self.state_store == "memory" or self.state_store.startswith(("file://", "redis://"))):
            raise ValueError(f"state_store must be 'memory', 'file://…' or 'redis://…', got {self.state_store!r}")
        return self


class RunConfig(_Section):
    name: str = "shapes-tiny"
    method: Literal["mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star", "flow_grpo", "dance_grpo", "awm",
                    "diffusion_nft", "flow_grpo_fast", "tempflow_grpo", "g2rpo"] = "mixgrpo"
    """Label of the method; the numbers that define it live in sampler/window/grpo (see presets)."""
    output_dir: str | None = None
    """Run directory; default runs/<name>-<timestamp>."""
    seed: int = Field(0, ge=0)
    iterations: int = Field(60, ge=1)
    eval_every: int = Field(20, ge=0)
    """Iterations between held-out evaluations (0: only before and after)."""
    eval_prompts: int = Field(768, ge=1)
    """Held-out prompts per evaluation (one image each), shared out among the rollout workers. Tiny backend: a
    balanced draw from the shapes world's held-out split (a multiple of its 4 categories); 768 puts the standard
    error of the score near 0.01, so a change of 0.03 is not the set's luck (at 192, weight noise alone moved the
    score by +0.03). Other backends: the first `eval_prompts` lines of `eval_prompts_file`."""
    eval_seed: int = Field(1234, ge=0)
    """Seed of every evaluation's prompt draw and noise: the same for all runs, so their scores compare
    directly (`python -m learner.tools.eval --seed <eval_seed>` reproduces it)."""
    eval_prompts_file: str | None = None
    """Held-out prompts (one per line) for sd3 / flux, which the 32×32 shapes verifier cannot judge; required
    for those backends. Ignored by the tiny backend, whose held-out set is the shapes world's."""
    eval_rewards: list[str] | None = None
    """Rewards (names from `reward.rewards`) that score each evaluation. None: all of them for sd3 / flux, none
    for the tiny backend, which the rule verifier scores."""
    async_rollout: bool = False
    """Overlap the rollout of iteration m+1 with the update of m (staleness ≤ 1), except after an iteration that ends
    with a checkpoint (`learner.checkpoint_every`): that rollout samples with the checkpoint's weights, so a resumed
    or replayed run repeats the uninterrupted one exactly."""
    wandb_project: str | None = None
    """Also log to wandb, in this project (`pip install -e ".[wandb]"`; WANDB_MODE=offline works without an
    account): the same scalars as TensorBoard and the evaluation grids."""
