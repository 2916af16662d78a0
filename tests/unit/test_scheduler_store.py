"""WindowScheduler and its state stores (memory, file, a real Redis): state survives a restart."""

import pytest

from learner.algo import Window
from services.scheduler import WindowScheduler, WindowSpec
from services.state_store import FileStore, MemoryStore, open_store
from tests.redis_server import redis_server

SPEC = WindowSpec(num_steps=16, size=4, shift_interval=3, stride=1)


def test_advance_follows_window_at_and_never_goes_back():
    s = WindowScheduler(SPEC)
    assert s.current() == (-1, None)
    assert [s.advance(m).start for m in range(0, 10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert s.current() == (9, Window(3, 4))
    with pytest.raises(ValueError, match="cannot go back"):
        s.advance(4)


def test_file_store_restores_a_restarted_scheduler(tmp_path):
    url = f"file://{tmp_path}"
    s = WindowScheduler(SPEC, url, "run-a")
    s.advance(7)
    again = WindowScheduler(SPEC, url, "run-a")  # a restarted actor re-runs __init__
    assert again.current() == (7, Window(2, 4))
    assert WindowScheduler(SPEC, url, "run-b").current() == (-1, None)  # namespaces are separate


def test_restart_with_a_different_spec_is_refused(tmp_path):
    url = f"file://{tmp_path}"
    WindowScheduler(SPEC, url, "run").advance(3)
    with pytest.raises(ValueError, match="different window spec"):
        WindowScheduler(WindowSpec(num_steps=16, size=6, shift_interval=3, stride=1), url, "run")


def test_corrupted_state_file_is_an_error(tmp_path):
    store = FileStore(tmp_path, "run")
    store.put("k", {"a": 1})
    (tmp_path / "run" / "k.json").write_text("{trunc")
    with pytest.raises(ValueError, match="corrupted"):
        store.get("k")


def test_redis_store_restores_a_restarted_scheduler(tmp_path):
    with redis_server(tmp_path) as url:
        s = WindowScheduler(SPEC, url, "run-r")
        s.advance(11)
        assert WindowScheduler(SPEC, url, "run-r").current() == (11, Window(3, 4))


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory"), MemoryStore)
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("s3://bucket")
    with pytest.raises(ConnectionError, match="cannot reach the Redis state store"):
        open_store("redis://127.0.0.1:1/0")
