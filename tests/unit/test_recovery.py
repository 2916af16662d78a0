"""When a lost learner is not brought back: past learner.max_restarts, or with collective weight sync. The error
names the checkpoint to --resume from (or says none was written), before anything of the cluster is touched."""

from __future__ import annotations

import pytest

from learner.driver.recovery import LearnerLost, recover_learner
from services.config import load_config


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the cluster was touched: {name}")


def test_refusals_name_the_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "iter_000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "iter_000007").mkdir()
    died = RuntimeError("ActorDiedError stand-in")
    cfg = load_config([], ["learner.max_restarts=2"])
    with pytest.raises(LearnerLost, match=r"after 2 restart\(s\) \(learner.max_restarts=2\): --resume .* continues from "
                                          r".*iter_000007") as e:
        recover_learner(Untouchable(), cfg, tmp_path, Untouchable(), 9, 2, died)
    assert e.value.__cause__ is died
    collective = load_config([], ["cluster.weight_sync=collective"])
    with pytest.raises(LearnerLost, match="cluster.weight_sync=collective cannot rejoin|weight_sync=collective it cannot"):
        recover_learner(Untouchable(), collective, tmp_path, Untouchable(), 9, 0, died)
    with pytest.raises(LearnerLost, match="no checkpoint was written yet"):
        recover_learner(Untouchable(), cfg, tmp_path / "fresh", Untouchable(), 1, 2, died)
    assert load_config([], []).learner.max_restarts == 3
