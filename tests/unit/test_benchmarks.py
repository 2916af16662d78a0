"""The benchmarks' arithmetic on worked examples (the benchmarks themselves are not run in the suite)."""

import math

import numpy as np
import pytest

from benchmarks.compare_methods import (
    LEARNER_MICRO_BATCH,
    PAPER_METHODS,
    PAPER_OVERRIDES,
    PAPER_SHAPE,
    VARIANTS,
    architecture_overrides,
    common_overrides,
    main,
    report,
    round_orders,
)
from benchmarks.compare_table import (
    markdown_table,
    rollout_core_seconds,
    summarize,
    summarize_rounds,
    unit_costs,
    with_floors,
    with_ratios,
    worker_imbalance,
)
from benchmarks.overhead import (
    compute_share,
    cpu_utilisation,
    median_breakdown,
    phase_breakdown,
    utilisation_markdown,
)
from benchmarks.reward_control import random_rewards, run_control
from benchmarks.weight_sync import fits, gpus_per_actor, peak_bytes, tensor_sizes
from learner.training.selection import trained_count


def train_rec(i, seconds, reward, *, nfe=16, image_evals=512, trained=(0, 1, 2, 3), sample=2.0):
    return {"kind": "train", "iteration": i, "iteration_seconds": seconds, "reward_mean": reward, "nfe": nfe,
            "image_evals": image_evals, "trained_steps": list(trained), "update_s": 1.0, "broadcast_s": 0.2,
            "rollout_timings": {"sample_s": sample, "reward_wait_s": 0.3}}


def test_summarize_worked_example():
    # 6 iterations; the first (warm-up, 9 s) is not timed → median of 4, 5, 3, 6, 4 = 4
    train = [train_rec(i, s, r) for i, (s, r) in enumerate(zip([9, 4, 5, 3, 6, 4], [0.1, 0.3, 0.2, 0.4, 0.6, 0.5]))]
    evals = [{"kind": "eval", "iteration": 5, "eval_verifier_score": 0.45},
             {"kind": "eval", "iteration": -1, "eval_verifier_score": 0.40}]
    row = summarize(train, evals, warmup=1, reward_k=2)
    assert row["median_s"] == 4
    assert row["reward_gain"] == pytest.approx((0.6 + 0.5) / 2 - (0.1 + 0.3) / 2)  # last 2 − first 2 = 0.35
    assert row["verifier_gain"] == pytest.approx(0.05)
    assert (row["nfe"], row["image_evals"], row["steps_trained"]) == (16, 512, 4)
    # rest = iteration − (sample 2 + reward wait 0.3 + update 1 + broadcast 0.2) per record, then the median
    assert row["phases"]["rest"] == pytest.approx(4 - 3.5)


def test_summarize_caps_k_and_handles_missing_evals():
    row = summarize([train_rec(0, 5, 0.2), train_rec(1, 7, 0.4)], [], warmup=5, reward_k=5)
    assert row["median_s"] == 6  # nothing left after the warm-up: all iterations are timed
    assert row["reward_gain"] == pytest.approx(0.2)  # k capped at 1 of 2 iterations
    assert math.isnan(row["verifier_gain"])


def test_ratios_to_dance_grpo_and_table():
    rows = {"dance_grpo": summarize([train_rec(0, 8, 0.1), train_rec(1, 8, 0.2)], []),
            "mixgrpo": summarize([train_rec(0, 6, 0.1), train_rec(1, 6, 0.3)], []),
            "mixgrpo_flash_star": summarize([train_rec(0, 2, 0.1), train_rec(1, 2, 0.1)], [])}
    out = with_ratios(rows)
    assert out["dance_grpo"]["ratio"] == 1.0
    assert out["mixgrpo"]["ratio"] == 0.75 and out["mixgrpo"]["target"] == 0.45
    assert out["mixgrpo_flash_star"]["ratio"] == 0.25
    table = markdown_table(out)
    assert "| mixgrpo | 16.0 | 512 | 4.0 | 6.00 | 0.75 ✗ | ≤ 0.45 (paper 0.52) | +0.200 |" in table
    assert "| mixgrpo_flash_star | 16.0 | 512 | 4.0 | 2.00 | 0.25 ✓ | ≤ 0.25 (paper 0.29) |" in table
    assert all(math.isnan(r["ratio"]) for r in with_ratios({"mixgrpo": rows["mixgrpo"]}).values())


def test_rounds_alternate_their_order():
    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert round_orders(["a"], 1) == [["a"]]


def test_rounds_below_one_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--paper", "--rounds", "0"])
    assert e.value.code == 2 and "--rounds must be >= 1, got 0" in capsys.readouterr().err


def test_rounds_pool_their_timed_iterations_worked_example():
    """Two rounds of 4 iterations: each skips its own warm-up, so the pooled median is over 3 + 3 iterations."""
    def rounds(times_a, times_b, rewards=(0.1, 0.2, 0.3, 0.4)):
        return [([train_rec(i, t, r) for i, (t, r) in enumerate(zip(times, rewards))], []) for times in (times_a, times_b)]

    dance = summarize_rounds(rounds([20, 10, 10, 12], [30, 14, 14, 13]), reward_k=1)
    mix = summarize_rounds(rounds([20, 5, 4, 6], [30, 6, 8, 7]), reward_k=1)
    assert dance["median_s"] == 12.5  # median of 10, 10, 12, 14, 14, 13 (neither round's own: 10, 14)
    assert dance["round_median_s"] == [10, 14] and mix["round_median_s"] == [5, 7]
    assert mix["median_s"] == 6.0  # median of 5, 4, 6, 6, 8, 7
    assert mix["reward_gain"] == pytest.approx(0.3) and mix["rounds_disagree"] == []
    out = with_ratios({"dance_grpo": dance, "mixgrpo": mix})
    assert out["mixgrpo"]["ratio"] == pytest.approx(6 / 12.5)
    assert out["mixgrpo"]["round_ratios"] == pytest.approx([0.5, 0.5])
    assert "| 6.00 | 0.48 ✗ (0.50, 0.50) | ≤ 0.45 (paper 0.52) |" in markdown_table(out)
    # a round whose work or reward differs is named, not averaged away
    first, second = rounds([20, 5, 4, 6], [30, 6, 8, 7])
    second[0][3]["reward_mean"] = 0.4 + 1e-6  # float noise of threaded sums: the same run
    assert summarize_rounds([first, second], reward_k=1)["rounds_disagree"] == []
    second[0][3]["reward_mean"] = 0.9
    assert summarize_rounds([first, second], reward_k=1)["rounds_disagree"] == ["reward_gain"]
    meta = {"load": (1.0, 2.0), "overlap": False, "rollout_cores": 2, "learner_cores": 2}
    text = report({"dance_grpo": dance | meta, "mixgrpo": mix | meta}, PAPER_SHAPE, 0, "paper", rounds=2)
    assert "2 rounds, interleaved" in text and "the same in every round" in text
    with pytest.raises(ValueError, match="no rounds"):
        summarize_rounds([])


def paper_rec(i, seconds, *, image_evals, trained, forward_s, forward_backward_s):
    return {**train_rec(i, seconds, 0.5, image_evals=image_evals, trained=range(4)), "trained_sample_steps": trained,
            "forward_backward_s": forward_backward_s,
            "rollout_timings": {"sample_s": 2.0, "reward_wait_s": 0.3, "forward_s": forward_s}}


def test_floors_beside_the_ratios_worked_example():
    """floors.py's example measured: 2 workers × 1 thread and a 2-thread learner give c_eval = 2.4·2 / 2400 = 2 ms and
    c_train = (6.72 + 1.92)·2 / (1344 + 384) = 10 ms; on 2 cores DanceGRPO's floor is 9.12 s, MixGRPO's 4.32 s."""
    cores = {"rollout_cores": 2, "learner_cores": 2, "load": (1.0, 1.0)}
    rows = {
        "dance_grpo": summarize([paper_rec(i, 10.0, image_evals=2400, trained=1344, forward_s=2.4,
                                           forward_backward_s=6.72) for i in range(3)], []) | cores | {"overlap": False},
        "mixgrpo": summarize([paper_rec(i, 6.0, image_evals=2400, trained=384, forward_s=2.4,
                                        forward_backward_s=1.92) for i in range(3)], []) | cores | {"overlap": False},
        "mixgrpo_flash_star async": summarize([paper_rec(i, 2.5, image_evals=768, trained=384, forward_s=9.0,
                                                         forward_backward_s=9.0) for i in range(3)], [])
        | cores | {"overlap": True},  # contended async timings are left out of the unit costs
    }
    costs = unit_costs(rows)
    assert (costs.eval_s, costs.train_s) == (pytest.approx(0.002), pytest.approx(0.010))
    out = with_floors(with_ratios(rows), cores=2)
    assert out["dance_grpo"]["floor_s"] == pytest.approx(9.12) and out["mixgrpo"]["floor_s"] == pytest.approx(4.32)
    assert out["mixgrpo"]["floor_ratio"] == pytest.approx(4.32 / 9.12)
    assert out["mixgrpo"]["over_floor"] == pytest.approx(6.0 / 4.32 - 1)  # +39 %: flagged
    assert out["mixgrpo_flash_star async"]["floor_s"] == pytest.approx(2.688)  # shared cores: the sync floor
    table = markdown_table(out)
    assert "| × dance_grpo | floor × | over floor | goal |" in table
    assert "| mixgrpo | 16.0 | 2400 | 4.0 | 6.00 | 0.60 ✗ | 0.47 | +39 % ⚠ | ≤ 0.45 (paper 0.52) |" in table
    assert "| dance_grpo | 16.0 | 2400 | 4.0 | 10.00 | 1.00 | 1.00 | +10 % | – |" in table  # 9.6 %: not flagged
    assert "| 0.25 ✗ | 0.29 | -7 % | ≤ 0.18 |" in table


def test_rollout_core_seconds_and_the_workers_imbalance_worked_example():
    """Two 1-thread workers whose forwards took 1.8 s and 1.2 s: 3.0 core-seconds of compute, the slowest 20 % over
    the mean (1.5 s). Records without the sum fall back to the slowest × all cores (3.6), an upper estimate."""
    row = {"forward_s": 1.8, "forward_sum_s": 3.0, "rollout_cores": 2, "rollout_threads": 1, "rollout_workers": 2}
    assert rollout_core_seconds(row) == pytest.approx(3.0)
    assert worker_imbalance(row) == pytest.approx(0.2)
    old = row | {"forward_sum_s": float("nan")}
    assert rollout_core_seconds(old) == pytest.approx(3.6) and math.isnan(worker_imbalance(old))
    rec = {**train_rec(1, 5.0, 0.5), "rollout_timings": {"sample_s": 2.0, "reward_wait_s": 0.3, "forward_s": 1.8,
                                                           "forward_sum_s": 3.0}}
    summary = summarize([train_rec(0, 9.0, 0.5), rec], []) | {k: v for k, v in row.items() if k.startswith("rollout")}
    assert summary["forward_sum_s"] == pytest.approx(3.0)
    assert "| 0.20 | 1.50 | +20 % |" in markdown_table(with_ratios({"mixgrpo": summary}))  # broadcast, rest, imbalance


def test_paper_mode_is_the_papers_shape_and_sweeps_the_window():
    from learner.algo import window_at
    from services.config import load_config

    starts, cfgs = {}, {}
    for label in PAPER_METHODS:
        preset, extra = VARIANTS[label]
        cfgs[label] = cfg = load_config([preset], [*common_overrides(PAPER_SHAPE, 0), *PAPER_OVERRIDES, *extra])
        assert (cfg.sampler.num_steps, cfg.grpo.group_size, cfg.rollout.batch_size, cfg.num_groups) == (25, 12, 96, 8)
        w = cfg.window
        starts[label] = [window_at(m, num_steps=25, size=w.size, shift_interval=w.shift_interval, stride=w.stride,
                                   strategy=w.strategy, start=w.start).start for m in range(PAPER_SHAPE["iterations"])]
    dance = cfgs["dance_grpo"]
    assert dance.window.size == 24 and trained_count(24, dance.grpo.train_fraction) == 14  # 14 of 25 steps
    assert starts["mixgrpo"] == starts["mixgrpo_flash"] == list(range(12))  # the reference's 300 iterations at τ = 25
    assert starts["mixgrpo_flash_star"] == [0] * 12


def overhead_rec(seconds=10.0):
    return {"kind": "train", "iteration_seconds": seconds, "update_s": 3.0, "forward_backward_s": 2.4,
            "optimizer_s": 0.1, "broadcast_s": 0.5,
            "rollout_timings": {"sample_s": 5.0, "reward_wait_s": 1.0, "rollout_s": 6.0, "encode_s": 0.1,
                                "forward_s": 4.2, "decode_s": 0.2}}


def test_phase_breakdown_worked_example():
    ph = phase_breakdown(overhead_rec())
    assert ph["rollout: model forward"] == pytest.approx(4.5)
    assert ph["rollout: sampler, other"] == pytest.approx(0.5)
    assert ph["learner: other"] == pytest.approx(0.5)
    assert ph["driver / Ray overhead"] == pytest.approx(10 - 6 - 3 - 0.5)
    parts = sum(v for k, v in ph.items() if k != "iteration")
    assert parts == pytest.approx(10.0)  # the phases add up to the iteration
    assert compute_share(ph) == pytest.approx((4.5 + 2.4 + 0.1) / 10)  # 70%


def test_median_breakdown_skips_warmup():
    recs = [overhead_rec(30.0), overhead_rec(10.0), overhead_rec(12.0), overhead_rec(11.0)]
    med = median_breakdown(recs, warmup=1)
    assert med["iteration"] == 11.0 and med["driver / Ray overhead"] == pytest.approx(1.5)


def test_cpu_utilisation_worked_example():
    """Two workers spent 5.4 and 6.0 CPU-s in a 6 s rollout on 2 cores: 11.4 / 12 = 95 %; a one-thread learner
    2.9 CPU-s in a 3 s update: 2.9 / 6 = 48 % (half the node idle)."""
    rec = overhead_rec() | {"update_cpu_s": 2.9}
    rec["rollout_timings"] = rec["rollout_timings"] | {"cpu_s": 11.4}
    util = cpu_utilisation([overhead_rec(), rec, rec], cores=2, warmup=1)
    assert util == {"rollout": pytest.approx(0.95), "update": pytest.approx(2.9 / 6)}
    assert cpu_utilisation([overhead_rec(), overhead_rec()], cores=2) == {}  # records from before the CPU times
    assert "| update | 48% |" in utilisation_markdown(util, 2)


def test_weight_sync_helpers():
    assert tensor_sizes(10, 3) == [4, 3, 3] and sum(tensor_sizes(10**9, 32)) == 10**9
    assert tensor_sizes(2, 4) == [1, 1]
    assert peak_bytes(10**9, 1, "object_store") == 20 * 10**9  # sender + store + worker (weights, copy, bytes)
    assert peak_bytes(10**9, 2, "collective") == 12 * 10**9
    # on GPUs: NCCL ranks each take a whole GPU (it refuses two ranks on one device); the object store shares them
    assert gpus_per_actor("collective", 2, "cuda", 4) == 1.0 and gpus_per_actor("object_store", 3, "cuda", 1) == 0.25
    assert gpus_per_actor("collective", 2, "cpu", 0) == 0.0
    assert fits(10**6, 1, "collective", 0.0, "cuda", "bf16", gpus=1) == "NCCL needs one GPU per rank: 2, 1 here"


def test_random_rewards_are_seeded_uniform_and_ignore_the_images():
    images = np.zeros((5, 32, 32, 3), np.uint8)
    a = random_rewards(["shapes_reward", "shapes_verifier"], seed=3)
    b = random_rewards(["shapes_reward", "shapes_verifier"], seed=3)
    first = [a.submit(n, images, ["a red circle"] * 5).result() for n in ("shapes_reward", "shapes_verifier")]
    again = [b.submit(n, images + 255, ["two blue squares"] * 5).result() for n in ("shapes_reward", "shapes_verifier")]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))  # the same stream, whatever the images
    assert not np.array_equal(first[0], first[1])  # independent draws per call
    assert all(x.dtype == np.float32 and x.shape == (5,) and (x >= 0).all() and (x < 1).all() for x in first)


def test_random_reward_control_is_reproducible():
    overrides = ["rollout.batch_size=8", "grpo.group_size=4", "learner.micro_batch_size=8", "run.iterations=2", "run.eval_prompts=4",
                 "run.eval_every=0", "sampler.num_steps=4", "window.size=2", "grpo.matching_times=3"]
    first = run_control(overrides, reward_seed=1, save=None)
    assert [n for n, _, _ in first] == [0, 2]
    assert run_control(overrides, reward_seed=1, save=None) == first


def test_real_architectures_have_the_real_sizes():
    import torch

    from benchmarks.real_arch import flux_dev_transformer, sd3_5_medium_transformer

    with torch.device("meta"):
        flux, sd3 = flux_dev_transformer(), sd3_5_medium_transformer()
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320  # the preflight's FLUX.1-dev count
    assert 2.2e9 < sum(p.numel() for p in sd3.parameters()) < 2.6e9  # SD3.5-Medium: 2.5 B
    assert len(sd3.transformer_blocks) == 24 and flux.config.num_single_layers == 38


@pytest.mark.parametrize("architecture", ["sd3_5_medium", "flux_dev"])
def test_architecture_mode_is_the_papers_per_gpu_shape_for_every_method(architecture, tmp_path):
    from services.config import load_config

    overrides = architecture_overrides(architecture, tmp_path / "model", tmp_path / "p.txt", "cpu")
    for label, (preset, extra) in VARIANTS.items():
        cfg = load_config([architecture, preset], ["rollout.batch_size=12", *overrides, *extra])
        assert (cfg.sampler.num_steps, cfg.grpo.group_size, cfg.rollout.batch_size) == (25, 12, 12), label
        assert [r.name for r in cfg.reward.rewards] == ["jpeg_incompressibility"]
        assert cfg.rollout.num_gpus == cfg.learner.num_gpus == 0 and cfg.model.device == "cpu"
        assert cfg.model.height == (720 if architecture == "flux_dev" else 512)
        if preset == "dance_grpo":
            assert cfg.grpo.train_fraction == 0.6
    for micro, accumulation in LEARNER_MICRO_BATCH.values():  # one optimizer step per group on either device
        assert micro * accumulation == 12


def test_sample_efficiency_gains_worked_example(tmp_path):
    from benchmarks.sample_efficiency import gain_rows, markdown, plot

    curves = {"awm": {1: [(0, 0.50, 0.0, 0), (10, 0.60, 60.0, 640)], 2: [(0, 0.50, 0.0, 0), (10, 0.54, 120.0, 640)]},
              "control": {1: [(0, 0.50, 0.0, 0), (10, 0.49, 90.0, 640)]}}
    awm, control = gain_rows(curves)
    assert awm["gain"] == pytest.approx(0.07) and awm["gain_sd"] == pytest.approx(math.sqrt(2 * 0.03**2))
    assert awm["images"] == 640 and awm["minutes"] == pytest.approx(1.5)
    assert awm["per_1000_images"] == pytest.approx(0.07 / 0.64) and awm["per_minute"] == pytest.approx(0.07 / 1.5)
    assert control["gain"] == pytest.approx(-0.01) and math.isnan(control["gain_sd"])
    assert "| awm | 2 | 0.500 → 0.570 | +0.070 ± 0.042 | +0.100 / +0.040 | 640 |" in markdown([awm, control])
    plot(curves, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    from benchmarks.sample_efficiency import images_per_iteration
    from services.config import load_config

    assert images_per_iteration(load_config(["g2rpo"], [])) == 192 * 2  # each child scored at both granularities
    assert images_per_iteration(load_config(["tempflow_grpo"], [])) == 180


def test_sample_efficiency_refuses_sets_that_include_the_in_run_set(capsys):
    """--first-set chooses fresh sets (a final table on sets not used to pick settings); the in-run set is never one."""
    from benchmarks.sample_efficiency import main

    with pytest.raises(SystemExit) as e:
        main(["--first-set", "1233", "--sets", "2", "--seeds", "1", "--iterations", "1"])
    assert e.value.code == 2 and "includes the in-run set (seed 1234)" in capsys.readouterr().err


def test_cfg_backward_times_both_ways_with_the_same_gradient(tmp_path, capsys):
    """benchmarks/cfg_backward.py: one real SD3.5-Medium block at a toy size; both rows present, the gradients agree."""
    from benchmarks.cfg_backward import main as cfg_backward

    out = tmp_path / "cfg.md"
    assert cfg_backward(["--layers", "1", "--size", "32", "--text", "4", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| one 2B batch, negative detached (reference) |" in text and "| negative without a graph, B rows (ours) |" in text
    difference = float(text.split("largest relative difference ")[1].split()[0])
    assert difference < 1e-4
