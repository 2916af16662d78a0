"""RolloutWorker: samples whole groups with the mixed ODE-SDE sampler, decodes, scores, returns fp32
window transitions. A plain class; `learner/driver/actors.py` makes it a Ray actor.

Two rollout shapes (`sampler.branching`): "none", one mixed ODE-SDE trajectory per group member (MixGRPO and its
baselines, AWM, NFT); "tempflow" / "granular", K children branched off each group's deterministic main path at
every window step (TempFlow-GRPO: finished by Euler, a process reward per branch step; G²RPO: finished at each
granularity's grid, one reward per grid).

Seeding: each group's initial noise and window noise come from `seeded_generator(run seed,
Stream.ROLLOUT_NOISE, iteration, global group id)`, so results do not depend on how groups are split
across workers, and a re-run shard or a resumed run repeats them exactly. The noise is drawn on the CPU and
moved to the policy's device, so a CPU run and a GPU run of one seed start from the same noise; the batch
returns to the CPU (fp32) before it leaves the worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from learner.algo import Stream, Window, sample_mixed, seeded_generator, sigma_schedule
from learner.algo.family import granularity_grid
from learner.algo.sampler import sample_branched
from services.broadcast import CollectiveChannel, WeightPacket, verify_loaded
from services.types import RolloutBatch, spread

from .policies import Policy
from .policies.base import cond_cat


class RewardFuture(Protocol):
    def result(self) -> np.ndarray: ...


class RewardSink(Protocol):
    """What a worker needs from the reward service: submit a batch now, collect the scores later."""

    def submit(self, name: str, images: np.ndarray, prompts: Sequence[str]) -> RewardFuture: ...


def _timed(fn, seconds: dict[str, float], key: str):
    """`fn`, adding its wall time to seconds[key] (benchmarks/overhead.py: model compute vs the rest).

    On CUDA the device is synchronised after each call so the time is the kernels', not the launch's.
    """
    def call(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_cuda:
            torch.cuda.synchronize(out.device)
        seconds[key] += time.perf_counter() - t
        return out

    return call


class RolloutWorker:
    def __init__(
        self, policy: Policy, rewards: RewardSink, reward_names: Sequence[str], *, num_steps: int, shift: float,
        eta: float, sde_kind: str, post_window: str, compress_ratio: float, group_size: int, seed: int,
        chunk_groups: int = 4, log_images: int = 4, num_threads: int | None = None, worker_id: int = 0,
        keep_final: bool = False, branching: str = "none", granularities: Sequence[int] = (1,),
        group_noise: str = "shared",
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)  # Ray gives fractional-CPU actors OMP_NUM_THREADS=1
        self.policy, self.rewards, self.reward_names = policy.train(False), rewards, list(reward_names)
        self.sigmas = sigma_schedule(num_steps, shift)
        self.eta, self.sde_kind, self.post_window, self.compress_ratio = eta, sde_kind, post_window, compress_ratio
        self.group_size, self.seed, self.chunk_groups, self.log_images = group_size, seed, chunk_groups, log_images
        self.worker_id, self.keep_final = worker_id, keep_final  # keep_final: the final latents go to the learner
        if branching not in ("none", "tempflow", "granular"):
            raise ValueError(f"unknown branching {branching!r}; expected none, tempflow or granular")
        if branching != "none" and keep_final:
            raise ValueError("branched rollouts (TempFlow-GRPO, G²RPO) train on transitions, not on final latents")
        self.branching, self.granularities = branching, list(granularities) if branching == "granular" else [1]
        if group_noise not in ("shared", "independent"):
            raise ValueError(f"unknown group_noise {group_noise!r}; expected shared or independent")
        if group_noise == "independent" and branching != "none":
            raise ValueError("branched rollouts grow a group's children off one main path: they need group_noise "
                             "shared")
        self.group_noise = group_noise
        self.version = 0

    # ----------------------------------------------------------------------------- weights
    def sync_weights(self, packet: WeightPacket) -> int:
        """Load a newer version; verify version and checksum; return the version now held.

        An equal version is only verified (at start-up: the worker must begin from the learner's weights).
        """
        if packet.version < self.version:
            return self.version
        if packet.version == self.version:
            verify_loaded(packet, self.policy.trainable_state_dict(), self.version)
            return self.version
        return self.load_weights(packet)

    def load_weights(self, packet: WeightPacket) -> int:
        """Load exactly `packet`, older or newer than what is held, and verify it; return its version.

        For re-running a lost shard: it must sample with the weights its rollout started with, which in
        async mode are one version behind the learner.
        """
        self.policy.load_trainable_state_dict(packet.state)
        verify_loaded(packet, self.policy.trainable_state_dict(), packet.version)
        self.version = packet.version
        return self.version

    @contextlib.contextmanager
    def holding(self, packet: WeightPacket | None):
        """Within the block the policy holds `packet`'s weights (verified), then its own again, verified too: what
        an evaluation of weights the worker does not sample with needs (DiffusionNFT's θ). None: a no-op."""
        if packet is None:
            yield
            return
        own = WeightPacket.build(self.version, {k: v.clone() for k, v in self.policy.trainable_state_dict().items()})
        self.policy.load_trainable_state_dict(packet.state)
        try:
            verify_loaded(packet, self.policy.trainable_state_dict(), packet.version)
            yield
        finally:
            self.policy.load_trainable_state_dict(own.state)
            verify_loaded(own, self.policy.trainable_state_dict(), self.version)

    def open_channel(self, rank: int, init_method: str, world_size: int, backend: str) -> None:
        """Join the weight-broadcast group (collective weight sync); the learner is rank 0."""
        self.channel = CollectiveChannel(rank, world_size, init_method, backend)

    def receive_weights(self) -> int:
        """Receive the learner's broadcast into buffers, load, and verify version and checksum."""
        state = self.policy.trainable_state_dict()  # the live weights' storage: received into in place
        version, checksum = self.channel.broadcast(state, -1)
        self.policy.load_trainable_state_dict(state)
        verify_loaded((version, checksum), self.policy.trainable_state_dict(), version)
        self.version = version
        return version

    def weight_version(self) -> int:
        return self.version

    # ----------------------------------------------------------------------------- rollout
    def _noise(self, iteration: int, group_ids: Sequence[int], window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial noise, (P, C, H, W), or (P·G, C, H, W) with group_noise independent (each member's own,
        drawn from its group's stream before the window's), and the SDE noise: (P·G, w, C, H, W), branched
        (P, w, K, C, H, W)."""
        shape = self.policy.latent_shape
        members = self.group_size if self.group_noise == "independent" else 1
        inits, sde = [], []
        for gid in group_ids:
            gen = seeded_generator(self.seed, Stream.ROLLOUT_NOISE, iteration, gid)
            inits.append(torch.randn((members, *shape), generator=gen))
            if self.branching == "none":
                sde.append(torch.randn((self.group_size, window.size, *shape), generator=gen))
            else:
                sde.append(torch.randn((1, window.size, self.group_size, *shape), generator=gen))
        return torch.cat(inits), torch.cat(sde)

    def _sample(self, velocity, noise, cond, win: Window, sde_noise):
        """One chunk of groups → (trajectory, its final latents per finishing grid)."""
        if self.branching == "none":
            traj = sample_mixed(velocity, noise, cond, self.sigmas, win, group_size=self.group_size, eta=self.eta,
                                sde_kind=self.sde_kind, post_window=self.post_window,
                                compress_ratio=self.compress_ratio, sde_noise=sde_noise,
                                shared_noise=self.group_noise == "shared")
            return traj, [traj.final]
        grids = [lambda k, j=j: granularity_grid(self.sigmas, k, j) for j in self.granularities]
        traj = sample_branched(velocity, noise, cond, self.sigmas, win.steps, children=self.group_size, eta=self.eta,
                               sde_kind=self.sde_kind, sde_noise=sde_noise, grids=grids)
        return traj, list(traj.finals)

    def rows_per_group(self, window: Window) -> int:
        """Rows of one prompt: G members, or K children at each of the w branch steps."""
        return self.group_size * (1 if self.branching == "none" else window.size)

    def rollout(self, iteration: int, window: tuple[int, int], prompts: Sequence[str],
                group_ids: Sequence[int]) -> RolloutBatch:
        """Sample, decode and score the groups of `prompts`; scoring of a chunk overlaps the next chunk."""
        if len(prompts) != len(group_ids):
            raise ValueError("one group id per prompt is required")
        win = Window(*window)
        rows = self.rows_per_group(win)
        t0, c0 = time.perf_counter(), time.process_time()  # process_time: this worker's CPU, all threads
        conds, trajs, pending = [], [], []
        model = {"encode_s": 0.0, "forward_s": 0.0, "decode_s": 0.0}  # model compute inside sample_s
        velocity = _timed(self.policy.velocity, model, "forward_s")
        for lo in range(0, len(prompts), self.chunk_groups):
            chunk, ids = list(prompts[lo:lo + self.chunk_groups]), list(group_ids[lo:lo + self.chunk_groups])
            cond = _timed(self.policy.encode_prompts, model, "encode_s")(chunk)
            noise, sde_noise = self._noise(iteration, ids, win)
            noise = noise.to(self.policy.device)  # (the window's noise moves step by step, in the sampler)
            traj, finals = self._sample(velocity, noise, cond, win, sde_noise)
            decoded = [_timed(self.policy.decode, model, "decode_s")(f) for f in finals]  # (rows, H, W, 3) uint8
            member_prompts = [p for p in chunk for _ in range(rows)]
            pending.append([{n: self.rewards.submit(n, im, member_prompts) for n in self.reward_names}
                            for im in decoded])
            conds.append(cond)
            trajs.append((traj, decoded[0]))
        t_sample = time.perf_counter() - t0
        rewards = self._collect(pending)
        t_total = time.perf_counter() - t0
        first = trajs[0][0]
        images = np.concatenate([im for _, im in trajs])
        k = min(self.log_images, len(images))
        logged = spread(len(images), k)  # spread over the groups
        member_of = [p for p in prompts for _ in range(rows)]
        branched = self.branching != "none"
        cat = lambda name: torch.cat([getattr(t, name) for t, _ in trajs])  # noqa: E731
        return RolloutBatch(
            prompts=list(prompts), prompt_ids=list(group_ids), group_size=rows,
            latents=cat("latents"), next_latents=cat("next_latents"), log_probs=cat("log_probs"),
            sigmas=cat("sigmas") if branched else first.sigmas,
            sigmas_next=cat("sigmas_next") if branched else first.sigmas_next,
            rewards=rewards, window=(win.start, win.size), iteration=iteration, weight_version=self.version,
            nfe=first.nfe, image_evals=sum(t.image_evals for t, _ in trajs), cond=cond_cat(conds),
            images=images[logged] if k else None,
            image_prompts=[member_of[i] for i in logged], image_rows=logged,
            timings={"sample_s": t_sample, "reward_wait_s": t_total - t_sample, "rollout_s": t_total, **model,
                     "cpu_s": time.process_time() - c0},
            final_latents=cat("final").float() if self.keep_final else None,
            branches=win.size if branched else 1, steps=cat("steps") if branched else None,
        ).to("cpu")

    def _collect(self, pending: list[list[Mapping[str, RewardFuture]]]) -> dict[str, torch.Tensor]:
        """Scores per reward: (B,), or (B, J) with one column per finishing grid (G²RPO's granularities)."""
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.reward_names}
        for per_grid in pending:
            for name in self.reward_names:
                cols = []
                for futures in per_grid:
                    scores = np.asarray(futures[name].result(), dtype=np.float32)
                    if not np.all(np.isfinite(scores)):
                        raise ValueError(f"reward {name!r} returned non-finite scores")
                    cols.append(scores)
                out[name].append(np.stack(cols, 1) if self.branching == "granular" else cols[0])
        return {n: torch.from_numpy(np.concatenate(v)) for n, v in out.items()}
