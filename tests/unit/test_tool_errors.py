"""The command-line tools answer bad input with one line naming the problem (exit 2), before any work or Ray."""

from __future__ import annotations

import pytest


def test_the_reward_service_refuses_bad_config_before_ray(capsys, monkeypatch):
    from reward_servers import __main__ as cli

    main = cli.main

    def serve_forever(*args, **kwargs):
        pytest.fail("started Ray and Serve for a config it refuses")

    monkeypatch.setattr(cli, "serve_forever", serve_forever)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["bogus=1"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid config:\n  bogus: Extra inputs are not permitted")
    assert main(["--port", "99999"]) == 2 and "reward.server.port" in capsys.readouterr().err
    assert main(["reward.rewards.0.name=nope"]) == 2
    assert "reward.rewards.0.name: unknown reward scorer 'nope'" in capsys.readouterr().err
    # a reward that loads weights, with no folder: before, Serve's deploy failed 70 s later with the cause buried
    assert main(["reward.rewards.0.name=pickscore"]) == 2
    assert ("error: reward.rewards.0.model_path: pickscore loads its weights from a local folder and none is set"
            in capsys.readouterr().err)
    assert main(["reward.rewards.0.name=pickscore", "reward.rewards.0.model_path=/nonexistent"]) == 2
    assert "'/nonexistent' (pickscore's weights) is not a folder on this node" in capsys.readouterr().err


@pytest.mark.parametrize("tool,argv,message", [
    ("diagnose", ["--batches", "1"], "--batches must be >= 2"),
    ("diagnose", ["--window-start", "99"], "--window-start [99]: a window of window.size=4 starts in [0, 11]"),
    ("diagnose", ["--words", "2", "--checkpoint", "/nonexistent"], "/nonexistent"),
    ("diagnose", ["--words", "2", "--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: its folder"),
    ("diagnose", ["bogus=1"], "bogus: Extra inputs are not permitted"),
    ("digest", ["--iterations", "0", "--out", "{tmp}/d.json"], "run.iterations"),
    ("digest", ["--out", "{tmp}"], "is a folder; give a file name"),
    ("digest", ["--config", "nope", "--out", "{tmp}/d.json"], "unknown preset 'nope'"),
    ("eval", ["--base", "--config", "tiny_cpu", "--num-steps", "0"], "--num-steps must be > 0, got 0"),
    ("eval", ["--base", "--config", "tiny_cpu", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    ("eval", ["--base", "--config", "tiny_cpu", "--hybrid-fraction", "0.5"], "not with --base"),
    ("eval", ["--base", "--config", "tiny_cpu", "--json", "{tmp}"], "--json {tmp} is a folder"),
    ("eval", ["--base", "--config", "tiny_cpu", "--prompts-file", "{tmp}/p.txt", "--per-category", "48"],
     "--per-category draws shapes-world prompts"),  # it was silently ignored
])
def test_the_tools_answer_bad_input_in_one_line_before_any_work(tool, argv, message, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"learner.tools.{tool}").main
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err


def test_diagnose_takes_one_measurement_at_a_time(capsys):
    from learner.tools.diagnose import main

    with pytest.raises(SystemExit) as e:  # --shapes used to be dropped silently beside --words
        main(["--shapes", "--words", "2"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["policy", "--out", "{tmp}/p", "--steps", "0"], "--steps must be > 0, got 0"),
    (["policy", "--out", "{tmp}/p", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["policy", "--out", "{tmp}/p", "--lr", "-1"], "--lr and --warmup must be >= 0"),
    (["policy", "--out", "{tmp}/p", "--init", "/nonexistent"], "--init /nonexistent: not a saved tiny policy"),
    (["eval", "--policy", "/nonexistent"], "--policy /nonexistent: not a saved tiny policy"),
    (["eval", "--policy", "rollout_workers/assets/tiny_policy", "--splits", "foo"], "--splits foo: ['foo'] not in"),
    (["policy", "--out", "{tmp}", "--steps", "1"], "is not empty (a saved model?); pass --overwrite"),
    (["reward", "--out", "reward_servers/assets/shapes_reward"], "is not empty (a saved model?); pass --overwrite"),
])
def test_pretrain_refuses_bad_flags_and_a_folder_that_holds_a_model(argv, message, tmp_path, capsys):
    from learner.tools.pretrain import main

    (tmp_path / "config.json").write_text("{}")  # an earlier stage's model, say
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert (tmp_path / "config.json").read_text() == "{}"
