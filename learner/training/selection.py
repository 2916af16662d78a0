"""Which window steps each row of a batch trains: all of them, one seeded subset for every row, or (DanceGRPO)
a subset of its own per row.

A selection is a list of window-step indices shared by every row, or a (B, k) long tensor, row b's k steps in
row b. Either way each row trains k = `trained_count(w, fraction)` steps, so the learner's cost is B·k trained
transitions whichever way they are drawn. Every draw is a pure function of the run seed and where it happens
(`learner.algo.seeding`), so K learner ranks and a resumed run draw the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learner.algo import Stream, seeded_generator

Selection = list[int] | torch.Tensor


def trained_count(window_size: int, fraction: float) -> int:
    """k, the window steps each row trains: max(1, round(fraction·w)). DanceGRPO's reference takes
    int(w·timestep_fraction), the same at its shapes (w = N−1: 9 of 15 at N = 16, 14 of 24 at N = 25)."""
    return window_size if fraction >= 1.0 else max(1, round(fraction * window_size))


def trained_steps(window_size: int, fraction: float, seed: int, iteration: int) -> list[int]:
    """Window-step indices trained this iteration by every row: all, or a seeded random subset."""
    if fraction >= 1.0:
        return list(range(window_size))
    gen = seeded_generator(seed, Stream.TRAINED_STEPS, iteration)
    return sorted(torch.randperm(window_size, generator=gen)[:trained_count(window_size, fraction)].tolist())


def trained_steps_per_sample(window_size: int, fraction: float, seed: int, iteration: int, epoch: int,
                             prompt_ids: Sequence[int], group_size: int) -> torch.Tensor:
    """(B, k) long: each row's own k window steps (increasing); rows in batch order, B = len(prompt_ids)·group_size.

    DanceGRPO's selection (XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py `train_one_step`: one
    `torch.randperm` of the trainable timesteps per sample, its first int(T·timestep_fraction) trained). A row's
    draw is keyed by (iteration, epoch, group id, member), so shards merged in any order and every learner rank
    give a row the same steps.
    """
    k = trained_count(window_size, fraction)
    keys = [(p, j) for p in prompt_ids for j in range(group_size)]
    perms = [torch.randperm(window_size, generator=seeded_generator(seed, Stream.ROW_STEPS, iteration, epoch, *key))
             for key in keys]
    return torch.stack([perm[:k].sort().values for perm in perms])


def window_selection(window_size: int, fraction: float, seed: int, iteration: int, epoch: int, *, per_sample: bool,
                     prompt_ids: Sequence[int], group_size: int) -> Selection:
    """The window steps the batch's rows train in `epoch`: `trained_steps` shared by every row, or per_sample
    (`grpo.train_selection`) `trained_steps_per_sample`, redrawn every inner epoch as DanceGRPO's SD script does."""
    if per_sample:
        return trained_steps_per_sample(window_size, fraction, seed, iteration, epoch, prompt_ids, group_size)
    return trained_steps(window_size, fraction, seed, iteration)


def steps_per_row(steps: Selection) -> int:
    """Steps per row of a selection: a list shared by all rows, or (B, k) one row each."""
    return steps.shape[1] if torch.is_tensor(steps) else len(steps)


def row_steps(steps: Selection, rows: torch.Tensor) -> torch.Tensor:
    """(mb, k) long: the window steps each of `rows` (mb,) trains."""
    if torch.is_tensor(steps):
        return steps[rows.cpu()]
    return torch.as_tensor(steps).expand(len(rows), len(steps))
