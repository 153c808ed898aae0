"""Tests for `mlaprop.determinism`: against the simulated SGLang server, and a scripted one for edge cases."""

from __future__ import annotations

import sys
import threading
import zlib
from typing import Any

import pytest

from mlaprop import server
from mlaprop.determinism import LONG_PROMPT, PROMPT_1, PROMPT_2, check_determinism, generate_request
from mlaprop.evalclient import ClientConfig
from tests.eval_fixtures import Answer, closed_port, serve

SIM = (sys.executable, "-m", "mlaprop.simserver")
FAST = ClientConfig(max_retries=1, backoff_s=0.01, request_timeout_s=10, progress=False)
SIZES = (1, 2, 4, 8)
PREFIXES = (1, 511, 2048)


def _sim(deterministic: bool) -> Any:
    args = ["--sim-latency", "0.03", *(["--enable-deterministic-inference"] if deterministic else [])]
    return server.launch(model="sim-model", command_prefix=SIM, extra_args=args, ready_timeout=20, grace=2)


class TestAgainstSimulatedServer:
    """The check passes with ``--enable-deterministic-inference`` and fails without it."""

    def test_passes_with_the_flag(self) -> None:
        """One distinct output per prompt, token ids compared, every prompt sampled."""
        with _sim(deterministic=True) as srv:
            result = check_determinism(srv.base_url, batch_sizes=SIZES, prefix_lengths=PREFIXES, config=FAST)
        assert result.passed is True, result.reason
        assert result.errors == ()
        assert result.compared_output_ids is True
        labels = {o.label: o for o in result.outcomes}
        assert set(labels) == {"single", "single-mix", "prefix-1", "prefix-511", "prefix-2048"}
        # single: alone + even slots of each round (1 + 1 + 1 + 2 + 4); mix: odd slots (0 + 1 + 2 + 4)
        assert (labels["single"].samples, labels["single-mix"].samples) == (9, 7)
        assert sum(o.samples for o in result.outcomes if o.label.startswith("prefix")) == 3 + 3 + 4 + 8
        assert all(o.distinct == 1 and o.diverges_at is None for o in result.outcomes)
        assert result.requests == 1 + 15 + 18
        assert result.reason == "pass: 5 prompts, 34 samples, one distinct output each"

    def test_fails_without_the_flag(self) -> None:
        """Batch-dependent outputs give more than one distinct output, named with their batch sizes."""
        with _sim(deterministic=False) as srv:
            result = check_determinism(srv.base_url, batch_sizes=SIZES, prefix_lengths=(), config=FAST)
        assert result.passed is False
        single = next(o for o in result.outcomes if o.label == "single")
        assert single.distinct > 1
        assert single.diverges_at is not None and single.diverges_at > 0
        sizes = {b for v in single.variants for b in v.batch_sizes}
        assert sizes == set(SIZES)
        assert result.reason.startswith("fail: ")
        assert "distinct outputs" in result.reason


class TestScripted:
    """Edge cases against a scripted server."""

    def test_request_body_and_flushes(self) -> None:
        """Native /generate bodies (greedy, seed, max_new_tokens); one flush before each prefix round."""

        def handler(method: str, path: str, body: Any) -> Answer:
            if path == "/flush_cache":
                return Answer(text="Cache flushed.")
            return Answer(body={"text": f"out-{zlib.crc32(body['text'].encode())}", "meta_info": {}})

        with serve(handler) as srv:
            result = check_determinism(
                srv.url, batch_sizes=(1, 3), prefix_lengths=(5, 10), max_new_tokens=7, seed=9, config=FAST
            )
        assert result.passed is True
        assert result.compared_output_ids is False
        assert srv.count("/flush_cache") == 2
        generate = [b for p, b, _ in srv.bodies if p == "/generate"]
        assert generate[0] == generate_request(PROMPT_1, 7, 9)
        assert generate[0] == {
            "text": PROMPT_1,
            "sampling_params": {"temperature": 0, "max_new_tokens": 7, "sampling_seed": 9},
        }
        texts = [b["text"] for b in generate]
        assert texts.count(PROMPT_1) == 1 + 1 + 2 and texts.count(PROMPT_2) == 1
        assert texts.count(LONG_PROMPT[:5]) + texts.count(LONG_PROMPT[:10]) == 2 + 3

    def test_token_ids_alone_can_differ(self) -> None:
        """Equal texts with different output ids are different outputs."""
        lock = threading.Lock()
        calls = [0]

        def handler(method: str, path: str, body: Any) -> Answer:
            with lock:
                calls[0] += 1
                n = calls[0]
            return Answer(body={"text": "same", "meta_info": {"output_ids": [1, 2, 3 if n == 1 else 4]}})

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1,), prefix_lengths=(), config=FAST)
        assert result.passed is False
        assert result.outcomes[0].distinct == 2
        assert "texts equal, token ids differ" in result.reason

    def test_every_request_failing(self) -> None:
        """No output at all fails, with the first error."""
        with serve(lambda m, p, b: Answer(500, {"error": "dead"})) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.passed is False
        assert result.outcomes == ()
        assert result.reason.startswith("error: no output at all (every request failed); first error: single")
        assert result.status == "error"  # could not finish: infrastructure (exit 3), not a quality failure
        assert len(result.errors) == 1 + 1 + 2

    def test_some_requests_failing(self) -> None:
        """Consistent outputs with failed requests still fail: batch independence is unproven."""
        lock = threading.Lock()
        calls = [0]

        def handler(method: str, path: str, body: Any) -> Answer:
            with lock:
                calls[0] += 1
                n = calls[0]
            return Answer(503, {}) if n in (2, 3) else Answer(body={"text": body["text"][::-1]})

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1,), prefix_lengths=(), config=FAST)
        assert result.passed is False
        assert result.reason.startswith("error: 1 requests failed, so batch independence is unproven")
        assert result.status == "error"

    def test_server_gone(self) -> None:
        """Nothing listening: a failure, in bounded time."""
        url = f"http://127.0.0.1:{closed_port()}"
        result = check_determinism(url, batch_sizes=(1, 2), prefix_lengths=(1,), config=FAST)
        assert result.passed is False
        assert result.outcomes == ()
        assert result.wall_s < 5

    def test_dead_process_stops_the_check(self) -> None:
        """``is_alive()`` false stops before the next round."""
        with serve(lambda m, p, b: Answer(body={"text": "x"})) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), config=FAST, is_alive=lambda: False)
        assert result.passed is False
        assert result.reason == "error: the server process exited during the check"
        assert result.status == "error"
        assert result.requests == 0

    @pytest.mark.parametrize(
        "kwargs",
        [{"batch_sizes": ()}, {"batch_sizes": (0,)}, {"prefix_lengths": (10**6,)}, {"max_new_tokens": 0}],
    )
    def test_bad_arguments(self, kwargs: dict[str, Any]) -> None:
        """Impossible settings are refused before any request."""
        with pytest.raises(ValueError):
            check_determinism("http://127.0.0.1:1", **kwargs)
