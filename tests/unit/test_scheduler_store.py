"""WindowScheduler and its state stores (memory, file, a real Redis): state survives a restart, and the store
follows the checkpoint a run resumes from (`restore`), whichever store holds it."""

import inspect
from contextlib import nullcontext

import pytest

from learner.algo import Window, window_at
from services.config import WindowConfig
from services.scheduler import WindowScheduler
from services.state_store import FileStore, MemoryStore, open_store
from tests.redis_server import redis_server

WINDOW = WindowConfig(size=4, shift_interval=3, stride=1)


def scheduler(store="memory", namespace="default", window=WINDOW):
    return WindowScheduler(window, num_steps=16, seed=0, store_url=store, namespace=namespace)


def test_advance_follows_window_at_and_never_goes_back():
    s = scheduler()
    assert s.current() == (-1, None)
    assert [s.advance(m).start for m in range(0, 10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert s.current() == (9, Window(3, 4))
    with pytest.raises(ValueError, match="cannot go back"):
        s.advance(4)


def test_window_config_is_the_one_declaration_of_window_at_parameters():
    # the config section is passed to window_at as it is: its fields are exactly window_at's keyword
    # parameters besides the sampler's step count and the run seed
    params = set(inspect.signature(window_at).parameters) - {"iteration", "num_steps", "seed"}
    assert set(WindowConfig.model_fields) == params
    cfg = WindowConfig(strategy="exp_decay", size=3, shift_interval=5, stride=2, decay_rate=0.5, decay_threshold=2)
    s = WindowScheduler(cfg, num_steps=25, seed=7)
    assert [s.window(m) for m in range(40)] == [
        window_at(m, num_steps=25, size=3, shift_interval=5, stride=2, strategy="exp_decay", seed=7,
                  decay_rate=0.5, decay_threshold=2) for m in range(40)]


def test_file_store_restores_a_restarted_scheduler(tmp_path):
    url = f"file://{tmp_path}"
    s = scheduler(url, "run-a")
    s.advance(7)
    again = scheduler(url, "run-a")  # a restarted actor re-runs __init__
    assert again.current() == (7, Window(2, 4))
    assert scheduler(url, "run-b").current() == (-1, None)  # namespaces are separate


def test_restart_with_a_different_schedule_is_refused(tmp_path):
    url = f"file://{tmp_path}"
    scheduler(url, "run").advance(3)
    with pytest.raises(ValueError, match="another window schedule"):
        scheduler(url, "run", WindowConfig(size=6, shift_interval=3, stride=1))
    with pytest.raises(ValueError, match="another window schedule"):
        WindowScheduler(WINDOW, num_steps=20, seed=0, store_url=url, namespace="run")


@pytest.mark.parametrize("store", ["file", "redis"])
def test_restore_puts_a_persistent_store_back_at_the_checkpoint(tmp_path, store):
    """A run crashed at iteration 30 with its last checkpoint at 25: the resumed run's scheduler (a new actor)
    reads 30 from the store, is put back at 25 and advances through 26… with the same windows as before."""
    with redis_server(tmp_path) if store == "redis" else nullcontext(f"file://{tmp_path}") as url:
        first = scheduler(url, "run")
        windows = [first.advance(m) for m in range(31)]
        resumed = scheduler(url, "run")
        assert resumed.current() == (30, windows[30])
        with pytest.raises(ValueError, match="cannot go back"):
            resumed.advance(26)
        assert resumed.restore(25) == windows[25]
        assert [resumed.advance(m) for m in range(26, 31)] == windows[26:31]
        assert scheduler(url, "run").current() == (30, windows[30])  # persisted
        assert resumed.restore(-1) is None  # a fresh start in the same namespace
        assert scheduler(url, "run").current() == (-1, None)
        with pytest.raises(ValueError, match=">= -1"):
            resumed.restore(-2)


def test_corrupted_state_file_is_an_error(tmp_path):
    store = FileStore(tmp_path, "run")
    store.put("k", {"a": 1})
    (tmp_path / "run" / "k.json").write_text("{trunc")
    with pytest.raises(ValueError, match="corrupted"):
        store.get("k")


def test_redis_store_restores_a_restarted_scheduler(tmp_path):
    with redis_server(tmp_path) as url:
        s = scheduler(url, "run-r")
        s.advance(11)
        assert scheduler(url, "run-r").current() == (11, Window(3, 4))


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory"), MemoryStore)
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("s3://bucket")
    with pytest.raises(ConnectionError, match="cannot reach the Redis state store"):
        open_store("redis://127.0.0.1:1/0")
