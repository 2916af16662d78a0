"""The comparison's arithmetic and tables: one row per method from its metrics records (and rounds of it), the
ratios to DanceGRPO, the floors beside them (`floors.py`), the markdown. Pure: no Ray, no torch;
`compare_methods.py` runs the methods and calls these.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.floors import UnitCosts, Work, above_floor, floor_seconds

BASELINE = "dance_grpo"
# issue 18's goals: time per iteration as a fraction of DanceGRPO's (paper: 0.52, 0.39, 0.29 on FLUX)
TARGETS = {"mixgrpo": 0.45, "mixgrpo_flash": 0.33, "mixgrpo_flash_star": 0.25, "mixgrpo_flash_star async": 0.18}
PAPER = {"mixgrpo": 0.52, "mixgrpo_flash": 0.39, "mixgrpo_flash_star": 0.29}  # ALGORITHM.md §8, FLUX on 32 GPUs


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(train: list[dict], evals: list[dict], *, warmup: int = 1, reward_k: int = 5) -> dict:
    """One method's row from its metrics.jsonl records (train records in iteration order, eval records).

    Median s/iter skips the first `warmup` iterations (actor start-up, first calls); with too few
    iterations it falls back to all of them. k for the reward gain is capped at half the iterations.
    """
    if not train:
        raise ValueError("no train records")
    timed = train[warmup:] or train
    k = max(1, min(reward_k, len(train) // 2))
    rewards = [float(r["reward_mean"]) for r in train]
    by_iter = sorted(evals, key=lambda r: r["iteration"])
    base = next((_eval_score(e) for e in by_iter if e["iteration"] < 0), None)
    final = _eval_score(by_iter[-1]) if by_iter and by_iter[-1]["iteration"] >= 0 else None
    return {
        "iterations": len(train),
        "nfe": _mean([float(r["nfe"]) for r in train]),
        "image_evals": _mean([float(r["image_evals"]) for r in train]),
        "steps_trained": _mean([float(r.get("steps_per_row", len(r["trained_steps"]))) for r in train]),
        "median_s": statistics.median(float(r["iteration_seconds"]) for r in timed),
        "reward_first": _mean(rewards[:k]), "reward_last": _mean(rewards[-k:]),
        "reward_gain": _mean(rewards[-k:]) - _mean(rewards[:k]),
        "eval_base": base if base is not None else float("nan"),
        "eval_final": final if final is not None else float("nan"),
        "verifier_gain": final - base if base is not None and final is not None else float("nan"),
        "phases": {name: statistics.median(_phases(r)[name] for r in timed) for name in (*PHASE_KEYS, "rest")},
        # the timed iterations' work and model compute, for the floors (NaN in records that lack them)
        "work_image_evals": _mean([float(r["image_evals"]) for r in timed]),
        # the rows the learner's forward computed (a group's shared first window step once), else the transitions
        "work_trained": _mean([float(r.get("forward_rows", r.get("trained_sample_steps", "nan"))) for r in timed]),
        "forward_s": _mean([float((r.get("rollout_timings") or {}).get("forward_s", "nan")) for r in timed]),
        # all workers' forward seconds together (NaN in records from before the metric)
        "forward_sum_s": _mean([float((r.get("rollout_timings") or {}).get("forward_sum_s", "nan")) for r in timed]),
        "forward_backward_s": _mean([float(r.get("forward_backward_s", "nan")) for r in timed]),
    }


def _eval_score(rec: dict) -> float:
    """An eval record's headline: the verifier score on the shapes world, else its first reward column."""
    if "eval_verifier_score" in rec:
        return float(rec["eval_verifier_score"])
    return float(rec[f"eval_{rec['eval_columns'][0]}"])


# a method's timings, pooled over rounds; its work, rewards and evaluations are the first round's (runs are deterministic)
TIME_KEYS = ("median_s", "phases", "forward_s", "forward_sum_s", "forward_backward_s")


def summarize_rounds(rounds: list[tuple[list[dict], list[dict]]], *, warmup: int = 1, reward_k: int = 5) -> dict:
    """One method's row from R rounds of the same run (each round's train and eval records).

    The timed iterations of every round (each skipping its own `warmup`) are pooled: "median_s", the phases and the
    unit-cost seconds are their medians / means. "round_median_s" keeps each round's own median, for the ratios
    round by round (`with_ratios`). Work, rewards and evaluations are the first round's: the rounds repeat one
    deterministic run, so they agree (`rounds_disagree` says where they do not).
    """
    if not rounds:
        raise ValueError("no rounds")
    per_round = [summarize(train, evals, warmup=warmup, reward_k=reward_k) for train, evals in rounds]
    timed = [r for train, _ in rounds for r in (train[warmup:] or train)]
    pooled = summarize(timed, [], warmup=0, reward_k=reward_k)
    return {**per_round[0], **{k: pooled[k] for k in TIME_KEYS},
            "round_median_s": [r["median_s"] for r in per_round], "rounds_disagree": rounds_disagree(per_round)}


def rounds_disagree(per_round: list[dict], tol: float = 1e-4) -> list[str]:
    """The work and reward fields on which the rounds of one method differ by more than `tol` (empty when they repeat
    one run: multi-threaded float sums differ in the last digits from run to run, ~1e-6 in the reward gain, which
    the table's three decimals do not show)."""
    keys = ("iterations", "image_evals", "work_image_evals", "work_trained", "reward_gain", "verifier_gain")
    return [k for k in keys if any(not math.isclose(r[k], per_round[0][k], rel_tol=tol, abs_tol=tol)
                                   and not (r[k] != r[k] and per_round[0][k] != per_round[0][k]) for r in per_round)]


PHASE_KEYS = {"sample": ("rollout_timings", "sample_s"), "reward wait": ("rollout_timings", "reward_wait_s"),
              "update": (None, "update_s"), "broadcast": (None, "broadcast_s")}


def _phases(rec: dict) -> dict[str, float]:
    """Seconds per phase of one train record; "rest" = iteration_seconds − the phases (negative when an
    async rollout overlapped the update by more than the driver's own time)."""
    out = {}
    for name, (section, key) in PHASE_KEYS.items():
        v = (rec.get(section) or {}).get(key) if section else rec.get(key)
        out[name] = float(v) if isinstance(v, int | float) else 0.0
    out["rest"] = float(rec["iteration_seconds"]) - sum(out.values())
    return out


def with_ratios(rows: dict[str, dict], baseline: str = BASELINE) -> dict[str, dict]:
    """Adds "ratio" (median s/iter ÷ the baseline's; NaN without a baseline) and "target" to each row; rows of
    several rounds (`summarize_rounds`) also get "round_ratios", each round's median over that round's baseline's."""
    base = rows.get(baseline, {}).get("median_s")
    base_rounds = rows.get(baseline, {}).get("round_median_s")
    out = {}
    for name, row in rows.items():
        out[name] = {**row, "ratio": row["median_s"] / base if base else float("nan"), "target": TARGETS.get(name)}
        if base_rounds and row.get("round_median_s"):  # each round's median over the same round's baseline
            out[name]["round_ratios"] = [m / b for m, b in zip(row["round_median_s"], base_rounds, strict=True)]
    return out


def rollout_core_seconds(row: dict) -> float:
    """The rollout's model-forward core-seconds per iteration: every worker's forward seconds × its threads where the
    records have the sum ("forward_sum_s", `rollout_threads`), else the slowest worker's × all rollout cores (an
    upper estimate: it counts the workers' imbalance as compute)."""
    total, threads = row.get("forward_sum_s", float("nan")), row.get("rollout_threads")
    if total == total and threads:  # not NaN
        return total * threads
    return row["forward_s"] * row["rollout_cores"]


def worker_imbalance(row: dict) -> float:
    """How much longer the slowest worker computed than the workers' mean: forward_s ÷ (forward_sum_s / workers) − 1
    (NaN without the sum)."""
    total, workers = row.get("forward_sum_s", float("nan")), row.get("rollout_workers")
    return row["forward_s"] / (total / workers) - 1 if total == total and total > 0 and workers else float("nan")


def unit_costs(rows: dict[str, dict]) -> UnitCosts:
    """c_eval and c_train in core-seconds, pooled over the synchronous rows (an overlapped phase shares its cores):
    the rollout's model-forward core-seconds (`rollout_core_seconds`) over its image evaluations, and the learner's
    forward+backward seconds × its threads over its trained sample-steps. Each row needs `overlap`, `rollout_cores`
    and `learner_cores` (from `run_variants`; `rollout_threads` too for the exact rollout sum)."""
    sync = [r for r in rows.values() if not r["overlap"]]
    if not sync:
        raise ValueError("unit costs need at least one synchronous method")
    return UnitCosts(
        eval_s=sum(rollout_core_seconds(r) for r in sync) / sum(r["work_image_evals"] for r in sync),
        train_s=sum(r["forward_backward_s"] * r["learner_cores"] for r in sync) / sum(r["work_trained"] for r in sync))


def with_floors(rows: dict[str, dict], cores: float, baseline: str = BASELINE) -> dict[str, dict]:
    """Adds "floor_s" (floors.py: the zero-overhead seconds per iteration on `cores`, async on the best split of
    them), "floor_ratio" (÷ the baseline's floor) and "over_floor" (median s/iter ÷ floor − 1) to rows that
    already have their ratios (`with_ratios`)."""
    costs = unit_costs(rows)
    floors = {name: floor_seconds(Work(r["work_image_evals"], r["work_trained"], overlap=r["overlap"]), costs, cores)
              for name, r in rows.items()}
    base = floors.get(baseline, float("nan"))
    return {name: {**r, "floor_s": floors[name], "floor_ratio": floors[name] / base,
                   "over_floor": r["median_s"] / floors[name] - 1} for name, r in rows.items()}


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None or v != v else format(v, fmt)  # v != v: NaN


def _pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:+.0f} %"


def _rounds(row: dict) -> str:
    """" (0.44, 0.47)": the ratio of each round, when there were several."""
    ratios = row.get("round_ratios") or []
    return f" ({', '.join(format(x, '.2f') for x in ratios)})" if len(ratios) > 1 else ""


def markdown_table(rows: dict[str, dict]) -> str:
    """The comparison table (rows from `with_ratios`) and the per-phase medians behind the times."""
    floors = all("floor_s" in r for r in rows.values())
    lines = ["| method | rollout NFE | image evals / iter | steps trained / iter | median s / iter | "
             f"× {BASELINE} | {'floor × | over floor | ' if floors else ''}goal | reward gain | "
             "held-out verifier gain (base → final) |",
             f"|---|---:|---:|---:|---:|---:|{'---:|---:|' if floors else ''}---:|---:|---|"]
    for name, r in rows.items():
        goal = f"≤ {r['target']:.2f}" if r.get("target") else "–"
        if name in PAPER:
            goal += f" (paper {PAPER[name]:.2f})"
        met = "" if not r.get("target") or r["ratio"] != r["ratio"] else (" ✓" if r["ratio"] <= r["target"] else " ✗")
        floor = ""
        if floors:
            flag = " ⚠" if above_floor(r["median_s"], r["floor_s"]) else ""
            floor = f"{_f(r['floor_ratio'], '.2f')} | {_pct(r['over_floor'])}{flag} | "
        lines.append(
            f"| {name} | {_f(r['nfe'], '.1f')} | {_f(r['image_evals'], '.0f')} | {_f(r['steps_trained'], '.1f')} | "
            f"{_f(r['median_s'], '.2f')} | {_f(r['ratio'], '.2f')}{met}{_rounds(r)} | {floor}{goal} | {_f(r['reward_gain'], '+.3f')} | "
            f"{_f(r['verifier_gain'], '+.3f')} ({_f(r['eval_base'], '.3f')} → {_f(r['eval_final'], '.3f')}) |")
    lines += ["", "Median seconds per phase (same iterations). Async rows overlap the next rollout with the update, so "
              "their phases add up to more than the iteration and the rest goes negative.", "",
              "| method | rollout sampling | reward wait | learner update | broadcast | rest (driver, Ray, transfer) | "
              "slowest worker's forwards over the mean |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ph = r["phases"]
        lines.append(f"| {name} | {ph['sample']:.2f} | {ph['reward wait']:.2f} | {ph['update']:.2f} | "
                     f"{ph['broadcast']:.2f} | {ph['rest']:.2f} | {_pct(worker_imbalance(r))} |")
    return "\n".join(lines)
