"""A short run on a local Ray with the default observers: the project's metrics on the node's Prometheus
endpoint (driver, learner, workers, scheduler), TensorBoard scalars and sample grids, PNG grids, the report."""

import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from learner.driver.loop import run_loop
from learner.outputs.observers import default_observers
from services.telemetry import run_tag
from tests.integration.conftest import own_reward_service
from tests.integration.test_trainer_ray import small_cfg, small_checkpoint  # noqa: F401
from tests.tb_events import read_events

pytestmark = pytest.mark.integration
WAIT_S = 60  # Ray exports every ~10 s; bounded so a missing metric fails instead of hanging

EXPECTED = {  # exported sample name → labels it must carry (besides run)
    "ray_mixgrpo_reward_mean": {"reward": "shapes_verifier"}, "ray_mixgrpo_reward_std": {"reward": "shapes_verifier"},
    "ray_mixgrpo_reward_weighted_mean": {}, "ray_mixgrpo_eval_verifier_score": {},
    "ray_mixgrpo_eval_verifier_strict": {}, "ray_mixgrpo_eval_category_score": {}, "ray_mixgrpo_window_start": {},
    "ray_mixgrpo_window_size": {}, "ray_mixgrpo_iteration_seconds": {},
    "ray_mixgrpo_phase_seconds": {"phase": "broadcast"}, "ray_mixgrpo_ratio": {"stat": "mean"},
    "ray_mixgrpo_clip_fraction": {}, "ray_mixgrpo_grad_norm": {}, "ray_mixgrpo_weight_version": {},
    "ray_mixgrpo_staleness": {}, "ray_mixgrpo_iterations_total": {},
    "ray_mixgrpo_learner_update_seconds": {}, "ray_mixgrpo_learner_samples_per_second": {},
    "ray_mixgrpo_rollout_images_per_second": {"worker": "1"}, "ray_mixgrpo_rollout_images_total": {"worker": "0"},
    "ray_mixgrpo_reward_latency_seconds_count": {"reward": "shapes_verifier"},
    "ray_mixgrpo_reward_requests_total": {"reward": "shapes_verifier"},
    "ray_mixgrpo_worker_weight_version": {}, "ray_mixgrpo_scheduler_window_start": {},
    "ray_mixgrpo_scheduler_iteration": {},
}


class Scraper:
    """Polls the Prometheus endpoint; keeps the latest value of every project sample of one run."""

    def __init__(self, url: str, run: str) -> None:
        self.url, self.run, self.seen, self.lock = url, run, {}, threading.Lock()

    def scrape(self) -> None:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        with self.lock:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name.startswith("ray_mixgrpo_") and s.labels.get("run") == self.run:
                        labels = {k: v for k, v in s.labels.items() if k in ("reward", "worker", "phase", "stat",
                                                                              "category", "le")}
                        self.seen[(s.name, tuple(sorted(labels.items())))] = s.value

    def value(self, name: str, **labels: str) -> float | None:
        with self.lock:
            hits = [v for (n, ls), v in self.seen.items() if n == name and labels.items() <= dict(ls).items()]
        return hits[0] if hits else None

    def complete(self) -> bool:
        """Every expected sample seen, and the run's final values (2 iterations) exported."""
        return (all(self.value(n, **ls) is not None for n, ls in EXPECTED.items())
                and self.value("ray_mixgrpo_weight_version") == 2
                and self.value("ray_mixgrpo_scheduler_iteration") == 1
                and self.value("ray_mixgrpo_learner_weight_version") == 2)


class WaitForMetrics:
    """First observer: its close() (before the actors are stopped) waits until the exports are seen."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def on_iteration(self, rec, samples=None) -> None: ...

    def on_eval(self, rec, images=None, prompts=None) -> None: ...

    def close(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.scraper.scrape()
            if self.scraper.complete():
                return
            time.sleep(1.0)


def test_short_run_is_observable(ray_cluster, small_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = small_cfg(small_checkpoint, out, "mixgrpo")
    run_id = run_tag(str(out), "run")  # what learner/main.py uses; the actors derive the same from the config
    node = ray_cluster.nodes()[0]
    scraper = Scraper(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", run_id)
    with own_reward_service(cfg.reward):
        run_loop(cfg, out, run_id, observers=[WaitForMetrics(scraper), *default_observers(out, run_id)])

    missing = [n for n, ls in EXPECTED.items() if scraper.value(n, **ls) is None]
    assert not missing, f"not exported within {WAIT_S} s: {missing}"
    v = scraper.value
    assert 0.0 <= v("ray_mixgrpo_reward_mean", reward="shapes_verifier") <= 1.0
    assert 0.0 <= v("ray_mixgrpo_eval_verifier_score") <= 1.0
    assert v("ray_mixgrpo_window_start") == 1 and v("ray_mixgrpo_scheduler_window_start") == 1  # progressive, τ = 1
    assert v("ray_mixgrpo_window_size") == 2 and v("ray_mixgrpo_iterations_total") == 2
    assert v("ray_mixgrpo_ratio", stat="mean") == pytest.approx(1.0, abs=1e-2) and v("ray_mixgrpo_staleness") == 0
    assert v("ray_mixgrpo_iteration_seconds") > 0 and v("ray_mixgrpo_phase_seconds", phase="update") > 0
    assert v("ray_mixgrpo_learner_samples_per_second") > 0
    assert v("ray_mixgrpo_rollout_images_per_second", worker="0") > 0
    assert v("ray_mixgrpo_reward_requests_total", reward="shapes_verifier", worker="0") >= 1
    assert v("ray_mixgrpo_reward_latency_seconds_count", reward="shapes_verifier", worker="1") >= 1

    scalars, images, texts = read_events(out / "tensorboard")
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2]
    assert [s for s, _ in scalars["eval/verifier_score"]] == [0, 2]
    assert [s for s, _ in images["samples/heldout"]] == [0, 2]  # before training and after the last iteration
    assert images["samples/heldout"][0][1].shape == (4 * 66, 4 * 66, 3)  # 4 eval prompts → 2×2 grid, ×4
    # `rollout.log_images` (4): each iteration's rollout images, their prompts and rewards
    assert [s for s, _ in images["samples/rollout"]] == [1, 2]
    assert images["samples/rollout"][0][1].shape == images["samples/heldout"][0][1].shape  # 4 images, 2×2
    caption = texts["samples/rollout_prompts"][0][1]
    assert caption.splitlines()[0] == "| cell | prompt | shapes_verifier |" and caption.count("| (") == 4
    assert all((out / "samples" / f"{name}.{ext}").is_file() for name in ("iter_base", "iter_000001")
               for ext in ("png", "json"))
    report = (out / "report.md").read_text()
    assert "(report/samples.png)" in report and (out / "report" / "samples.png").stat().st_size > 0
