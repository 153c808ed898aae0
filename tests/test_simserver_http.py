"""The simulated server's HTTP write path: a reused (keep-alive) connection answers without a stall.

Headers and body written in two ``send`` calls meet Nagle's algorithm on the server and delayed ACK on
the client: every request on a reused connection waited ~40 ms for the client's ACK timer. Every simulated
timing (the benchmarks included) carried it.
"""

from __future__ import annotations

import statistics
import sys
import time

import requests

from mlaprop.server import launch

SIM = (sys.executable, "-m", "mlaprop.simserver")


def test_keep_alive_round_trip_is_well_under_the_delayed_ack_timer() -> None:
    """Ten chat requests on one reused connection: the median round trip is under 20 ms (with the stall,
    each took about 40-44 ms: Linux's minimum delayed-ACK timeout is 40 ms)."""
    with launch(None, "sim/model", command_prefix=SIM, grace=0.5) as server, requests.Session() as session:
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        url = f"{server.base_url}/v1/chat/completions"
        assert session.post(url, json=body, timeout=10).status_code == 200  # opens the connection
        times = []
        for _ in range(10):
            started = time.perf_counter()
            reply = session.post(url, json=body, timeout=10)
            times.append(time.perf_counter() - started)
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        health = []
        for _ in range(10):
            started = time.perf_counter()
            assert session.get(f"{server.base_url}/health", timeout=10).status_code == 200
            health.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.02, times
    assert statistics.median(health) < 0.02, health
