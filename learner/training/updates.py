"""The Learner: advantages per group, windowed GRPO updates, weights out, checkpoints.

A plain class (a Ray actor via `learner/driver/actors.py`). Each `update` consumes one iteration's rollout:
log-probs of the trained window steps are recomputed with gradients by the same function the
rollout used, so with identical weights the first ratio is exactly 1. With `kl_beta` > 0 the loss adds
β·KL(π_θ ‖ π_ref) of each trained transition, the reference being the starting model (`kl_penalty`).
With `train_fraction` < 1 each row trains k of the w window steps, the same for every row or its own (selection.py).

The batch arrives on the CPU in fp32 and moves to the policy's device here; weights leave as a CPU packet,
in the rollout workers' dtype (`sync_dtype`) when the whole transformer trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from learner.algo import (
    Stream,
    grpo_loss,
    kl_penalty,
    lagged_update,
    sde_mean_std,
    seeded_generator,
    transition_step,
)
from services.broadcast import CollectiveChannel, WeightPacket
from services.types import RolloutBatch

from .checkpoint import load_checkpoint, save_checkpoint
from .credit import batch_advantages, noise_aware_row_weights
from .group import RankGroup, adamw, full_state, sharded_checksum
from .objectives import MatchingSpec, check_options, matching_micro_loss, matching_times
from .records import update_record
from .selection import Selection, row_steps, steps_per_row, window_selection
from .sharing import UPDATE_ORDERS, shared_inputs, shared_velocity, update_order


class Learner:
    def __init__(
        self, policy, *, lr: float, weight_decay: float, betas: tuple[float, float], grad_clip: float,
        micro_batch_size: int, gradient_accumulation_steps: int, clip_range: float, adv_clip_max: float,
        reward_weights: Mapping[str, float], reward_aggregation: str, train_fraction: float, num_inner_epochs: int,
        eta: float, sde_kind: str, seed: int, num_threads: int | None = None, kl_beta: float = 0.0,
        sync_dtype: torch.dtype | None = None, timesteps_per_backward: int = 0, objective: str = "grpo",
        matching: MatchingSpec | None = None, branching: str = "none", train_selection: str = "per_iteration",
        advantage_std: str = "group", matching_aux: float = 0.0, aux: MatchingSpec | None = None,
        update_order: str = "shuffled",
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        if kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
        self.policy = policy.train(False)  # eval mode: velocity must be the same function as in rollout
        self.device = torch.device(policy.device)
        self.kl_beta, self.sync_dtype, self.timesteps_per_backward = kl_beta, sync_dtype, timesteps_per_backward
        if kl_beta > 0:
            policy.keep_reference()  # before any update: the reference is the starting model
        params = policy.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters")
        self.optim_kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas)}
        self.optimizer, self.params = adamw(params, self.optim_kwargs), params
        self.group: RankGroup | None = None  # a K-rank learner (join_group), else one process
        self.sharding = "none"
        self.grad_clip, self.mb, self.accum = grad_clip, micro_batch_size, gradient_accumulation_steps
        self.clip_range, self.adv_clip_max = clip_range, adv_clip_max
        self.reward_weights, self.aggregation = dict(reward_weights), reward_aggregation
        self.train_fraction, self.epochs, self.eta, self.sde_kind = train_fraction, num_inner_epochs, eta, sde_kind
        self.seed, self.version, self.iteration = seed, 0, -1
        check_options(objective, matching, branching, train_selection, matching_aux, aux)
        self.objective, self.awm = objective, matching  # self.awm: the matching objectives' spec (awm or nft)
        self.branching = branching  # TempFlow-GRPO / G²RPO: one transition per row, advantages per branch step
        self.train_selection, self.advantage_std = train_selection, advantage_std  # (advantages.py checks the std)
        self.matching_aux, self.aux = matching_aux, aux  # MixGRPO + AWM's matching term (objectives.py)
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got {update_order!r}")
        self.update_order = update_order  # by_group: a group's rows together, its first window step computed once
        # the lagged policy φ: NFT's v_old, which the workers sample with; AWM's regularisation target (objectives.py)
        self.lagged = ({k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}
                       if matching is not None and matching.has_lagged else None)

    # ------------------------------------------------------------------------------ update
    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """(B,) advantages from every reward, as this learner's method forms them (credit.py)."""
        return batch_advantages(batch, self.reward_weights, branching=self.branching, aggregation=self.aggregation,
                                advantage_std=self.advantage_std, matching=self.awm is not None,
                                adv_clip_max=self.adv_clip_max)

    def selection(self, batch: RolloutBatch, epoch: int) -> Selection:
        """What the rows train in `epoch`: window steps (selection.py), or the matching objectives' T time draws."""
        if self.awm:
            return list(range(self.awm.times))
        return window_selection(batch.log_probs.shape[1], self.train_fraction, self.seed, batch.iteration, epoch,
                                per_sample=self.train_selection == "per_sample", prompt_ids=batch.prompt_ids,
                                group_size=batch.group_size)

    def update(self, batch: RolloutBatch, between: Callable[[], None] | None = None) -> dict:
        """Windowed GRPO updates on one iteration's batch; returns statistics (floats and lists).

        `between`, if given, is called before each micro-batch's forward (async mode: `threads.ThreadBoost`)."""
        t0, c0 = time.perf_counter(), time.process_time()  # wall, and this process's CPU over all its threads
        adv = self.advantages(batch).to(self.device)
        weights = self.row_weights(batch)
        batch = batch.to(self.device)
        selections = [self.selection(batch, epoch) for epoch in range(self.epochs)]
        width = steps_per_row(selections[0])
        b = batch.num_rows
        per_update = self.mb * self.accum
        if b % per_update:
            raise ValueError(f"{b} rows are not divisible by micro_batch × accumulation = {per_update}")
        cond = {k: v.repeat_interleave(batch.group_size, 0) for k, v in batch.cond.items()}  # (B, …)
        stats: dict[str, list] = {k: [] for k in ("loss", "ratio_mean", "ratio_min", "ratio_max", "clip_frac",
                                                  "approx_kl", "kl", "grad_norm", "first_ratio_dev", "forward_rows")}
        step_loss = torch.zeros(width)  # per trained step (per_sample: per position in each row's k steps)
        forward_backward_s = optimizer_s = 0.0  # model compute inside update_s (benchmarks/overhead.py)
        self.optimizer.zero_grad(set_to_none=True)
        for epoch, steps in enumerate(selections):
            gen = seeded_generator(self.seed, Stream.UPDATE_ORDER, batch.iteration, epoch)
            order = update_order(b, batch.group_size, gen, self.update_order)
            if self.branching == "granular":  # G²RPO's reference steps the optimizer once per SDE step k: rows by k
                order = order[torch.sort(batch.steps.cpu()[order], stable=True).indices]
            for u, lo in enumerate(range(0, b, self.mb)):
                if self.group is not None and not self.group.owns(u):  # another rank's micro-batch
                    if (u + 1) % self.accum == 0:
                        optimizer_s += self._optimizer_step(stats, batch.iteration)
                    continue
                rows = order[lo:lo + self.mb]
                if between is not None:
                    between()
                t_fb = time.perf_counter()
                loss, m = self._forward_backward(batch, cond, rows, steps, adv, (batch.iteration, epoch, u), weights)
                if loss.is_cuda:  # time the kernels, not their launch
                    torch.cuda.synchronize(loss.device)
                forward_backward_s += time.perf_counter() - t_fb
                if epoch == 0 and lo == 0:
                    # before any optimizer step the policy equals the rollout policy: ratio must be 1
                    stats["first_ratio_dev"].append(max(abs(float(m["ratio_max"]) - 1), abs(float(m["ratio_min"]) - 1)))
                for k in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl", "kl"):
                    stats[k].append(float(m[k]))
                stats["loss"].append(float(loss.detach()))
                stats["forward_rows"].append(int(m["forward_rows"]))
                step_loss += m["loss_per_step"].cpu()
                if (u + 1) % self.accum == 0:
                    optimizer_s += self._optimizer_step(stats, batch.iteration)
        if self.group is not None:
            self.group.reduce_stats(stats, step_loss)
        self.version += 1
        self.iteration = batch.iteration
        if self.lagged is not None:  # NFT, AWM: φ ← d·φ + (1−d)·θ after each iteration
            theta = self.policy.trainable_state_dict()  # one copy of θ, not one per tensor
            lagged_update(list(self.lagged.values()), [theta[k] for k in self.lagged], self.awm.decay(self.version))
        n_micro = stats.pop("n_micro", [len(stats["loss"])])[0]
        return update_record(
            batch, stats, self.reward_weights, self.objective, adv,
            loss_per_step=(step_loss / n_micro).tolist(), trained_steps=self._trained_steps(batch, selections[-1]),
            steps_per_row=width, trained_sample_steps=b * width * self.epochs, update_s=time.perf_counter() - t0,
            update_cpu_s=time.process_time() - c0, forward_backward_s=forward_backward_s, optimizer_s=optimizer_s,
            weight_version=self.version, staleness=self.version - 1 - batch.weight_version)

    def policy_gradient(self, batch: RolloutBatch) -> torch.Tensor:
        """The flattened gradient of this batch's GRPO loss at the current weights, all window steps
        (at ratio 1, i.e. the policy-gradient estimate); no optimizer step, `.grad` left cleared."""
        adv = self.advantages(batch).to(self.device)
        weights = self.row_weights(batch)
        batch = batch.to(self.device)
        steps = list(range(self.awm.times if self.awm else batch.log_probs.shape[1]))
        cond = {k: v.repeat_interleave(batch.group_size, 0) for k, v in batch.cond.items()}
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, batch.num_rows, self.mb):
            rows = torch.arange(lo, min(lo + self.mb, batch.num_rows))
            loss, _ = self._micro_step(batch, cond, rows, steps, adv, (batch.iteration, 0, lo // self.mb), weights)
            (loss * len(rows) / batch.num_rows).backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        self.optimizer.zero_grad(set_to_none=True)
        return grad.detach().clone()

    def row_weights(self, batch: RolloutBatch) -> torch.Tensor | None:
        """TempFlow-GRPO's noise-aware weight of each row (credit.py); None for every other method."""
        if self.branching != "tempflow":
            return None
        return noise_aware_row_weights(batch, eta=self.eta, sde_kind=self.sde_kind).to(self.device)

    def _optimizer_step(self, stats: dict, iteration: int) -> float:
        """Sum the ranks' gradients (data parallel), clip the whole gradient, step; -> seconds."""
        t_opt = time.perf_counter()
        if self.group is not None and self.sharding == "none":
            self.group.sum_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
        if not torch.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {float(norm)} at iteration {iteration}")
        stats["grad_norm"].append(float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t_opt

    def join_group(self, init_method: str, rank: int, world_size: int, backend: str = "gloo",
                   sharding: str = "none") -> None:
        """Become rank `rank` of a `world_size`-rank learner (before the first update); with sharding="fsdp" the
        transformer is sharded (full fine-tuning) and the optimizer rebuilt over the shards."""
        from .group import RankGroup, shard_transformer

        if self.version:
            raise RuntimeError("join_group before the first update")
        self.group, self.sharding = RankGroup(init_method, rank, world_size, backend), sharding
        if sharding == "fsdp":
            if self.policy.trainable.lora_rank or self.kl_beta:
                raise ValueError("learner.sharding=fsdp shards a fully trained transformer: model.lora_rank=0 and "
                                 "grpo.kl_beta=0 (a LoRA adapter is small: data parallel)")
            shard_transformer(self.policy.transformer)
            self.params = self.policy.trainable_parameters()
            self.optimizer = torch.optim.AdamW(self.params, **self.optim_kwargs)

    def _trained_steps(self, batch: RolloutBatch, steps: Selection) -> list[int]:
        """Trajectory steps that got a gradient: the window's (per_sample: those of any row in the last epoch);
        AWM's σ-grid draws of the first micro-batch."""
        if self.awm:
            return matching_times(self.awm, self.seed, (batch.iteration, 0, 0))[0].tolist()
        if batch.steps is not None:  # branched: each row's own branch step
            return sorted(set(batch.steps.tolist()))
        return [batch.window[0] + s for s in (torch.unique(steps).tolist() if torch.is_tensor(steps) else steps)]

    def _forward_backward(self, batch: RolloutBatch, cond: dict, rows: torch.Tensor, steps: Selection,
                          adv: torch.Tensor, key: tuple[int, ...] = (), weights: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one micro-batch; gradients accumulate as those of (its mean loss) / accum.

        With `timesteps_per_backward` = t > 0 the window steps go t at a time, each chunk its own backward
        (what the references do with t = 1: one timestep per backward, a fraction of the activations);
        the gradient is the same sum. -> (the micro-batch's loss, its metrics merged over the chunks)
        """
        k, t = steps_per_row(steps), self.timesteps_per_backward or steps_per_row(steps)
        scale = self.group.world_size if self.sharding == "fsdp" else 1  # FSDP averages over ranks: undo
        if t >= k:
            loss, m = self._micro_step(batch, cond, rows, steps, adv, key, weights)
            (loss * scale / self.accum if scale != 1 else loss / self.accum).backward()
            return loss.detach(), m
        parts = []
        for lo in range(0, k, t):
            sub = steps[:, lo:lo + t] if torch.is_tensor(steps) else steps[lo:lo + t]
            loss, m = self._micro_step(batch, cond, rows, sub, adv, key, weights)
            (loss * (scale * steps_per_row(sub) / k) / self.accum).backward()
            parts.append((steps_per_row(sub) / k, loss.detach(), m))
        merged = {key: sum(w * m[key] for w, _, m in parts) for key in ("ratio_mean", "clip_frac", "approx_kl", "kl")}
        merged |= {"ratio_min": min(m["ratio_min"] for _, _, m in parts),
                   "ratio_max": max(m["ratio_max"] for _, _, m in parts),
                   "loss_per_step": torch.cat([m["loss_per_step"] for _, _, m in parts]),
                   "forward_rows": sum(m["forward_rows"] for _, _, m in parts)}
        return sum(w * loss for w, loss, _ in parts), merged

    def _micro_step(self, batch: RolloutBatch, cond: dict, rows: torch.Tensor, steps: Selection,
                    adv: torch.Tensor, key: tuple[int, ...] = (), weights: torch.Tensor | None = None):
        """The loss of `rows` × window `steps` (a list for every row, or (B, k) each row its own): GRPO's clipped
        objective (each row times its weight, TempFlow), plus β·KL to the reference (AWM: `steps` are the
        micro-batch's time draws, `key` seeds them; objectives.py)."""
        if self.awm:
            return matching_micro_loss(self.policy, batch, cond, rows.to(self.device), steps, adv, spec=self.awm,
                                       seed=self.seed, key=key, kl_beta=self.kl_beta, lagged=self.lagged)
        k = steps_per_row(steps)
        rows, idx = rows.to(self.device), row_steps(steps, rows).to(self.device)  # idx: (mb, k)
        r = rows[:, None]
        x = batch.latents[r, idx].flatten(0, 1)  # (mb·k, C, H, W)
        x_next = batch.next_latents[r, idx].flatten(0, 1)
        if batch.sigmas.ndim == 1:
            sig, sig_next = batch.sigmas[idx].flatten(), batch.sigmas_next[idx].flatten()  # (mb·k,)
        else:  # branched: each row its own step
            sig, sig_next = batch.sigmas[r, idx].flatten(), batch.sigmas_next[r, idx].flatten()
        c = {n: v[rows].repeat_interleave(k, 0) for n, v in cond.items()}
        # members of a group start the window's first step (a branched row: its branch step) from one x: one forward
        first = torch.ones_like(idx, dtype=torch.bool) if batch.steps is not None else idx == 0
        sharing = shared_inputs(x, sig, r.expand(-1, k).flatten() // batch.group_size, first.flatten())
        step = transition_step(shared_velocity(self.policy.velocity, sharing), x, x_next, sig, sig_next, c,
                               eta=self.eta, sde_kind=self.sde_kind)
        loss, m = grpo_loss(step.log_prob.view(len(rows), k), batch.log_probs[r, idx], adv[rows],
                            clip_range=self.clip_range, adv_clip_max=self.adv_clip_max,
                            weights=None if weights is None else weights[rows])
        if self.kl_beta > 0:
            v_ref = shared_velocity(self.policy.reference_velocity, sharing)(x, sig, c).to(torch.float32)
            ref_mean, _ = sde_mean_std(x, v_ref, sig, sig_next, eta=self.eta, kind=self.sde_kind)
            kl = kl_penalty(step.mean, ref_mean, step.std)  # (mb·k,)
            loss = loss + self.kl_beta * kl.mean()
            m["kl"] = kl.detach().mean()
        else:
            m["kl"] = torch.zeros(())
        m["forward_rows"] = len(sharing.unique)  # rows the policy's forward computed (benchmarks' floors)
        if self.aux is not None:  # the same rows' final images, AWM's time draws seeded by the micro-batch's key
            aux_loss, aux_m = matching_micro_loss(self.policy, batch, cond, rows, list(range(self.aux.times)), adv,
                                                  spec=self.aux, seed=self.seed, key=key)
            loss = loss + self.matching_aux * aux_loss
            m["forward_rows"] += aux_m["forward_rows"]
        return loss, m

    # ------------------------------------------------------------------------------ weights & state
    def weight_version(self) -> int:
        return self.version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights whole, on the CPU (gathered from the shards under FSDP: every rank must call)."""
        if self.sharding != "fsdp":
            return self.policy.trainable_state_dict()
        names = {n for n, _ in self.policy.transformer.named_parameters()}
        return {k: v for k, v in full_state(self.policy.transformer).items() if k in names}

    def published_state(self) -> dict[str, torch.Tensor]:
        """What the broadcast carries: the trainable weights, in the rollout workers' dtype when that differs
        (full fine-tuning with bf16 inference weights), so what they load is exactly what was sent."""
        return self._in_sync_dtype(self.lagged if self.objective == "nft" else self.trainable_state())  # NFT: φ

    def _in_sync_dtype(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.sync_dtype is None:
            return state
        return {k: v.to(self.sync_dtype) if v.is_floating_point() else v for k, v in state.items()}

    def published_checksum(self, state: dict[str, torch.Tensor]) -> str | None:
        """FSDP: `state`'s `fp` checksum from the shards (a collective), not the gathered state's; else None."""
        if self.sharding != "fsdp" or self.objective == "nft":  # NFT publishes its lagged copy, not the shards
            return None
        return sharded_checksum(self.policy.transformer, state, self.sync_dtype)

    def get_weights(self) -> WeightPacket:
        state = self.published_state()
        return WeightPacket.build(self.version, state, self.published_checksum(state))

    def evaluated_weights(self) -> WeightPacket | None:
        """The weights the held-out evaluation must score when the workers do not hold them: DiffusionNFT's workers
        sample with the lagged φ, while the policy the run trains, checkpoints and exports (and
        `learner.tools.eval` scores) is θ, which the reference evaluates too (NVlabs/DiffusionNFT
        scripts/train_nft_sd3.py, `eval_fn` on the "default" adapter). -> θ's packet for NFT, None otherwise.
        Under FSDP every rank must call (the state is gathered)."""
        if self.objective != "nft":
            return None
        return WeightPacket.build(self.version, self._in_sync_dtype(self.trainable_state()))

    def open_channel(self, init_method: str, world_size: int, backend: str) -> None:
        """Join the weight-broadcast group as rank 0 (collective weight sync)."""
        self.channel = CollectiveChannel(0, world_size, init_method, backend)

    def send_weights(self) -> tuple[int, str] | None:
        """Broadcast to the workers (rank 0; the other ranks of an FSDP learner only help gather the state)."""
        state = self.published_state()
        checksum = self.published_checksum(state)
        if self.group is not None and self.group.rank != 0:
            return None
        return self.channel.broadcast(state, self.version, checksum)

    def save(self, root: str, extra: dict | None = None) -> str | None:
        """Write a checkpoint (rank 0 of a K-rank learner; the others take part in gathering shards) -> its path.

        Data parallel and single-process learners save AdamW's state as torch does (by parameter index, equal on
        every rank), so they restore on any number of ranks; FSDP saves it gathered and keyed by name."""
        weights = self.trainable_state()
        if self.sharding == "fsdp":
            from .group import full_optimizer_state

            optim = full_optimizer_state(self.policy.transformer, self.optimizer)
        else:
            optim = self.optimizer.state_dict()
        if self.lagged is not None:  # the lagged policy is optimisation state: it travels with the optimizer's
            optim = {**optim, "lagged": {k: v.detach().cpu() for k, v in self.lagged.items()}}
        if self.group is not None and self.group.rank != 0:
            return None
        meta = {"version": self.version, "torch_rng": torch.get_rng_state().tolist(), "sharding": self.sharding,
                **(extra or {})}
        return str(save_checkpoint(root, self.iteration, weights, optim, meta))

    def restore(self, path: str) -> dict:
        """Load a checkpoint, written by a learner of any number of ranks with the same `learner.sharding`."""
        weights, optim, meta = load_checkpoint(path)
        lagged = optim.pop("lagged", optim.pop("nft_lagged", None))  # (nft_lagged: checkpoints before AWM had one)
        if (lagged is None) != (self.lagged is None):
            raise ValueError(f"checkpoint {path} {'lacks' if lagged is None else 'holds'} a lagged policy; this "
                             f"learner's grpo.objective is {self.objective}: resume with the objective (and "
                             "grpo.awm_lagged_beta) it was run with")
        if lagged is not None:
            for k, v in self.lagged.items():
                v.copy_(lagged[k])
        saved = meta.get("sharding", "none")
        if (saved == "fsdp") != (self.sharding == "fsdp"):
            raise ValueError(f"checkpoint {path} was written with learner.sharding={saved}; this learner uses "
                             f"learner.sharding={self.sharding}: resume with the same sharding")
        if self.sharding == "fsdp":
            from .group import load_full_optimizer_state, load_full_state

            load_full_state(self.policy.transformer, weights)
            load_full_optimizer_state(self.policy.transformer, self.optimizer, optim)
        else:
            self.policy.load_trainable_state_dict(weights)
            self.optimizer.load_state_dict(optim)
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        self.version, self.iteration = int(meta["version"]), int(meta["iteration"])
        return meta
