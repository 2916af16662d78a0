"""What `--resume` may change, checked before Ray starts (learner/driver/resume.py, learner/main.py:resolve)."""

from __future__ import annotations

import json

import pytest
import torch

from learner.driver.resume import check_resume, resume_changes
from learner.training import save_checkpoint
from services.config import ConfigError, dump_config, load_config


def a_run(tmp_path, iterations=4, checkpoints=(1,)):
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config([], [f"run.output_dir={out}", f"run.iterations={iterations}"])
    dump_config(cfg, out / "config.json")
    for i in checkpoints:
        save_checkpoint(out / "checkpoints", i, {"w": torch.ones(3) * i}, {"state": {}}, {"version": i + 1})
    return out, cfg


def resolve(argv):
    from learner.main import parse_args, resolve

    return resolve(parse_args(argv))


def test_an_override_that_changes_the_training_is_refused_on_resume(tmp_path):
    """learner.lr on --resume was overwritten by the optimizer state it restores, while config.json recorded the new
    lr for the whole run; grpo.group_size and run.seed changed the run mid-way with nothing said."""
    out, _ = a_run(tmp_path)
    with pytest.raises(ConfigError, match=r"^--resume .*: a resumed run continues the same training, so these "
                                          r"overrides are refused: grpo\.group_size: 8 → 4; learner\.lr: 3e-05 → "
                                          r"0\.001; run\.seed: 0 → 7\. On --resume change only"):
        resolve(["--resume", str(out), "run.seed=7", "learner.lr=0.001", "grpo.group_size=4"])
    with pytest.raises(ConfigError, match=r"reward\.rewards\.0\.weight: 1\.0 → 2\.0"):
        resolve(["--resume", str(out), "reward.rewards.0.weight=2.0"])
    # how the run is carried out may change: length, cadence, resources, threads, ranks, where rewards are served
    cfg, _, resuming = resolve(["--resume", str(out), "run.iterations=6", "learner.num_threads=2", "cluster.num_cpus=4",
                                "reward.rewards.0.num_replicas=2",
                                "reward.server.port=8123", "run.eval_every=5"])
    assert resuming and cfg.run.iterations == 6 and cfg.reward.rewards[0].num_replicas == 2


def test_resume_refuses_a_missing_altered_or_finished_checkpoint_before_ray(tmp_path):
    out, saved = a_run(tmp_path, checkpoints=())
    with pytest.raises(ConfigError, match=r"no checkpoint in .*checkpoints \(the run stopped before its first, every "
                                          r"learner\.checkpoint_every=\d+ iterations\)"):
        check_resume(out, saved, saved)
    save_checkpoint(out / "checkpoints", 1, {"w": torch.ones(3)}, {"state": {}}, {"version": 2})
    assert check_resume(out, saved, saved)["iteration"] == 1
    weights = out / "checkpoints" / "iter_000001" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated
    with pytest.raises(ConfigError, match=r"weights\.safetensors does not match its recorded sha256 .*move that "
                                          r"folder aside to resume from the one before it"):
        check_resume(out, saved, saved)
    save_checkpoint(out / "checkpoints", 3, {"w": torch.ones(3)}, {"state": {}}, {"version": 4})
    with pytest.raises(ConfigError, match=r"iter_000003 is the end of the run \(4 of run\.iterations=4\); pass "
                                          r"run\.iterations=N \(N > 4\)"):
        check_resume(out, saved, saved)
    more = saved.model_copy(update={"run": saved.run.model_copy(update={"iterations": 5})})
    assert check_resume(out, saved, more)["iteration"] == 3
    assert resume_changes(saved, more) == []


def test_a_record_cut_short_by_a_kill_is_left_out_and_damage_before_it_is_named(tmp_path, capsys):
    """A process killed mid-write leaves a torn last line in metrics.jsonl: --resume (and the report) go on without
    it, and the resumed run's truncation drops it; a line that does not parse before the last is refused before Ray
    starts, naming the file and line."""
    from learner.outputs.metrics import MetricsLog

    out, saved = a_run(tmp_path)
    log = MetricsLog(out / "metrics.jsonl")
    for m in range(3):
        log.write({"kind": "train", "iteration": m})
    with open(log.path, "a") as f:
        f.write('{"time": 1, "kind": "tr')  # killed here
    assert [r["iteration"] for r in log.records()] == [0, 1, 2]
    assert "its last line (line 4) is a record cut short, left out" in capsys.readouterr().err
    assert check_resume(out, saved, saved)["iteration"] == 1
    log.truncate_after(1)
    capsys.readouterr()
    log.write({"kind": "train", "iteration": 2})  # the resumed run's record, on a line of its own
    assert [r["iteration"] for r in log.records()] == [0, 1, 2] and capsys.readouterr().err == ""
    log.path.write_text(log.path.read_text().replace('"iteration": 1', '"iteration": 1,,'))
    with pytest.raises(ConfigError, match=r"^--resume .*: .*metrics\.jsonl: line 2 is not a JSON record .*damaged"):
        check_resume(out, saved, saved)


def test_a_new_run_never_appends_to_another_runs_records(tmp_path):
    """A folder holding an interrupted run's metrics.jsonl (no checkpoint yet) was accepted, and the new run's
    records were appended after the old ones (the report counted both)."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "iteration": -1}) + "\n")
    with pytest.raises(ConfigError, match=r"already holds a run's records \(metrics\.jsonl\) and no checkpoint"):
        resolve([f"run.output_dir={out}"])
    (out / "metrics.jsonl").write_text("")
    assert resolve([f"run.output_dir={out}"])[1] == out  # an empty file: nothing would be mixed


def test_async_overlaps_every_iteration_except_one_that_ends_with_a_checkpoint():
    """After a checkpointed iteration the next rollout samples with the checkpoint's weights, which is all a resumed
    run (or a learner replaying from that checkpoint) has: so async runs resume exactly."""
    from learner.driver.build import checkpoints_after, rollout_overlaps_update

    def pattern(*overrides):
        cfg = load_config([], ["run.iterations=6", *overrides])
        return [rollout_overlaps_update(cfg, m) for m in range(6)], [checkpoints_after(cfg, m) for m in range(6)]

    T, F = True, False
    assert pattern("run.async_rollout=true", "learner.checkpoint_every=2") == ([T, F, T, F, T, F], [F, T, F, T, F, T])
    assert pattern("run.async_rollout=true", "learner.checkpoint_every=0") == ([T, T, T, T, T, F], [F] * 5 + [T])
    assert pattern("learner.checkpoint_every=2")[0] == [F] * 6  # sync: never


def test_export_refuses_an_altered_checkpoint_in_one_line(tmp_path, capsys):
    """It printed a traceback (eval answered with one line)."""
    from learner.tools import export

    out, _ = a_run(tmp_path)
    (out / "checkpoints" / "iter_000001" / "state.json").write_text("{not json")
    assert export.main(["--run", str(out), "--out", str(tmp_path / "exported")]) == 2
    assert "error: checkpoint " in capsys.readouterr().err and not (tmp_path / "exported").exists()


def test_an_interrupted_run_says_how_to_go_on(tmp_path):
    """Ctrl-C ended in a KeyboardInterrupt traceback with no word about --resume."""
    from learner.main import resume_hint

    out, _ = a_run(tmp_path, checkpoints=(0, 4))
    assert resume_hint(out) == f"python learner/main.py --resume {out} continues from iter_000004."
    (tmp_path / "b").mkdir()
    fresh, _ = a_run(tmp_path / "b", checkpoints=())
    assert "No checkpoint was written yet" in resume_hint(fresh) and str(fresh) in resume_hint(fresh)
