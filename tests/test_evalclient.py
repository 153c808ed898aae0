"""Tests for `mlaprop.evalclient`: retries, errors, early stops and MGSM scoring against a scripted server."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mlaprop.evalclient import (
    GATE_CONCURRENCY,
    TRIP_FLOOR,
    ClientConfig,
    EvalAborted,
    EvalResult,
    HttpClient,
    RequestFailed,
    RetryCounts,
    default_concurrency,
    fetch_server_info,
    percentile,
    run_mgsm,
    server_root,
)
from mlaprop.mgsm import MgsmDataset, MgsmItem, Parser, build_prompt
from mlaprop.stats import Verdict
from tests.eval_fixtures import MODELS, Answer, chat_answer, closed_port, load_en, question_of, serve

FAST = ClientConfig(concurrency=8, max_retries=2, backoff_s=0.01, backoff_max_s=0.05, progress=False)


def _small(ds: MgsmDataset, n: int) -> MgsmDataset:
    return MgsmDataset(ds.lang, ds.path, ds.sha256, ds.items[:n], ds.canonical)


class Model:
    """A scripted model: right on ``right`` indices, wrong elsewhere; hooks for failures."""

    def __init__(self, ds: MgsmDataset, right: set[int], fail: set[int] | None = None) -> None:
        self.by_prompt: dict[str, MgsmItem] = {build_prompt(i.question): i for i in ds.items}
        self.right = right
        self.fail = fail or set()

    def __call__(self, method: str, path: str, body: Any) -> Answer:
        if path == "/v1/models":
            return MODELS
        item = self.by_prompt[question_of(body)]
        if item.index in self.fail:
            return Answer(status=500, body={"error": "boom"})
        value = item.target_value if item.index in self.right else item.target_value + 1
        return chat_answer(f"Let me think step by step.\nAnswer: {value}", completion_tokens=7)


class TestHttpClient:
    """Tests for `HttpClient.request`: what is retried, what is not, and how long it takes."""

    def test_retries_429_and_503_then_succeeds(self) -> None:
        """429 and 503 are retried (honouring Retry-After); the third attempt's answer is returned."""
        script = iter([Answer(429, {"e": 1}, headers={"Retry-After": "0"}), Answer(503, {"e": 2})])
        with (
            serve(lambda m, p, b: next(script, Answer(body={"ok": True}))) as srv,
            HttpClient(srv.url, FAST) as c,
        ):
            reply = c.post_json("/x", {})
        assert (reply.body, reply.attempts) == ({"ok": True}, 3)
        assert srv.count("/x") == 3

    def test_gives_up_after_max_retries(self) -> None:
        """Persistent 500s fail after 1 + max_retries attempts, with the status and body in the reason."""
        with (
            serve(lambda m, p, b: Answer(500, {"error": "kaput"})) as srv,
            HttpClient(srv.url, FAST) as c,
            pytest.raises(RequestFailed) as info,
        ):
            c.post_json("/x", {})
        assert (info.value.status, info.value.attempts) == (500, 3)
        assert info.value.reason == 'HTTP 500: {"error": "kaput"} (after 3 attempts)'
        assert srv.count("/x") == 3

    def test_400_not_retried(self) -> None:
        """A client error is not retried."""
        with (
            serve(lambda m, p, b: Answer(400, {"error": "bad"})) as srv,
            HttpClient(srv.url, FAST) as c,
            pytest.raises(RequestFailed) as info,
        ):
            c.post_json("/x", {})
        assert (info.value.status, info.value.attempts, srv.count("/x")) == (400, 1, 1)

    def test_not_json(self) -> None:
        """A 200 with a body that is not JSON is a failure, not an empty answer."""
        with serve(lambda m, p, b: Answer(text="<html>proxy</html>")) as srv, HttpClient(srv.url, FAST) as c:
            with pytest.raises(RequestFailed, match="not JSON"):
                c.get_json("/x")
            assert c.request("GET", "/x", parse_json=False).body == "<html>proxy</html>"

    def test_connection_refused_is_retried_and_bounded(self) -> None:
        """Nothing listening: retried with backoff, then fails quickly."""
        started = time.monotonic()
        with HttpClient(f"http://127.0.0.1:{closed_port()}", FAST) as c, pytest.raises(RequestFailed) as info:
            c.get_json("/health")
        assert info.value.attempts == 3
        assert info.value.status is None
        assert "ConnectionError" in info.value.reason
        assert time.monotonic() - started < 2.0

    def test_read_timeout_not_retried(self) -> None:
        """A stalled answer times out after ``request_timeout_s`` and is not retried."""
        cfg = ClientConfig(concurrency=1, request_timeout_s=0.2, max_retries=3, progress=False)
        with serve(lambda m, p, b: Answer(body={}, delay_s=1.0)) as srv, HttpClient(srv.url, cfg) as c:
            started = time.monotonic()
            with pytest.raises(RequestFailed, match=r"no answer within 0.2 s"):
                c.get_json("/slow")
            assert time.monotonic() - started < 0.9
            assert srv.count("/slow") == 1

    def test_stop_interrupts_backoff(self) -> None:
        """``stop()`` wakes a request sleeping between retries, which then fails at once."""
        cfg = ClientConfig(concurrency=1, max_retries=5, backoff_s=5.0, backoff_max_s=5.0, progress=False)
        with serve(lambda m, p, b: Answer(503, {})) as srv, HttpClient(srv.url, cfg) as c:
            threading.Timer(0.2, c.stop).start()
            started = time.monotonic()
            with pytest.raises(RequestFailed, match="stopped"):
                c.get_json("/x")
            assert time.monotonic() - started < 1.5

    def test_stop_cuts_a_hung_request(self) -> None:
        """``stop()`` cuts a request waiting on a server that never answers, long before the read timeout."""
        cfg = ClientConfig(concurrency=1, request_timeout_s=30, progress=False)
        with serve(lambda m, p, b: Answer(body={}, delay_s=3.0)) as srv, HttpClient(srv.url, cfg) as c:
            threading.Timer(0.2, c.stop).start()
            started = time.monotonic()
            with pytest.raises(RequestFailed, match="stopped while waiting for the reply"):
                c.get_json("/hang")
            assert time.monotonic() - started < 1.0

    def test_pool_and_auth(self) -> None:
        """The pool holds ``concurrency`` connections; the API key goes in a header and never in repr."""
        cfg = ClientConfig(concurrency=33, api_key="sk-secret-123", progress=False)
        with serve(lambda m, p, b: Answer(body={})) as srv, HttpClient(srv.url, cfg) as c:
            c.get_json("/x")
            adapter: Any = c.session.get_adapter(srv.url)
            assert adapter._pool_maxsize == 33
        assert srv.bodies[0][2]["Authorization"] == "Bearer sk-secret-123"
        assert "sk-secret" not in repr(cfg)

    @pytest.mark.parametrize("bad", [{"concurrency": 0}, {"max_retries": -1}, {"max_error_rate": 2.0}])
    def test_bad_config(self, bad: dict[str, Any]) -> None:
        """Impossible settings are refused."""
        with pytest.raises(ValueError):
            ClientConfig(**bad)

    @pytest.mark.parametrize("value", [0.0, -5.0, float("nan"), float("inf")])
    def test_timeouts_must_be_finite_and_positive(self, value: float) -> None:
        """A NaN timeout is refused too (regression: ``nan <= 0`` is false, so it got through)."""
        with pytest.raises(ValueError, match=r"request_timeout_s must be a finite number of seconds > 0"):
            ClientConfig(request_timeout_s=value)


class TestRunMgsm:
    """Tests for `run_mgsm` on the real MGSM-en questions."""

    def test_exact_score(self, mgsm_dir: Path) -> None:
        """A model right on 40 of 50 questions scores exactly 0.8 with both parsers; records carry details."""
        ds = _small(load_en(mgsm_dir), 50)
        model = Model(ds, right=set(range(10, 50)))
        seen: list[str] = []
        with serve(model) as srv:
            result = run_mgsm(srv.url, ds, config=FAST, on_record=lambda r: seen.append(r.qid))
        assert (result.n_total, result.answered, result.errors) == (50, 50, 0)
        assert result.correct(Parser.SIMPLE_EVALS) == result.correct(Parser.ROBUST) == 40
        score = result.score(Parser.SIMPLE_EVALS)
        assert score is not None and score.score == 0.8
        assert result.verdict(Parser.SIMPLE_EVALS) is Verdict.PASS
        assert result.model == "fake-model"
        assert sorted(seen) == [i.qid for i in ds.items]
        assert [r.index for r in result.records] == list(range(50))
        wrong, right = result.records[0], result.records[10]
        assert (wrong.target, wrong.extracted_simple_evals, wrong.extracted_robust) == ("18", "19", "19")
        assert (wrong.correct_simple_evals, wrong.correct_robust, wrong.completion_tokens) == (
            False,
            False,
            7,
        )
        assert right.extracted_simple_evals == right.extracted_robust == right.target.replace(",", "")
        assert right.correct_simple_evals and right.correct_robust
        assert result.completion_tokens == 350
        assert result.disagreements == ()

    def test_errors_are_not_wrong_answers(self, mgsm_dir: Path) -> None:
        """Questions whose requests fail are errors: not answered, not wrong, verdict bounded both ways."""
        ds = _small(load_en(mgsm_dir), 40)
        model = Model(ds, right=set(range(40)), fail={3, 7})
        cfg = ClientConfig(concurrency=4, max_retries=1, backoff_s=0.01, max_error_rate=0.1, progress=False)
        with serve(model) as srv:
            result = run_mgsm(srv.url, ds, config=cfg)
        assert (result.answered, result.errors, result.correct(Parser.ROBUST)) == (38, 2, 38)
        assert [r.qid for r in result.records if r.error] == ["mgsm_en_003", "mgsm_en_007"]
        assert result.records[3].error == 'HTTP 500: {"error": "boom"} (after 2 attempts)'
        assert result.records[3].correct_robust is False and result.records[3].response is None
        score = result.score(Parser.ROBUST)
        assert score is not None and (score.correct, score.n, score.score) == (38, 38, 1.0)
        assert result.verdict(Parser.ROBUST) is Verdict.PASS  # 38/40 >= 0.8 even counting errors wrong

    def test_parsers_disagree(self, mgsm_dir: Path) -> None:
        """Replies only the robust parser reads are listed as disagreements."""
        ds = _small(load_en(mgsm_dir), 4)

        def handler(m: str, p: str, b: Any) -> Answer:
            if p == "/v1/models":
                return MODELS
            item = next(i for i in ds.items if build_prompt(i.question) == question_of(b))
            return chat_answer(f"answer: {item.target}" if item.index % 2 else f"Answer: {item.target}")

        with serve(handler) as srv:
            result = run_mgsm(srv.url, ds, config=FAST, model="m")
        assert [r.qid for r in result.disagreements] == ["mgsm_en_001", "mgsm_en_003"]
        assert (result.correct(Parser.SIMPLE_EVALS), result.correct(Parser.ROBUST)) == (2, 4)
        assert srv.count("/v1/models") == 0  # a named model is not looked up

    def test_error_rate_stops_in_bounded_time(self, mgsm_dir: Path) -> None:
        """A server failing everything stops the run early with partial results."""
        ds = _small(load_en(mgsm_dir), 200)
        with serve(lambda m, p, b: MODELS if p == "/v1/models" else Answer(500, {})) as srv:
            started = time.monotonic()
            with pytest.raises(EvalAborted) as info:
                run_mgsm(srv.url, ds, config=FAST)
            elapsed = time.monotonic() - started
        partial = info.value.partial
        assert isinstance(partial, EvalResult)
        assert partial.aborted == info.value.reason
        assert "5% error bound" in info.value.reason
        assert 0 < partial.errors < 200 and partial.answered == 0
        assert partial.missing > 0
        assert srv.count("/v1/chat/completions") < 200 * 3
        assert elapsed < 5.0

    def test_server_death_stops_in_bounded_time(self, mgsm_dir: Path) -> None:
        """When ``is_alive`` turns false the run stops within about one poll, keeping what finished. The
        server hangs from its 30th request on and "dies" 0.2 s after that (timed from the hang, not from
        the start, so a slow start under load cannot move the death before the answers)."""
        ds = _small(load_en(mgsm_dir), 120)
        model = Model(ds, right=set(range(120)))
        counter = itertools.count()
        hung: list[float] = []

        def handler(m: str, p: str, b: Any) -> Answer:
            ans = model(m, p, b)
            ans.delay_s = 0.02
            if p == "/v1/chat/completions" and next(counter) >= 30:
                hung.append(time.monotonic())
                ans.delay_s = 30.0  # the server hangs before dying
            return ans

        def alive() -> bool:
            return not hung or time.monotonic() < hung[0] + 0.2

        cfg = ClientConfig(
            concurrency=4, request_timeout_s=60, alive_poll_s=0.1, abort_grace_s=0.5, progress=False
        )
        with serve(handler) as srv:
            with pytest.raises(EvalAborted) as info:
                run_mgsm(srv.url, ds, config=cfg, is_alive=alive)
            stopped = time.monotonic()
        assert info.value.reason.startswith("the server process exited with")
        partial = info.value.partial
        assert isinstance(partial, EvalResult)
        assert (
            26 <= partial.answered <= 30
        )  # the 30 answered, less any cut while the last ones were in flight
        assert partial.correct(Parser.SIMPLE_EVALS) == partial.answered
        assert stopped - (hung[0] + 0.2) < 2.0  # noticed within a poll, in-flight requests cut
        deadline = time.monotonic() + 2.0  # the cut requests release their threads at once
        while (
            any(t.name.startswith("mlaprop") for t in threading.enumerate()) and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("mlaprop")]

    def test_model_list_failure(self, mgsm_dir: Path) -> None:
        """No model list: the run stops before any question, saying why."""
        ds = _small(load_en(mgsm_dir), 3)
        with (
            serve(lambda m, p, b: Answer(404, {"detail": "nope"})) as srv,
            pytest.raises(EvalAborted) as info,
        ):
            run_mgsm(srv.url, ds, config=FAST)
        assert info.value.reason == 'could not list the server\'s models: HTTP 404: {"detail": "nope"}'
        assert info.value.partial.records == ()

    def test_malformed_reply_is_an_error(self, mgsm_dir: Path) -> None:
        """A 200 without choices is an error record."""
        ds = _small(load_en(mgsm_dir), 2)
        with serve(lambda m, p, b: Answer(body={"object": "error"})) as srv:
            result = run_mgsm(srv.url, ds, config=ClientConfig(max_error_rate=1.0, progress=False), model="m")
        assert result.errors == 2
        assert result.records[0].error is not None
        assert result.records[0].error.startswith("malformed reply, no choices[0].message.content")

    def test_concurrency_is_used(self, mgsm_dir: Path) -> None:
        """Exactly ``concurrency`` requests are in flight at once: the server holds every answer until 8
        requests wait together (a barrier, so a slow start under load cannot make it race), and never
        sees a ninth."""
        ds = _small(load_en(mgsm_dir), 24)
        model = Model(ds, right=set())
        together = threading.Barrier(8, timeout=30)

        def gathered(m: str, p: str, b: Any) -> Answer:
            if p == "/v1/chat/completions":
                with contextlib.suppress(threading.BrokenBarrierError):
                    together.wait()
            return model(m, p, b)

        cfg = ClientConfig(concurrency=8, progress=False)
        with serve(gathered) as srv:
            result = run_mgsm(srv.url, ds, config=cfg, model="m")
        assert result.answered == 24
        assert not together.broken  # 8 were in flight at once, every time
        assert srv.max_in_flight == 8
        assert result.concurrency == 8


class TestFailureBounds:
    """The run stops as soon as the error bound is crossed, retries are counted, and sockets are closed."""

    def test_failing_server_stops_at_the_bound_without_waiting_for_retries(self, mgsm_dir: Path) -> None:
        """A server failing every request (HTTP 500) at concurrency 64 over 250 questions: the 13th failed
        request (over 5% of 250) stops the run. Retries back off 2.5-5 s, so a stop that waited for them
        would send more than the 64 first attempts and take over 2.5 s."""
        ds = _small(load_en(mgsm_dir), 250)
        cfg = ClientConfig(concurrency=64, backoff_s=5.0, backoff_max_s=5.0, progress=False)
        with serve(lambda m, p, b: MODELS if p == "/v1/models" else Answer(500, {"e": 1})) as srv:
            started = time.monotonic()
            with pytest.raises(EvalAborted) as info:
                run_mgsm(srv.url, ds, config=cfg)
            elapsed = time.monotonic() - started
        assert info.value.reason.startswith("13 different requests failed in a row with no answer between")
        assert "more than the 5% error bound allows of 250" in info.value.reason
        assert srv.count("/v1/chat/completions") <= 64  # first attempts only: no retry was waited for
        partial = info.value.partial
        assert isinstance(partial, EvalResult) and partial.answered == 0
        assert partial.retry_counts.retries == 0
        assert elapsed < 2.5

    def test_flaky_first_attempts_in_a_row_do_not_stop_a_small_eval(self, mgsm_dir: Path) -> None:
        """40 questions (error bound 2) where the first 6 first attempts all fail with HTTP 500 and every
        retry is answered: six failures in a row, more than the bound, yet under the trip floor, so nothing
        is stopped and every question is answered (the fault benchmark's ``secrets`` case once exited 3
        here: three 500s that completed in a row stopped the run)."""
        ds = _small(load_en(mgsm_dir), 40)
        model = Model(ds, right=set(range(40)))
        firsts: list[str] = []
        lock = threading.Lock()

        def flaky(m: str, p: str, b: Any) -> Answer:
            if p == "/v1/chat/completions":
                with lock:
                    first = question_of(b) not in firsts
                    if first:
                        firsts.append(question_of(b))
                    fail = first and len(firsts) <= 6
                if fail:
                    return Answer(500, {"e": "flaky"})  # at once, so the six arrive before any answer
                time.sleep(0.2)
            return model(m, p, b)

        cfg = ClientConfig(concurrency=40, backoff_s=0.01, backoff_max_s=0.02, progress=False)
        assert TRIP_FLOOR > 6
        with serve(flaky) as srv:
            result = run_mgsm(srv.url, ds, config=cfg, model="m")
        assert (result.answered, result.errors) == (40, 0)
        assert result.retry_counts.retries == 6

    def test_retries_are_counted_by_cause(self, mgsm_dir: Path) -> None:
        """Every question answered after one 503: no errors, but 20 retries reported, all ``HTTP 503``."""
        ds = _small(load_en(mgsm_dir), 20)
        model = Model(ds, right=set(range(20)))
        seen: set[str] = set()
        lock = threading.Lock()

        def flaky(m: str, p: str, b: Any) -> Answer:
            if p == "/v1/chat/completions":
                with lock:
                    first = question_of(b) not in seen
                    seen.add(question_of(b))
                if first:
                    return Answer(503, {"e": "busy"})
            return model(m, p, b)

        cfg = ClientConfig(
            concurrency=4, backoff_s=0.01, backoff_max_s=0.02, max_error_rate=1.0, progress=False
        )
        with serve(flaky) as srv:
            result = run_mgsm(srv.url, ds, config=cfg, model="m")
        assert (result.answered, result.errors) == (20, 0)
        assert result.retry_counts == RetryCounts(attempts=40, retries=20, by_cause=(("HTTP 503", 20),))
        assert result.retries == 20
        assert result.retry_counts.describe() == "20 retries (HTTP 503 x20)"
        assert all(r.attempts == 2 for r in result.records)

    def test_sockets_closed_without_the_garbage_collector(self, mgsm_dir: Path) -> None:
        """With the collector off, an aborted run (connections cut mid-request) leaves no descriptor open
        once it returns: every socket is closed by the client, none waits in a reference cycle."""
        ds = _small(load_en(mgsm_dir), 60)
        fds = Path("/proc/self/fd")
        if not fds.exists():
            pytest.skip("needs /proc/self/fd")
        counter = itertools.count()

        def handler(m: str, p: str, b: Any) -> Answer:
            if p == "/v1/models":
                return MODELS
            return Answer(500, {}) if next(counter) % 2 else Answer(200, {"choices": []}, delay_s=0.05)

        cfg = ClientConfig(concurrency=16, backoff_s=0.01, backoff_max_s=0.02, progress=False)
        with serve(handler) as srv:
            gc.collect()
            gc.disable()
            try:
                before = len(os.listdir(fds))
                with pytest.raises(EvalAborted):
                    run_mgsm(srv.url, ds, config=cfg)
                deadline = time.monotonic() + 5.0  # the server's side closes when it reads our FIN
                while len(os.listdir(fds)) > before and time.monotonic() < deadline:
                    time.sleep(0.02)
                after = len(os.listdir(fds))
            finally:
                gc.enable()
        assert after <= before

    def test_descriptor_limit_caps_concurrency(self, mgsm_dir: Path, tmp_path: Path) -> None:
        """At ``ulimit -n 128``, concurrency 256 runs (fewer at once, with a warning) instead of dying with
        "Too many open files"."""
        pytest.importorskip("resource")
        ds = _small(load_en(mgsm_dir), 250)
        model = Model(ds, right=set(range(250)))
        script = textwrap.dedent(
            f"""
            import resource, sys
            resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
            from mlaprop.evalclient import ClientConfig, run_mgsm
            from mlaprop.mgsm import load_dataset
            ds = load_dataset({ds.path!r}, "en")
            cfg = ClientConfig(concurrency=256, progress=False)
            r = run_mgsm(sys.argv[1], ds, config=cfg, model="m")
            print(r.answered, r.errors, r.concurrency)
            """
        )
        with serve(model) as srv:
            done = subprocess.run(
                [sys.executable, "-c", script, srv.url], capture_output=True, text=True, timeout=120
            )
        assert done.returncode == 0, done.stderr
        answered, errors, concurrency = (int(x) for x in done.stdout.split())
        assert (answered, errors) == (250, 0)
        assert 1 <= concurrency < 128
        assert "open-file limit (ulimit -n) leaves room for" in done.stderr
        assert "Traceback" not in done.stderr


class TestServerAddress:
    """A ``/v1`` base URL, a server still starting, and the default concurrency."""

    @pytest.mark.parametrize(
        ("given", "root"),
        [
            ("http://h:1", "http://h:1"),
            ("http://h:1/", "http://h:1"),
            ("http://h:1/v1", "http://h:1"),
            ("http://h:1/v1/", "http://h:1"),
            ("http://h:1/proxy/v1", "http://h:1/proxy"),
            ("http://h:1/v10", "http://h:1/v10"),
        ],
    )
    def test_server_root(self, given: str, root: str) -> None:
        """A trailing ``/v1`` (the OpenAI-style prefix) is dropped; nothing else is."""
        assert server_root(given) == root

    def test_v1_base_url_does_not_double_the_prefix(self, mgsm_dir: Path) -> None:
        """``--base-url http://host:port/v1`` asks for ``/v1/models``, never ``/v1/v1/models``."""
        ds = _small(load_en(mgsm_dir), 3)
        model = Model(ds, right={0, 1, 2})
        with serve(model) as srv:
            result = run_mgsm(srv.url + "/v1/", ds, config=FAST)
        assert result.answered == 3
        assert srv.count("/v1/models") == 1 and srv.count("/v1/chat/completions") == 3
        assert not [p for p, _, _ in srv.bodies if p.startswith("/v1/v1")]

    def test_waits_while_the_server_says_it_is_starting(self, mgsm_dir: Path) -> None:
        """``/health`` answers 503 for 1.2 s: the eval waits (saying so) and then runs, instead of giving
        up after its ~3 s of retries on a model list that is not there yet."""
        ds = _small(load_en(mgsm_dir), 4)
        model = Model(ds, right=set(range(4)))
        ready_at = time.monotonic() + 1.2

        def starting(m: str, p: str, b: Any) -> Answer:
            if time.monotonic() < ready_at:
                return Answer(503, {"detail": "starting"})
            return Answer(body={}) if p == "/health" else model(m, p, b)

        notes: list[str] = []
        cfg = ClientConfig(concurrency=4, max_retries=1, backoff_s=0.01, alive_poll_s=0.1, progress=False)
        with serve(starting) as srv:
            result = run_mgsm(srv.url, ds, config=cfg, notice=notes.append)
        assert result.answered == 4
        assert time.monotonic() >= ready_at
        assert notes and "says it is starting (GET /health: HTTP 503); waiting up to 600 s" in notes[0]
        assert srv.count("/v1/models") == 1  # asked once, after the wait

    def test_start_wait_is_bounded(self, mgsm_dir: Path) -> None:
        """A server that keeps saying it is starting stops the eval after ``startup_wait_s``, saying why."""
        ds = _small(load_en(mgsm_dir), 4)
        cfg = ClientConfig(startup_wait_s=0.5, alive_poll_s=0.1, progress=False)
        with serve(lambda m, p, b: Answer(503, {})) as srv:
            started = time.monotonic()
            with pytest.raises(EvalAborted, match=r"still says it is starting \(GET /health: HTTP 503\)"):
                run_mgsm(srv.url, ds, config=cfg, notice=lambda _: None)
            assert time.monotonic() - started < 3.0
            assert srv.count("/v1/chat/completions") == 0

    def test_server_info_lowers_the_default(self) -> None:
        """``/get_server_info`` with ``max_running_requests`` 32 makes the default 32; a server without
        the endpoint (404) or with a non-object answer gives ``None``, and the default stays one wave."""
        with serve(lambda m, p, b: Answer(body={"max_running_requests": 32, "version": "0.5.11"})) as srv:
            info = fetch_server_info(srv.url + "/v1")
        assert info is not None and default_concurrency(250, info) == 32
        assert srv.count("/get_server_info") == 1
        with serve(lambda m, p, b: Answer(404, {"detail": "Not Found"})) as srv:
            assert fetch_server_info(srv.url) is None
        with serve(lambda m, p, b: Answer(body=[1, 2])) as srv:
            assert fetch_server_info(srv.url) is None
        assert default_concurrency(250, None) == 250

    @pytest.mark.parametrize(
        ("n", "info", "expected"),
        [
            (250, None, 250),
            (5000, None, GATE_CONCURRENCY),
            (0, None, 1),
            (250, {"max_running_requests": 48}, 48),
            (
                250,
                {
                    "max_running_requests": None,
                    "internal_states": [{"effective_max_running_requests_per_dp": 96}],
                },
                96,
            ),
            (250, {"max_running_requests": 4096}, 250),
            (250, {"max_running_requests": True}, 250),
            (250, {"max_running_requests": -1}, 250),
            (250, {"max_running_requests": "48"}, 250),
        ],
    )
    def test_default_concurrency(self, n: int, info: dict[str, Any] | None, expected: int) -> None:
        """All questions in one wave (up to the gate's 1024), lowered to the server's own limit."""
        assert default_concurrency(n, info) == expected


def test_percentile() -> None:
    """Linear interpolation between closest ranks."""
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
