"""learner.driver.cluster_checks: what the cluster must offer, checked before any actor starts."""

from __future__ import annotations

import pytest

from services.config import ConfigError, load_config


def test_an_external_reward_service_is_asked_for_its_rewards_before_any_actor(monkeypatch, capsys):
    """transport=http failed a minute in, after the first rollout, as a traceback ('connection error' after 5
    attempts); now the driver asks GET /v1/rewards first, with the bearer token."""
    import json as _json
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from learner.driver.cluster_checks import check_reward_service

    class Rewards(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            ok = self.headers.get("Authorization") == "Bearer tok" and self.path == "/v1/rewards"
            body = _json.dumps({"rewards": [{"name": "shapes_reward"}]} if ok else {"error": "unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Rewards)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"

    def reward(*names):
        rewards = "[" + ", ".join(f"{{name: {n}}}" for n in names) + "]"
        return load_config([], [f"reward.rewards={rewards}", "reward.server.transport=http",
                                f"reward.server.url={url}"]).reward
    try:
        monkeypatch.delenv("MIXGRPO_REWARD_TOKEN", raising=False)
        with pytest.raises(ConfigError, match=r"answers 401 \(set its bearer token in \$MIXGRPO_REWARD_TOKEN\)"):
            check_reward_service(reward("shapes_reward"), local=True)
        monkeypatch.setenv("MIXGRPO_REWARD_TOKEN", "tok")
        check_reward_service(reward("shapes_reward"), local=True)
        with pytest.raises(ConfigError, match=r"reward\.rewards\.1\.name 'shapes_verifier': not served by .* \(it "
                                              r"serves \['shapes_reward'\]\)"):
            check_reward_service(reward("shapes_reward", "shapes_verifier"), local=False)
    finally:
        server.shutdown()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    with pytest.raises(ConfigError, match="cannot reach the reward service at"):
        check_reward_service(reward("shapes_reward"), local=True)
    check_reward_service(reward("shapes_reward"), local=False)
    assert "the rollout workers may still reach it" in capsys.readouterr().err
