"""Reward servers: scorers as plain classes, served by Ray Serve with dynamic batching, and a client.

    scorers/        one file per reward behind the `Scorer` protocol; `build_scorer(name, ...)`
    payload.py      REST wire format (pydantic) and image decoding: base64 PNG or raw uint8 arrays
    worker.py       ScorerWorker: merges a Serve batch into model calls, isolates bad requests
    http_api.py     the FastAPI app: /healthz, /v1/rewards, /v1/rewards/{name}/score, auth, limits
    deployments.py  the one place that applies serve.deployment / serve.batch / serve.ingress
    app.py          build_app(specs, server), app_builder for Serve config files, serve_forever
    client.py       RewardClient (handle or HTTP; retries, timeouts, RewardError)
    service.py      deploy-for-the-run context manager used by learner/main.py
    __main__.py     `python -m reward_servers --port 8000 [--config ...]`
"""
