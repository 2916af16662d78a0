"""`learner.tools.digest`: the same checkout and config give the same digest; a different run seed does not."""

import json

import torch

from learner.tools import digest

SMALL = ["rollout.batch_size=8", "grpo.group_size=4", "learner.micro_batch_size=8", "sampler.num_steps=4",
         "window.size=2"]


def test_digest_is_reproducible_and_sensitive(tmp_path):
    threads = torch.get_num_threads()
    try:
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            assert digest.main(["--iterations", "1", "--out", str(tmp_path / f"{name}.json"), *SMALL,
                                f"run.seed={seed}"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert a == b and a["weights_sha256"] != c["weights_sha256"]
    assert a["windows"] == [[0, 2]] and "update_s" not in a["stats"][0] and "loss" in a["stats"][0]


def test_weights_hash_covers_names_and_values():
    w = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert digest.weights_sha256(w) == digest.weights_sha256(dict(reversed(w.items())))
    assert digest.weights_sha256(w) != digest.weights_sha256({"a": torch.ones(2), "c": torch.zeros(3)})
    assert digest.weights_sha256(w) != digest.weights_sha256({"a": torch.ones(2), "b": torch.tensor([0.0, 0.0, 1e-9])})
