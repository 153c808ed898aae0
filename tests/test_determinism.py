"""Tests for `mlaprop.determinism`: the plan and power (pure), the simulated server's fault switches, and a
scripted server for the edge cases (flush busy, malformed answers, hangs, interrupts, thread bounds)."""

from __future__ import annotations

import _thread
import sys
import threading
import time
import zlib
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mlaprop import server
from mlaprop.determinism import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_PREFIX_LENGTHS,
    LONG_PROMPT,
    MAX_CONCURRENT,
    MAX_LIST_REQUESTS,
    PROMPT_1,
    PROMPT_2,
    DeterminismResult,
    Status,
    check_determinism,
    generate_request,
    plan_waves,
    probes_for,
    samples_needed,
    server_limit_of,
    smallest_flip_rate,
)
from mlaprop.evalclient import ClientConfig
from mlaprop.simserver import _chance
from tests.eval_fixtures import Answer, closed_port, serve

SIM = (sys.executable, "-m", "mlaprop.simserver")
FAST = ClientConfig(max_retries=1, backoff_s=0.01, request_timeout_s=10, progress=False)
PROBES = probes_for(PROMPT_1, DEFAULT_PREFIX_LENGTHS)


def _sim(*args: str, deterministic: bool = True) -> Any:
    argv = ["--sim-latency", "0.05", *(["--enable-deterministic-inference"] if deterministic else []), *args]
    return server.launch(model="sim-model", command_prefix=SIM, extra_args=argv, ready_timeout=20, grace=2)


def _echo(body: Any, suffix: str = "") -> Any:
    """A deterministic /generate answer (a list for a list of texts), with ids and logprobs."""

    def one(text: str) -> dict[str, Any]:
        ids = [zlib.crc32(text.encode()) % 1000, 7]
        logprobs = [[-0.5, ids[0], None], [-0.25, 7, None]]
        return {
            "text": f"out-{ids[0]}{suffix}",
            "output_ids": ids,
            "meta_info": {"output_token_logprobs": logprobs},
        }

    texts = body["text"]
    return [one(t) for t in texts] if isinstance(texts, list) else one(texts)


def _generate_handler(flush: Any = None, info: Any = None) -> Any:
    def handler(method: str, path: str, body: Any) -> Answer:
        if path.startswith("/flush_cache"):
            return flush() if flush is not None else Answer(text="Cache flushed.")
        if path == "/get_server_info":
            return Answer(body=info) if info is not None else Answer(404, {"detail": "Not Found"})
        return Answer(body=_echo(body))

    return handler


class TestPower:
    """The power statement: 1 - (1 - p)^n >= confidence."""

    def test_samples_needed_for_one_in_a_hundred(self) -> None:
        """299 comparisons catch a 1% flip rate with 95% probability; 298 do not."""
        assert samples_needed(0.01, 0.95) == 299
        assert 1 - 0.99**299 >= 0.95 > 1 - 0.99**298
        rate = smallest_flip_rate(299, 0.95)
        assert rate is not None and rate <= 0.01 < (smallest_flip_rate(298, 0.95) or 1)
        assert smallest_flip_rate(0) is None

    def test_bad_rates(self) -> None:
        """Rates outside (0, 1) are refused."""
        with pytest.raises(ValueError):
            samples_needed(0.0, 0.95)
        with pytest.raises(ValueError):
            samples_needed(0.01, 1.0)


class TestPlan:
    """The waves (pure)."""

    def test_default_plan(self) -> None:
        """Reference alone, one wave per size (list + concurrent), top-ups in the last: >= 305 samples."""
        waves = plan_waves(DEFAULT_BATCH_SIZES, PROBES, min_samples=samples_needed(0.01, 0.95) + len(PROBES))
        assert [(w.size, w.flush, w.in_flight) for w in waves] == [
            (1, False, 1),
            (4, True, 8),
            (16, True, 32),
            (64, True, 64 + 64 + 3 * 64),
        ]
        assert waves[0].requests[0].kind == "alone" and waves[0].requests[0].probes[0].text == PROMPT_1
        kinds = [r.kind for r in waves[3].requests]
        assert kinds.count("list") == 4 and kinds.count("concurrent") == 64
        assert sum(w.in_flight for w in waves) == 361
        labels = {p.label for w in waves[1:] for r in w.requests for p in r.probes}
        assert labels == {p.label for p in PROBES}  # every probe is sampled under load

    def test_server_limit_caps_sizes_and_splits_top_ups(self) -> None:
        """A limit of 100: sizes capped, top-up lists in new waves of at most 100 sequences."""
        waves = plan_waves((1, 4, 256), PROBES, min_samples=305, server_limit=100)
        assert [w.size for w in waves] == [1, 4, 100, 100, 100]
        assert all(w.in_flight <= 100 for w in waves[3:])
        assert sum(w.in_flight for w in waves) >= 305

    @given(
        sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=6),
        limit=st.one_of(st.none(), st.integers(1, 3000)),
        need=st.integers(0, 5000),
        conc=st.integers(1, 128),
    )
    def test_plan_meets_the_sample_target_within_its_bounds(
        self, sizes: list[int], limit: int | None, need: int, conc: int
    ) -> None:
        """Whenever some size above 1 survives the cap, the plan reaches ``min_samples``; every request stays
        within the limit, each wave has at most ``conc`` concurrent and ``conc + MAX_LIST_REQUESTS`` requests."""
        waves = plan_waves(sizes, PROBES, min_samples=need, server_limit=limit, max_concurrent=conc)
        has_batches = any(min(b, limit or b) >= 2 for b in sizes)
        event(f"batches: {has_batches}")
        total = sum(w.in_flight for w in waves)
        if has_batches:
            assert total >= need
        else:
            assert total == 1
        for w in waves:
            kinds = [r.kind for r in w.requests]
            assert kinds.count("concurrent") <= conc
            assert len(kinds) <= conc + MAX_LIST_REQUESTS
            assert all(limit is None or len(r.probes) <= limit for r in w.requests)

    def test_server_limit_of(self) -> None:
        """SGLang 0.5.11 ``/get_server_info``: the scheduler's effective limit wins over the argument."""
        assert server_limit_of({"max_running_requests": None, "internal_states": [{}]}) is None
        assert server_limit_of({"max_running_requests": 48}) == 48
        info = {
            "max_running_requests": 48,
            "internal_states": [
                {"effective_max_running_requests_per_dp": 40},
                {"effective_max_running_requests_per_dp": 32},
            ],
        }
        assert server_limit_of(info) == 32
        assert server_limit_of({"max_running_requests": True}) is None
        assert server_limit_of([1, 2]) is None


class TestAgainstSimulatedServer:
    """The simulator's fault switches: each one is caught, and the deterministic server passes."""

    def test_passes_with_the_flag(self) -> None:
        """One distinct output per prompt, token ids and logprobs compared, power stated."""
        with _sim() as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.PASS and result.passed, result.reason
        assert result.errors == () and result.cause == ""
        assert result.compared_output_ids and result.compared_logprobs
        assert result.server_limit == 2048
        assert (result.samples, result.comparisons, result.waves, result.waves_planned) == (361, 355, 4, 4)
        assert result.requests == 1 + 5 + 17 + 68
        assert result.detectable_flip_rate is not None and result.detectable_flip_rate < 0.01
        assert {o.label for o in result.outcomes} == {p.label for p in PROBES}
        assert all(o.distinct == 1 and o.max_logprob_diff == 0.0 for o in result.outcomes)
        assert result.reason.startswith(
            "pass: 6 prompts, 361 samples, one distinct output each; 355 comparisons"
        )

    def test_fails_without_the_flag(self) -> None:
        """Batch-dependent outputs: FAIL, with the waves that gave each variant."""
        with _sim(deterministic=False) as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.FAIL and not result.passed
        single = next(o for o in result.outcomes if o.label == "single")
        assert single.distinct > 1 and single.diverges_at is not None and single.first_token_diff is not None
        assert {b for v in single.variants for b in v.batch_sizes} == {1, 4, 16, 64}
        assert "distinct outputs" in result.reason

    def test_dependence_from_17_in_flight(self) -> None:
        """Dependence only at >= 17 sequences in flight: caught, and every answer from a wave under 17 agrees
        (a wave's count is nominal: a request that finishes before the others arrive saw fewer)."""
        with _sim("--sim-vary-from", "17") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.FAIL
        for o in result.outcomes:
            low = [v for v in o.variants if any(n < 17 for n in v.in_flight)]
            assert len(low) <= 1  # answers from waves under 17 in flight all agree
            assert o.distinct > 1

    def test_dependence_only_in_list_requests(self) -> None:
        """Dependence only inside server-side (list) batches: caught; list answers never agree with the
        concurrent ones of the same prompt."""
        with _sim("--sim-vary-lists") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.FAIL
        for o in result.outcomes:
            assert all(v.kinds == ("list",) or "list" not in v.kinds for v in o.variants)
            assert any(v.kinds == ("list",) for v in o.variants)

    def test_random_flip_on_overlapped_requests(self) -> None:
        """A 1-in-100 flip on overlapped sequences: with the simulator's seed 0, the flips that fall among the
        360 loaded sequences are caught."""
        flips = sum(1 for n in range(2, 362) if _chance(0, "flip", n) < 0.01)
        assert flips >= 1  # the premise of this seeded test
        with _sim("--sim-flip-rate", "0.01") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.FAIL
        odd = sum(v.count for o in result.outcomes for v in o.variants[1:])
        assert odd == flips

    def test_flush_busy_is_not_a_failure(self) -> None:
        """``/flush_cache`` answering 400 half the time: retried, noted, PASS."""
        with _sim("--sim-flush-busy-rate", "0.5", "--sim-seed", "3") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.PASS, result.reason
        assert any("busy" in n for n in result.notes)

    def test_server_dies_mid_check(self) -> None:
        """The server exits after 10 generation requests: ERROR naming it, answered waves kept, fast."""
        with _sim("--sim-die-after-requests", "10") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.ERROR and not result.passed
        assert "exited" in result.cause or "stopped answering" in result.cause, result.cause
        assert result.waves >= 2 and result.samples >= 9
        assert result.reason.startswith("error: ")
        assert result.wall_s < 5

    def test_divergence_before_a_death_is_still_a_failure(self) -> None:
        """A batch-dependent server that dies mid-check: FAIL (the divergent answers are evidence), with the
        stop named."""
        with _sim("--sim-die-after-requests", "10", deterministic=False) as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.FAIL
        assert result.cause and "(the check then stopped: " in result.reason

    def test_malformed_json(self) -> None:
        """A truncated JSON body: ERROR (malformed), never FAIL."""
        with _sim("--sim-malformed-every", "4") as srv:
            result = check_determinism(srv.base_url, config=FAST, is_alive=srv.alive)
        assert result.status is Status.ERROR
        assert "malformed answer" in result.cause and "not JSON" in result.cause

    def test_hang_costs_one_timeout(self) -> None:
        """A hung /generate: ERROR after one request timeout, not one per round."""
        cfg = ClientConfig(max_retries=0, request_timeout_s=2.0, progress=False)
        with _sim("--sim-hang-from", "3") as srv:
            started = time.monotonic()
            result = check_determinism(srv.base_url, config=cfg, is_alive=srv.alive)
            took = time.monotonic() - started
        assert result.status is Status.ERROR and "the server hung" in result.cause
        assert result.errors == (result.cause,)  # stopped at the first timeout
        assert took < 2 * 2.0 + 3


class TestScripted:
    """Edge cases against a scripted server."""

    def test_request_bodies_flushes_and_server_info(self) -> None:
        """Native /generate bodies (a list for the server-side batch), logprobs asked for, one flush with
        SGLang's ``timeout`` before each wave after the reference, the limit read first."""
        handler = _generate_handler(info={"max_running_requests": 3})
        with serve(handler) as srv:
            result = check_determinism(
                srv.url, batch_sizes=(1, 3, 8), prefix_lengths=(5,), max_new_tokens=7, seed=9, config=FAST
            )
        assert result.status is Status.PASS, result.reason
        assert result.server_limit == 3 and result.batch_sizes == (1, 3)
        assert any("capped at the server's limit of 3" in n for n in result.notes)
        paths = [p for p, _, _ in srv.bodies]
        assert paths[0] == "/get_server_info"
        assert paths.count("/flush_cache?timeout=5") == result.waves_planned - 1
        generate = [b for p, b, _ in srv.bodies if p == "/generate"]
        assert generate[0] == {
            "text": PROMPT_1,
            "sampling_params": {"temperature": 0, "max_new_tokens": 7, "sampling_seed": 9},
            "return_logprob": True,
        }
        lists = [b["text"] for b in generate if isinstance(b["text"], list)]
        assert lists and all(len(t) == 3 for t in lists)
        assert set(lists[0]) <= {PROMPT_1, PROMPT_2, LONG_PROMPT[:5]}
        assert generate_request(["a", "b"], 3, 1) == {
            "text": ["a", "b"],
            "sampling_params": {"temperature": 0, "max_new_tokens": 3, "sampling_seed": 1},
        }

    def test_flush_busy_then_flushed(self) -> None:
        """400 twice, then 200: PASS, with the retries noted."""
        lock = threading.Lock()
        calls = [0]

        def flush() -> Answer:
            with lock:
                calls[0] += 1
                return Answer(400, text="Flush cache failed.\n") if calls[0] <= 2 else Answer(text="ok")

        with serve(_generate_handler(flush=flush)) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.PASS
        assert result.notes[-1].startswith("POST /flush_cache busy 2 times before wave 1; flushed after")

    def test_flush_never_succeeds(self) -> None:
        """A flush refused for the whole bounded wait: noted (warm cache), still PASS, in bounded time."""
        busy = _generate_handler(flush=lambda: Answer(400, text="Flush cache failed.\n"))
        with serve(busy) as srv:
            result = check_determinism(
                srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST, flush_wait_s=0.3
            )
        assert result.status is Status.PASS
        gave_up = [n for n in result.notes if "ran on a warm cache" in n]
        assert len(gave_up) == result.waves_planned - 1 and "still busy after" in gave_up[0]
        assert "after 1 tries" in gave_up[-1]  # once one flush gave up, later ones are tried once
        assert result.wall_s < 3

    def test_token_ids_alone_can_differ(self) -> None:
        """Equal texts with different output ids are different outputs."""
        lock = threading.Lock()
        calls = [0]

        def handler(method: str, path: str, body: Any) -> Answer:
            if path != "/generate":
                return Answer(text="ok")
            with lock:
                calls[0] += 1
                n = calls[0]
            one = {"text": "same", "meta_info": {"output_ids": [1, 2, 3 if n == 1 else 4]}}
            return Answer(body=[one] * len(body["text"]) if isinstance(body["text"], list) else one)

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.FAIL
        assert "texts equal, token ids differ from position 2" in result.reason

    def test_logprobs_alone_can_differ(self) -> None:
        """Equal texts and ids with a logprob off by 1e-6: FAIL, the difference measured."""

        def handler(method: str, path: str, body: Any) -> Answer:
            if path != "/generate":
                return Answer(text="ok")
            out = _echo(body)
            if isinstance(out, list):  # the server-side batch gives a slightly different logprob
                for o in out:
                    o["meta_info"]["output_token_logprobs"][1][0] = -0.25 + 1e-6
            return Answer(body=out)

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.FAIL
        assert "logprobs differ by up to 1e-06" in result.reason
        single = next(o for o in result.outcomes if o.label == "single")
        assert single.max_logprob_diff == pytest.approx(1e-6)

    def test_every_request_failing_is_an_error(self) -> None:
        """HTTP 500 on every generation: ERROR after the first failure, not a determinism FAIL."""
        with serve(lambda m, p, b: Answer(500, {"error": "dead"})) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.ERROR
        assert result.outcomes == ()
        assert result.cause.startswith("wave 0, alone request of 1: HTTP 500")
        assert result.requests == 1

    @pytest.mark.parametrize("sizes, info", [((1,), None), ((1, 4, 16), {"max_running_requests": 1})])
    def test_no_comparison_is_an_error_not_a_pass(self, sizes: tuple[int, ...], info: Any) -> None:
        """Regression: --batch-sizes 1, or a server running one request at a time, left one answer and no
        comparison, and the check said PASS ("no comparison, so no power"); it is an ERROR naming why."""
        with serve(_generate_handler(info=info)) as srv:
            result = check_determinism(srv.url, batch_sizes=sizes, prefix_lengths=(), config=FAST)
        assert result.comparisons == 0
        assert result.status is Status.ERROR and not result.passed
        assert result.cause.startswith("no comparison")
        if info is not None:
            assert "at most 1 request at once" in result.cause

    def test_empty_answers_are_an_error_not_a_pass(self) -> None:
        """Regression: a server answering every /generate with no text and no token passed ("one distinct
        output each"); SGLang's own test fails an empty result. It is an ERROR naming it."""
        empty = {"text": "", "output_ids": [], "meta_info": {"output_token_logprobs": []}}

        def handler(method: str, path: str, body: Any) -> Answer:
            if path != "/generate":
                return (
                    Answer(text="ok") if path.startswith("/flush") else Answer(404, {"detail": "Not Found"})
                )
            texts = body["text"]
            return Answer(body=[empty for _ in texts] if isinstance(texts, list) else empty)

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.ERROR and not result.passed
        assert result.cause.startswith("every answer was empty")

    def test_wrong_list_length_is_malformed(self) -> None:
        """A list request answered with fewer answers than texts: ERROR (malformed)."""

        def handler(method: str, path: str, body: Any) -> Answer:
            if path != "/generate":
                return Answer(text="ok")
            out = _echo(body)
            return Answer(body=out[:1] if isinstance(out, list) else out)

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=FAST)
        assert result.status is Status.ERROR
        assert "expected a list of 2 answers, got a list of 1" in result.cause
        assert result.waves == 1 and result.samples >= 1

    def test_server_gone(self) -> None:
        """Nothing listening: ERROR in bounded time."""
        url = f"http://127.0.0.1:{closed_port()}"
        result = check_determinism(url, batch_sizes=(1, 2), prefix_lengths=(1,), config=FAST)
        assert result.status is Status.ERROR and "stopped answering" in result.cause
        assert result.outcomes == ()
        assert result.wall_s < 5

    def test_dead_process_stops_the_check(self) -> None:
        """``is_alive()`` false: ERROR before any request."""
        with serve(_generate_handler()) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 2), config=FAST, is_alive=lambda: False)
        assert result.status is Status.ERROR
        assert result.cause == "the server process exited while reading its limit"
        assert result.requests == 0

    def test_death_noticed_during_a_wave(self) -> None:
        """The process dies while a wave hangs: noticed within about a second, not at the request timeout."""
        alive = threading.Event()
        alive.set()

        def handler(method: str, path: str, body: Any) -> Answer:
            if path == "/generate" and isinstance(body["text"], list):
                threading.Timer(0.3, alive.clear).start()
                return Answer(body=_echo(body), delay_s=30)
            return _generate_handler()(method, path, body)

        cfg = ClientConfig(max_retries=0, request_timeout_s=60, progress=False)
        with serve(handler) as srv:
            result = check_determinism(
                srv.url, batch_sizes=(1, 2), prefix_lengths=(), config=cfg, is_alive=alive.is_set
            )
        assert result.status is Status.ERROR and "exited during wave 1" in result.cause
        assert result.wall_s < 5  # the request would have taken 30 s
        assert result.waves == 1 and result.samples == 1 + 2  # the concurrent answers of wave 1 are kept

    def test_interrupt_cancels_and_keeps_answered_waves(self) -> None:
        """Ctrl-C while a wave hangs: propagates within about a second; ``on_progress`` got the answered
        waves as an ERROR result. Ctrl-C is repeated every 0.2 s until the partial result is saved (a signal
        that lands in a finalizer is ignored by Python; the repeats also show a second Ctrl-C loses nothing)."""
        seen: list[DeterminismResult] = []
        lock = threading.Lock()
        hung = threading.Event()
        saved = threading.Event()

        def on_progress(result: DeterminismResult) -> None:
            with lock:
                seen.append(result)
                if result.cause.startswith("interrupted"):
                    saved.set()

        def interrupter() -> None:
            hung.wait(30)
            while not saved.wait(0.2):
                with lock:
                    if not saved.is_set():
                        _thread.interrupt_main()

        def handler(method: str, path: str, body: Any) -> Answer:
            if path == "/generate" and isinstance(body["text"], list) and len(body["text"]) == 4:
                hung.set()
                return Answer(body=_echo(body), delay_s=30)
            return _generate_handler()(method, path, body)

        cfg = ClientConfig(max_retries=0, request_timeout_s=60, progress=False)
        threading.Thread(target=interrupter, daemon=True).start()
        with serve(handler) as srv:
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                check_determinism(srv.url, batch_sizes=(1, 2, 4), config=cfg, on_progress=on_progress)
            took = time.monotonic() - started
        assert took < 5  # the hung request would have taken 30 s
        last = seen[-1]
        assert last.status is Status.ERROR
        assert last.cause == "interrupted (KeyboardInterrupt) during the check"
        # the answered waves are kept whole; of the interrupted wave, whatever concurrent answers had arrived
        # when Ctrl-C landed (0 to 4: the interrupter races them)
        assert last.waves == 2 and 1 + 4 <= last.samples <= 1 + 4 + 4
        m = last.waves_planned
        assert [r.cause for r in seen[:-1]] == [f"unfinished: {k} of {m} waves answered" for k in (1, 2)]

    def test_threads_bounded_for_a_1024_batch(self) -> None:
        """A 1024-prompt batch goes as one list request: the check's threads stay within the bound."""
        peak = [0]

        def handler(method: str, path: str, body: Any) -> Answer:
            n = sum(1 for t in threading.enumerate() if t.name.startswith("mlaprop-det"))
            peak[0] = max(peak[0], n)
            return _generate_handler()(method, path, body)

        with serve(handler) as srv:
            result = check_determinism(srv.url, batch_sizes=(1, 1024), prefix_lengths=(), config=FAST)
        assert result.status is Status.PASS
        assert result.samples >= 1 + 1024 + 64
        assert 0 < peak[0] <= MAX_CONCURRENT + MAX_LIST_REQUESTS

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"batch_sizes": ()},
            {"batch_sizes": (0,)},
            {"prefix_lengths": (10**6,)},
            {"max_new_tokens": 0},
            {"max_concurrent": 0},
            {"flip_rate": 0.0},
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, Any]) -> None:
        """Impossible settings are refused before any request."""
        with pytest.raises(ValueError):
            check_determinism("http://127.0.0.1:1", **kwargs)


def test_interrupted_run_keeps_the_answered_waves(tmp_path: Any, mgsm_dir: Any, monkeypatch: Any) -> None:
    """``mlaprop run``, Ctrl-C after two waves: summary.json holds the partial check (status error, the answered
    samples), not ``null``."""
    from mlaprop import job
    from tests.test_run import _run, _summary

    real = job.check_determinism

    def interrupted(*a: Any, on_progress: Any, **k: Any) -> Any:
        calls: list[DeterminismResult] = []

        def progress(result: DeterminismResult) -> None:
            on_progress(result)
            calls.append(result)
            if len(calls) == 2:
                raise KeyboardInterrupt

        return real(*a, on_progress=progress, **k)

    monkeypatch.setattr(job, "check_determinism", interrupted)
    assert _run(tmp_path, mgsm_dir, limit=5) == 130
    d = _summary(tmp_path)["determinism"]
    assert (d["status"], d["cause"]) == ("error", "interrupted (KeyboardInterrupt) during the check")
    assert d["samples"] == 1 + 2 + 2 and d["requests"] == 1 + 3  # test_run uses sizes 1, 2, 4, 8


def test_server_death_in_the_check_is_an_infrastructure_error(tmp_path: Any, mgsm_dir: Any) -> None:
    """``mlaprop run``, the server dies during the determinism check: exit 3 and status determinism-error
    (never "determinism FAILED"), with the cause in the verdict line and the server log tail in the report."""
    from tests.test_run import _run, _summary

    code = _run(tmp_path, mgsm_dir, accuracy=1.0, limit=5, sim_args=("--sim-die-after-requests", "8"))
    s = _summary(tmp_path)
    assert (code, s["status"], s["determinism"]["status"]) == (3, "determinism-error", "error")
    assert s["error"]["stage"] == "determinism" and s["error"]["message"] == s["determinism"]["cause"]
    assert any("simulated crash after" in line for line in s["error"]["log_tail"]), s["error"]["log_tail"]
    assert s["message"].startswith("verdict: ERROR - ") and s["determinism"]["cause"] in s["message"]


def test_result_json_and_legacy_constructor() -> None:
    """A result built the old way (``passed`` only) gets its status; ``to_json`` carries status and power."""
    old = DeterminismResult(False, (), (), "fail: x", 0, False, (1,), (), 42, 100, 0.1)
    assert old.status is Status.FAIL
    with pytest.raises(ValueError):
        DeterminismResult(True, (), (), "x", 0, False, (1,), (), 42, 100, 0.1, status=Status.ERROR)
    j = DeterminismResult(
        False, (), (), "error: x", 0, False, (1,), (), 42, 100, 0.1, status=Status.ERROR, cause="died"
    ).to_json()
    assert (j["status"], j["passed"], j["cause"], j["detectable_flip_rate"]) == ("error", False, "died", None)
