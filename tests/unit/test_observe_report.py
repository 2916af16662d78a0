"""Sample grids, the TensorBoard observer (scalars, images, prompts) and the run report, from fixtures."""

import json

import numpy as np
import pytest

from learner.outputs import grids as samples
from learner.outputs import observers as observe
from learner.outputs import report
from tests.tb_events import read_events

CATS = ("single", "counting", "spatial")


def train_rec(m: int) -> dict:
    return {"kind": "train", "iteration": m, "window_start": m // 2, "window_size": 4, "reward_mean": 0.3 + 0.05 * m,
            "reward_mean/shapes_reward": 0.3 + 0.05 * m, "reward_std/shapes_reward": 0.1, "loss": -0.01,
            "ratio_mean": 1.0, "ratio_min": 0.99, "ratio_max": 1.01, "clip_frac": 0.1, "grad_norm": 0.5,
            "weight_version": m + 1, "staleness": 0, "update_s": 1.0, "broadcast_s": 0.1,
            "rollout_timings": {"sample_s": 2.0, "reward_wait_s": 0.4, "rollout_s": 2.4},
            "iteration_seconds": 4.0 + m, "trained_steps": [0, 1], "first_ratio_dev": "nan"}


def eval_rec(m: int, score: float, run_dir) -> dict:
    rng = np.random.default_rng(m + 5)
    images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    prompts = [f"prompt {i}" for i in range(16)]
    path = samples.save_grid(run_dir, m, images, prompts, [score] * 16)
    return {"kind": "eval", "iteration": m, "eval_verifier_score": score, "eval_verifier_strict": score / 2,
            **{f"eval_{c}_score": score for c in CATS}, "samples": path}


@pytest.fixture
def run_dir(tmp_path):
    recs = [eval_rec(-1, 0.40, tmp_path)]
    for m in range(6):
        recs.append(train_rec(m))
        if m in (2, 5):
            recs.append(eval_rec(m, 0.40 + 0.05 * m, tmp_path))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "config.json").write_text(json.dumps({"run": {"method": "mixgrpo", "iterations": 6, "seed": 0},
                                                      "model": {"backend": "tiny"}, "sampler": {"num_steps": 16},
                                                      "window": {"strategy": "progressive", "size": 4,
                                                                 "shift_interval": 2}}))
    return tmp_path


def test_grid_layout_and_round_trip(tmp_path):
    images = np.stack([np.full((32, 32, 3), i * 20, np.uint8) for i in range(6)])
    grid = samples.make_grid(images, cols=3)
    assert grid.shape == (2 * 34 - 2, 3 * 34 - 2, 3)
    assert (grid[34:66, 68:100] == 100).all() and (grid[32:34] == samples.PAD_VALUE).all()  # cell (1, 2) = image 5
    rel = samples.save_grid(tmp_path, 7, images, [f"p{i}" for i in range(6)], [0.5] * 6)
    assert rel == "samples/iter_000007.png"
    png, meta = samples.load_grid(tmp_path / rel)
    assert png.shape == (grid.shape[0] * 4, grid.shape[1] * 4, 3)  # 32 px cells are upscaled ×4
    assert meta["prompts"][5] == "p5" and meta["cols"] == 3 and meta["iteration"] == 7
    samples.save_grid(tmp_path, -1, images, ["p"] * 6)
    assert [p.name for p in samples.list_grids(tmp_path)] == ["iter_base.png", "iter_000007.png"]
    with pytest.raises(ValueError, match="one prompt per image"):
        samples.save_grid(tmp_path, 1, images, ["p"])


def test_scalar_tags_group_the_record():
    tags = observe.scalars(train_rec(3))
    assert tags["reward/mean"] == pytest.approx(0.45) and "reward/mean/shapes_reward" in tags
    assert tags["window/start"] == 1 and tags["time/sample_s"] == 2.0 and tags["time/iteration_seconds"] == 7.0
    assert tags["update/ratio_max"] == 1.01 and tags["train/weight_version"] == 4
    assert not any("trained_steps" in t or "first_ratio" in t for t in tags)  # lists and "nan" text skipped
    ev = observe.scalars({"kind": "eval", "iteration": -1, "eval_verifier_score": 0.4, "samples": "x.png"})
    assert ev == {"eval/verifier_score": 0.4}


@pytest.mark.parametrize("writer", ["tensorboardX", "torch"])
def test_tensorboard_observer_writes_scalars_grids_and_prompts(run_dir, writer):
    if writer == "torch":
        pytest.importorskip("tensorboard")
    obs = observe.TensorBoardObserver(run_dir, writer=writer)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        (obs.on_eval if rec["kind"] == "eval" else obs.on_iteration)(rec)
    arrays = np.zeros((4, 32, 32, 3), np.uint8)
    obs.on_eval({"kind": "eval", "iteration": 9, "eval_verifier_score": 0.9}, arrays, ["a", "b", "c", "d"])
    obs.close()
    scalars, images, texts = read_events(run_dir / "tensorboard")
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2, 3, 4, 5, 6]
    assert scalars["eval/verifier_score"] == [(0, pytest.approx(0.4)), (3, pytest.approx(0.5)), (6, pytest.approx(0.65)),
                                              (10, pytest.approx(0.9))]
    assert "time/reward_wait_s" in scalars and "update/clip_frac" in scalars and "window/start" in scalars
    steps = [s for s, _ in images["samples/heldout"]]
    assert steps == [0, 3, 6, 10]
    first = images["samples/heldout"][0][1]
    assert first.shape == samples.load_grid(run_dir / "samples/iter_base.png")[0].shape
    assert images["samples/heldout"][-1][1].shape == (4 * 66, 4 * 66, 3)  # 2×2 grid from arrays, ×4
    assert "prompt 15" in texts["samples/prompts"][0][1] and "0.40" in texts["samples/prompts"][0][1]


@pytest.mark.parametrize("writer", ["tensorboardX", "torch"])
def test_a_rewound_run_has_one_value_per_step_in_tensorboard(tmp_path, writer):
    """A resume (or a learner's replay) rewrites the iterations after its checkpoint: TensorBoard (its own event
    loader) shows each step once, the replayed value, not both runs' side by side."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    obs = observe.TensorBoardObserver(tmp_path, writer=writer)
    for m in range(4):
        obs.on_iteration(train_rec(m))  # reward/mean 0.30 0.35 0.40 0.45 at steps 1-4
    obs.close()
    resumed = observe.TensorBoardObserver(tmp_path, writer=writer)  # a new driver process
    observe.rewind([resumed, object()], 1)  # the checkpoint is iteration 1's; hooks are optional
    for m in (2, 3):
        resumed.on_iteration({**train_rec(m), "reward_mean": 0.9 + m})
    resumed.close()
    acc = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, round(e.value, 3)) for e in acc.Scalars("reward/mean")]
    assert got == [(1, 0.3), (2, 0.35), (3, 2.9), (4, 3.9)]


def test_report_renders_plots_and_summary(run_dir):
    path = report.write_report(run_dir)
    text = path.read_text()
    for name in ("rewards", "window", "time", "samples"):
        png = run_dir / "report" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000
        assert f"(report/{name}.png)" in text
    assert "| held-out verifier score | 0.400 | 0.650 | +0.250 |" in text
    assert "| iterations | | 6 | |" in text and "| median s/iteration | | 6.50 | |" in text
    assert "| (3,3) | prompt 15 | 0.400 | 0.650 |" in text
    assert "method **mixgrpo**" in text


def test_the_report_names_the_window_schedule_its_strategy_reads_and_the_rollout_nfe(run_dir):
    from services.config import load_config

    def window(*overrides):
        return report.window_text(load_config(["mixgrpo"], list(overrides)).model_dump(mode="json")["window"])

    assert window() == "progressive (size 4, from step 0, 1 step(s) every 8 iterations)"  # τ 8 on the tiny model
    assert window("window.strategy=frozen", "window.start=3") == "frozen at steps [3, 7)"  # no "shift every 8"
    assert window("window.stride=0") == "frozen at steps [0, 4)"
    assert window("window.strategy=random") == "random (size 4, a fresh uniform start every iteration)"
    assert window("window.strategy=linear_decay", "window.shift_interval_min=5").startswith(
        "linear_decay (size 4, from step 0, 1 step(s) every 8 → 5 iterations")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flash = [{**r, "nfe": 10 - r["iteration"]} if r["kind"] == "train" else r for r in recs]  # Flash: NFE falls
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flash))
    assert "| rollout NFE per image (first → last iteration) | | 10 → 5 | |" in report.write_report(run_dir).read_text()


def test_the_method_label_names_the_matching_term_when_it_is_on(run_dir):
    from learner.outputs.metrics import method_label
    from services.config import load_config

    assert method_label({"run": {"method": "mixgrpo"}, "grpo": {"matching_aux": 0.0}}) == "mixgrpo"
    default = load_config(["tiny_cpu"], []).model_dump(mode="json")  # the embedded default adds the term
    assert method_label(default) == "mixgrpo + AWM's matching term (grpo.matching_aux=1)"
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**cfg, "grpo": {"matching_aux": 0.5}}))
    assert "method **mixgrpo + AWM's matching term (grpo.matching_aux=0.5)**" in report.write_report(run_dir).read_text()


def test_report_cli_and_observer_errors(tmp_path, capsys):
    from learner.tools import report as report_cli

    assert report_cli.main([str(tmp_path)]) == 2
    observe.ReportObserver(tmp_path).close()  # no metrics.jsonl: reported, not raised
    assert "report: not written" in capsys.readouterr().err


def test_report_with_only_the_base_evaluation(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(eval_rec(-1, 0.3, tmp_path)) + "\n")
    text = report.write_report(tmp_path).read_text()
    assert "| held-out verifier score | 0.300 | – | – |" in text and "time.png" not in text


def test_the_progress_line_shows_a_ratio_only_where_there_is_one(capsys):
    """With ε ≈ 1e-4 the ratio's range printed to four decimals read [1.0000,1.0000]; AWM and DiffusionNFT have no ratio
    and printed a made-up one (1, clip 0)."""
    from learner.outputs.metrics import Progress, ratio_text

    grpo = {"objective": "grpo", "ratio_min": 0.9999434947967529, "ratio_max": 1.0000975131988525, "clip_frac": 0.0}
    assert ratio_text(grpo) == "ratio-1=[-5.7e-05,+9.8e-05] clip=0.00 "
    assert ratio_text({**grpo, "objective": "awm"}) == ratio_text({**grpo, "objective": "nft"}) == ""
    Progress(3).report({**grpo, "objective": "awm", "iteration": 0, "window_start": 0, "window_size": 2,
                        "reward_mean": 0.5, "grad_norm": 0.1, "iteration_seconds": 2.0})
    line = capsys.readouterr().out
    assert line.startswith("[iter    1/3] window=[0,2) reward=0.500") and "ratio" not in line and "clip" not in line
