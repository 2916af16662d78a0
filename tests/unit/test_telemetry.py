"""Ray metric definitions and the record → metric translations (no Ray: Telemetry disabled)."""

from concurrent.futures import Future

import pytest

from reward_servers.client import TimedRewards
from services import telemetry as t

TRAIN = {
    "kind": "train", "iteration": 4, "window_start": 2, "window_size": 4, "reward_mean": 0.6,
    "reward_mean/shapes_reward": 0.55, "reward_std/shapes_reward": 0.1, "reward_mean/shapes_verifier": 0.65,
    "reward_std/shapes_verifier": 0.2, "loss": -0.01, "ratio_mean": 1.0, "ratio_min": 0.999, "ratio_max": 1.001,
    "clip_frac": 0.25, "approx_kl": 1e-6, "grad_norm": 0.3, "weight_version": 5, "staleness": 0,
    "rollout_timings": {"sample_s": 2.0, "reward_wait_s": 0.5, "rollout_s": 2.5}, "update_s": 1.5,
    "broadcast_s": 0.2, "iteration_seconds": 5.0, "loss_per_step": [0.1, 0.2], "first_ratio_dev": "nan",
}


def as_dict(updates):
    return {(n, tuple(sorted(tags.items()))): v for n, v, tags in updates}


def test_every_metric_name_is_prometheus_safe_and_tagged_consistently():
    for name, spec in t.METRICS.items():
        assert t.PROMETHEUS_NAME.match(name) and name.startswith("mixgrpo_")
        assert "run" not in spec.tags  # added to every metric by Telemetry
    assert t.exported_name("mixgrpo_reward_requests") == "ray_mixgrpo_reward_requests_total"
    assert t.exported_name("mixgrpo_window_start") == "ray_mixgrpo_window_start"


def test_train_record_to_driver_gauges():
    got = as_dict(t.train_updates(TRAIN))
    assert got[("mixgrpo_reward_mean", (("reward", "shapes_reward"),))] == 0.55
    assert got[("mixgrpo_reward_std", (("reward", "shapes_verifier"),))] == 0.2
    assert got[("mixgrpo_reward_weighted_mean", ())] == 0.6
    assert got[("mixgrpo_window_start", ())] == 2 and got[("mixgrpo_window_size", ())] == 4
    phases = {dict(k[1])["phase"]: v for k, v in got.items() if k[0] == "mixgrpo_phase_seconds"}
    assert phases == pytest.approx({"rollout_sample": 2.0, "reward_wait": 0.5, "update": 1.5, "broadcast": 0.2,
                                    "other": 0.8})
    assert got[("mixgrpo_ratio", (("stat", "max"),))] == 1.001
    assert got[("mixgrpo_clip_fraction", ())] == 0.25 and got[("mixgrpo_iterations", ())] == 1.0
    assert got[("mixgrpo_weight_version", ())] == 5 and got[("mixgrpo_staleness", ())] == 0
    for name, _, tags in t.train_updates(TRAIN):  # every update names a defined metric with its tags
        assert set(tags) == set(t.METRICS[name].tags)


def test_missing_and_non_finite_fields_are_skipped():
    got = as_dict(t.train_updates({"iteration": 0, "grad_norm": float("nan"), "loss": "nan"}))
    assert ("mixgrpo_grad_norm", ()) not in got and ("mixgrpo_loss", ()) not in got
    assert got[("mixgrpo_iteration", ())] == 0


def test_eval_record_to_gauges():
    rec = {"kind": "eval", "iteration": -1, "eval_verifier_score": 0.4, "eval_verifier_strict": 0.1,
           "eval_single_score": 0.9, "eval_spatial_score": 0.2}
    got = as_dict(t.eval_updates(rec))
    assert got == {("mixgrpo_eval_verifier_score", ()): 0.4, ("mixgrpo_eval_verifier_strict", ()): 0.1,
                   ("mixgrpo_eval_category_score", (("category", "single"),)): 0.9,
                   ("mixgrpo_eval_category_score", (("category", "spatial"),)): 0.2}


def test_eval_record_of_a_real_model_reports_its_rewards():
    rec = {"kind": "eval", "iteration": 4, "eval_columns": ["pickscore", "clip_score"], "eval_pickscore": 0.22,
           "eval_clip_score": 0.31, "eval_num_prompts": 50}
    assert as_dict(t.eval_updates(rec)) == {("mixgrpo_eval_reward", (("reward", "pickscore"),)): 0.22,
                                            ("mixgrpo_eval_reward", (("reward", "clip_score"),)): 0.31}


def test_actor_side_updates():
    w = as_dict(t.rollout_updates({"sample_s": 1.5, "reward_wait_s": 0.5, "rollout_s": 2.0}, 32, 3, "1"))
    assert w[("mixgrpo_rollout_images_per_second", (("worker", "1"),))] == 16.0
    assert w[("mixgrpo_worker_weight_version", (("worker", "1"),))] == 3
    learner = as_dict(t.learner_updates({"update_s": 2.0, "weight_version": 7}, rows=64))
    assert learner[("mixgrpo_learner_samples_per_second", ())] == 32.0
    sched = as_dict(t.scheduler_updates(9, (3, 4)))
    assert sched[("mixgrpo_scheduler_window_start", ())] == 3


def test_reward_counters_become_increments():
    before = {"requests": 4, "a/requests": 4, "a/retries": 1}
    after = {"requests": 7, "a/requests": 6, "a/retries": 1, "a/failures": 1, "b/requests": 1, "a/images": 99}
    got = as_dict(t.reward_counter_updates(before, after, "0"))
    assert got == {("mixgrpo_reward_requests", (("reward", "a"), ("worker", "0"))): 2.0,
                   ("mixgrpo_reward_failures", (("reward", "a"), ("worker", "0"))): 1.0,
                   ("mixgrpo_reward_requests", (("reward", "b"), ("worker", "0"))): 1.0}


def test_telemetry_checks_names_kinds_and_tags_even_when_disabled():
    tel = t.Telemetry("run", enabled=False)
    tel.record(t.train_updates(TRAIN))
    with pytest.raises(KeyError, match="unknown metric"):
        tel.set("mixgrpo_nope", 1.0)
    with pytest.raises(TypeError, match="is a counter"):
        tel.set("mixgrpo_iterations", 1.0)
    with pytest.raises(ValueError, match="takes tags"):
        tel.set("mixgrpo_reward_mean", 1.0)
    with pytest.raises(ValueError, match="< 0"):
        tel.inc("mixgrpo_iterations", -1.0)


class RecordingTelemetry(t.Telemetry):
    def __init__(self):
        super().__init__("run", enabled=False)
        self.seen = []

    def observe(self, name, value, **tags):
        super().observe(name, value, **tags)
        self.seen.append((name, value, tags))


class Sink:
    def __init__(self):
        self.futures = []

    def submit(self, name, images, prompts):
        self.futures.append(Future())
        return self.futures[-1]


def test_timed_rewards_observes_latency_of_successful_requests_only():
    tel, sink = RecordingTelemetry(), Sink()
    timed = TimedRewards(sink, tel, "2")
    ok, bad = timed.submit("a", None, []), timed.submit("b", None, [])
    sink.futures[0].set_result([1.0])
    sink.futures[1].set_exception(RuntimeError("reward failed"))
    assert ok.result() == [1.0] and bad.exception() is not None
    assert [(n, tags) for n, _, tags in tel.seen] == [("mixgrpo_reward_latency_seconds", {"reward": "a", "worker": "2"})]
    assert tel.seen[0][1] >= 0.0


def test_run_tag_is_the_sanitised_directory_name(tmp_path):
    assert t.run_tag(str(tmp_path / "shapes tiny@1"), "x") == "shapes-tiny-1"
    assert t.run_tag(None, "shapes-tiny") == "shapes-tiny"


def test_grafana_dashboard_shows_every_metric_and_only_defined_ones():
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mixgrpo_dashboard.json"
    dash = json.loads(path.read_text())
    exprs = [tg["expr"] for p in dash["panels"] for tg in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"ray_mixgrpo_\w+", e)}
    exported = {t.exported_name(n) for n in t.METRICS}
    assert used == exported, (sorted(used - exported), sorted(exported - used))
    assert all('run=~"$run"' in e for e in exprs)  # every panel follows the run selector
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run"}


class FakeGauge:
    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append((value, tags))


def test_gauges_are_set_again_until_close():
    """Ray drops a gauge not set for ~20 s; Telemetry re-sets its last values (here every 10 ms)."""
    import time

    tel = t.Telemetry("r", enabled=True, refresh_s=0.01)
    fake = tel._metrics["mixgrpo_reward_mean"] = FakeGauge()  # stands in for ray.util.metrics.Gauge
    tel.set("mixgrpo_reward_mean", 0.5, reward="a")
    time.sleep(0.2)
    assert len(fake.calls) >= 3 and set(fake.calls[-1][1].items()) == {("reward", "a")}
    assert {v for v, _ in fake.calls} == {0.5}
    tel.close()
    time.sleep(0.05)
    n = len(fake.calls)
    time.sleep(0.1)
    assert len(fake.calls) == n
