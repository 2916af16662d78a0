"""A learner killed with SIGKILL mid-run: the driver starts it again from the last checkpoint, replays the iterations
since then, and the run ends with the records and weights of an uninterrupted run. (The refusals past
learner.max_restarts and with collective sync: tests/unit/test_recovery.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from learner.driver.loop import run_loop
from tests.integration.conftest import shared_reward_service
from tests.integration.test_faults import assert_same_training, reference_run
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint, train_records  # noqa: F401

pytestmark = pytest.mark.integration


def learner_pids() -> list[int]:
    """Processes of live learner actors (Ray titles them `ray::LearnerActor…`)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::LearnerActor"):
            out.append(p.pid)
    return out


def kill_learner_after(metrics: Path, iteration: int, stop: threading.Event, delay_s: float = 0.0) -> threading.Thread:
    """In the background: once the train record of `iteration` is written, SIGKILL the learner's process."""

    def run():
        while not stop.wait(0.05):
            if metrics.exists() and any(json.loads(line).get("iteration", -1) >= iteration and
                                        json.loads(line)["kind"] == "train" for line in metrics.read_text().splitlines()):
                time.sleep(delay_s)
                for pid in learner_pids()[:1]:  # one process: a rank of a group takes the group down with it
                    os.kill(pid, signal.SIGKILL)
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_learner_killed_mid_run_restarts_from_its_checkpoint_and_replays(ray_cluster, small_checkpoint, tmp_path,  # noqa: F811
                                                                          capsys, ranks):
    """With 2 ranks (data parallel), one rank's process is killed: both are replaced and the group formed again."""
    cfg = small_cfg(small_checkpoint, tmp_path, "mixgrpo", "run.iterations=5", "learner.checkpoint_every=2",
                    f"learner.num_workers={ranks}", f"learner.gradient_accumulation_steps={ranks}",
                    f"learner.micro_batch_size={8 // ranks}")
    stop = threading.Event()
    with shared_reward_service(cfg.reward):
        killer = kill_learner_after(tmp_path / "metrics.jsonl", 2, stop)
        try:
            run_loop(cfg, tmp_path, "t-learner-fault")
        finally:
            stop.set()
            killer.join(5)
    printed = capsys.readouterr().out
    assert "learner: lost at iteration" in printed and "restored iter_000001" in printed, printed
    recs = train_records(tmp_path)
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3, 4]  # each once: the replayed records replace the lost ones
    assert recs[-1]["learner_restarts"] == 1 and recs[0]["learner_restarts"] == 0
    assert recs[-1]["replayed_iterations"] >= 1  # iteration 2 (at least) ran twice
    assert [r["weight_version"] for r in recs] == [1, 2, 3, 4, 5]
    assert_same_training(recs, *reference_run(cfg), tmp_path / "checkpoints" / "iter_000004")
