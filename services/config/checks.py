"""`Config`: every section together, and the checks that span sections (each error names its fields)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from .sections import (
    ClusterConfig,
    GrpoConfig,
    LearnerConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    SamplerConfig,
    WindowConfig,
    _Section,
)


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolve_all(cls, data: Any) -> Any:
        # `window.size: all` (Flow-GRPO / DanceGRPO presets) = every trainable step of this model's schedule
        if isinstance(data, dict) and isinstance(data.get("window"), dict) and data["window"].get("size") == "all":
            steps = (data.get("sampler") or {}).get("num_steps", SamplerConfig.model_fields["num_steps"].default)
            data = {**data, "window": {**data["window"], "size": int(steps) - 1}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        errors = [e for check in _CROSS_CHECKS if (e := check(self))]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def rows_per_prompt(self) -> int:
        """Trained rows per prompt: its G members, or (branched) K children at each of the w window steps."""
        return self.grpo.group_size * (1 if self.sampler.branching == "none" else self.window.size)

    @property
    def num_groups(self) -> int:
        """Prompts per iteration."""
        return self.rollout.batch_size // self.rows_per_prompt


def _check_window(c: Config) -> str | None:
    trainable = c.sampler.num_steps - 1  # the final step is never trained
    if c.window.size > trainable:
        return f"window.size ({c.window.size}) exceeds the trainable steps 0..{trainable - 1} of sampler.num_steps={c.sampler.num_steps}"
    if c.window.start + c.window.size > trainable:
        return f"window.start + window.size ({c.window.start}+{c.window.size}) must be <= {trainable} (sampler.num_steps - 1)"
    if c.window.shift_interval_min > c.window.shift_interval:
        return "window.shift_interval_min must be <= window.shift_interval"
    return None


def _check_batch(c: Config) -> str | None:
    b, g = c.rollout.batch_size, c.grpo.group_size
    per_update = c.learner.micro_batch_size * c.learner.gradient_accumulation_steps
    unit = math.lcm(g, c.rows_per_prompt, per_update)  # the batch sizes every check below accepts
    near = sorted({v for v in (b // unit * unit, -(-b // unit) * unit) if v > 0})
    fits = f"; {' or '.join(f'rollout.batch_size={v}' for v in near)} would fit"
    if b % g:
        return f"rollout.batch_size ({b}) must be divisible by grpo.group_size ({g}){fits}"
    if b % c.rows_per_prompt:
        return (f"rollout.batch_size ({b}) must be divisible by grpo.group_size × window.size ({c.rows_per_prompt}): "
                f"sampler.branching={c.sampler.branching} trains group_size children at each window step of a "
                f"prompt{fits}")
    if b % per_update:
        return (f"rollout.batch_size ({b}) must be divisible by learner.micro_batch_size × "
                f"learner.gradient_accumulation_steps ({per_update}){fits}")
    return None


def _check_sampler(c: Config) -> str | None:
    s = c.sampler
    if s.post_window == "euler" and s.compress_ratio != 1.0:
        return "sampler.compress_ratio only applies with sampler.post_window=dpm"
    if c.model.backend != "tiny" and c.model.path is None:
        return f"model.path is required for model.backend={c.model.backend!r} (a local diffusers folder)"
    if c.model.backend == "tiny" and (c.model.height, c.model.width) != (32, 32):
        return "model.height/width are fixed at 32 for the tiny backend"
    if c.rollout.prompts == "file" and not c.rollout.prompts_file:
        return "rollout.prompts_file is required when rollout.prompts=file"
    return None


# The fields that make each method what it is (run.method is its label in the banner, report and records): a run
# labelled one method must not compute another. Other fields (window, η, group noise, advantage std, KL …) stay free
# to ablate under a method's name.
_GRPO_ODE = {"grpo.objective": "grpo", "sampler.branching": "none"}
METHOD_FIELDS: dict[str, dict[str, str]] = {
    "mixgrpo": {**_GRPO_ODE, "sampler.post_window": "euler"},
    "mixgrpo_flash": {**_GRPO_ODE, "sampler.post_window": "dpm"},
    "mixgrpo_flash_star": {**_GRPO_ODE, "sampler.post_window": "dpm"},
    "flow_grpo": _GRPO_ODE, "flow_grpo_fast": _GRPO_ODE, "dance_grpo": _GRPO_ODE,
    "tempflow_grpo": {"grpo.objective": "grpo", "sampler.branching": "tempflow"},
    "g2rpo": {"grpo.objective": "grpo", "sampler.branching": "granular"},
    "awm": {"grpo.objective": "awm", "sampler.branching": "none"},
    "diffusion_nft": {"grpo.objective": "nft", "sampler.branching": "none"},
}


def _check_method(c: Config) -> str | None:
    for key, want in METHOD_FIELDS.get(c.run.method, {}).items():
        section, field = key.split(".")
        if (have := getattr(getattr(c, section), field)) != want:
            return (f"run.method={c.run.method} needs {key}={want}, not {have} (it would run another method under "
                    f"{c.run.method}'s name; use the {c.run.method} preset, or the preset of the method you mean)")
    return None


def _check_branching(c: Config) -> str | None:
    s = c.sampler
    if s.branching != "granular" and s.granularities != [1, 2]:
        return "sampler.granularities only applies with sampler.branching=granular"
    if s.branching == "none":
        return None
    if s.post_window != "euler":
        return (f"sampler.branching={s.branching} finishes its children by Euler on the schedule's grid: "
                "sampler.post_window=euler")
    if c.grpo.objective != "grpo":
        return f"sampler.branching={s.branching} trains the children's transitions: grpo.objective=grpo"
    if c.grpo.train_fraction < 1.0:
        return f"sampler.branching={s.branching} trains every child's one transition: grpo.train_fraction=1"
    if s.branching == "granular" and max(s.granularities) > s.num_steps - 1:
        return f"sampler.granularities ({s.granularities}) must be < sampler.num_steps ({s.num_steps})"
    return None


def _check_objective(c: Config) -> str | None:
    g = c.grpo
    if g.objective == "grpo" and g.awm_lagged_beta:
        return "grpo.awm_lagged_beta regularises AWM towards its lagged copy: grpo.objective=awm"
    if (g.objective != "grpo" or g.matching_aux > 0) and g.matching_times > c.sampler.num_steps:
        return (f"grpo.matching_times ({g.matching_times}) draws at most one time per step of the σ grid: "
                f"≤ sampler.num_steps ({c.sampler.num_steps})")
    if g.objective == "grpo":
        return None
    if g.train_fraction < 1.0:
        return (f"grpo.train_fraction subsets window steps; grpo.objective={g.objective} trains on re-noised final "
                "images: set it to 1")
    if g.awm_lagged_beta and g.objective != "awm":
        return f"grpo.awm_lagged_beta regularises AWM towards its lagged copy: grpo.objective=awm, not {g.objective}"
    if (g.objective == "nft" or g.awm_lagged_beta) and c.learner.sharding == "fsdp":
        return "grpo.objective=nft swaps in its lagged policy's weights, which a sharded learner cannot: learner.sharding=none"
    return None


def _check_credit(c: Config) -> str | None:
    g, s = c.grpo, c.sampler
    if g.train_selection == "per_sample":
        if g.objective != "grpo" or s.branching != "none":
            return ("grpo.train_selection=per_sample draws window steps per row: grpo.objective=grpo and "
                    "sampler.branching=none")
        if g.train_fraction >= 1.0:
            return "grpo.train_selection=per_sample draws a subset of window steps: set grpo.train_fraction < 1"
    if g.matching_aux > 0 and (g.objective != "grpo" or s.branching != "none"):
        return (f"grpo.matching_aux adds AWM's matching loss to the window's clipped ratio: grpo.objective=grpo "
                f"and sampler.branching=none (got {g.objective}, {s.branching}; grpo.objective=awm is AWM alone)")
    if g.advantage_std == "global" and (g.objective != "grpo" or s.branching != "none"):
        return (f"grpo.advantage_std=global scales the window rollouts' group advantages; grpo.objective="
                f"{g.objective} with sampler.branching={s.branching} forms its own (set grpo.advantage_std=group)")
    if g.reward_aggregation == "reward" and (g.objective != "grpo" or s.branching != "none"):
        return (f"grpo.reward_aggregation=reward z-scores the window rollouts' weighted reward sum; grpo.objective="
                f"{g.objective} with sampler.branching={s.branching} forms its own advantages from the weighted "
                f"rewards (set grpo.reward_aggregation=advantage)")
    return None


def _check_learner_group(c: Config) -> str | None:
    k, lc = c.learner.num_workers, c.learner
    if k > 1 and lc.gradient_accumulation_steps % k:
        return (f"learner.gradient_accumulation_steps ({lc.gradient_accumulation_steps}) must be a multiple of "
                f"learner.num_workers ({k}): each optimizer step's micro-batches are dealt across the ranks")
    if lc.sharding == "fsdp":
        if k == 1:
            return "learner.sharding=fsdp shards over learner ranks: set learner.num_workers > 1"
        if c.model.lora_rank or c.grpo.kl_beta:
            return ("learner.sharding=fsdp shards a fully trained transformer: set model.lora_rank=0 and "
                    "grpo.kl_beta=0 (a LoRA adapter is small: use learner.sharding=none, data parallel)")
    return None


def _check_devices(c: Config) -> str | None:
    if c.model.device == "cuda":
        without = [f"{role}.num_gpus" for role, n in (("rollout", c.rollout.num_gpus), ("learner", c.learner.num_gpus))
                   if n == 0]
        if without:
            return f"model.device=cuda needs a GPU for every role that runs the model: {', '.join(without)} is 0"
    return None


def _check_eval(c: Config) -> str | None:
    from services.shapes_world import CATEGORIES

    names = [r.name for r in c.reward.rewards]
    unknown = [n for n in c.run.eval_rewards or [] if n not in names]
    if unknown:
        return f"run.eval_rewards: {unknown} are not among reward.rewards ({names})"
    if c.model.backend == "tiny":
        if c.run.eval_prompts % len(CATEGORIES):
            return (f"run.eval_prompts ({c.run.eval_prompts}) must be a multiple of the {len(CATEGORIES)} shapes "
                    f"categories, so the held-out set is balanced")
    elif c.run.eval_prompts_file is None:
        return (f"run.eval_prompts_file is required for model.backend={c.model.backend!r}: its held-out prompts, "
                "scored by the configured rewards (the shapes verifier only judges the tiny model's 32×32 images)")
    elif c.run.eval_rewards == []:
        return f"run.eval_rewards is empty: model.backend={c.model.backend!r} needs a reward to evaluate with"
    return None


_CROSS_CHECKS = (_check_method, _check_window, _check_batch, _check_sampler, _check_branching, _check_objective, _check_credit,
                 _check_learner_group, _check_devices, _check_eval)
