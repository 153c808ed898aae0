"""Tests for ``mlaprop.server``: the real launcher against the simulated SGLang server, on loopback.

Every scripted fault of :mod:`mlaprop.simserver` is driven through :func:`launch` / :func:`start`; each test
asserts the exception type, that it came within a generous functional bound, that the log tail names the
cause, that no process of the server survives (checked by pid with psutil, the re-parented grandchild
included) and that the port is bindable afterwards.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import psutil
import pytest
import requests

from mlaprop.compose import compose
from mlaprop.environment import AttentionBackend, Environment, LaunchPlan, Vendor
from mlaprop.server import (
    Server,
    ServerError,
    ServerExited,
    ServerPortInUse,
    ServerStartTimeout,
    Terminated,
    free_port,
    launch,
    port_is_bindable,
    start,
)

SIM = (sys.executable, "-m", "mlaprop.simserver")
GRACE = 0.5
SEED_ERROR = (
    "ValueError: Currently only ['flashinfer', 'fa3', 'triton'] attention backends are supported for "
    "deterministic inference, but you explicitly specified 'aiter'."
)


@pytest.fixture(autouse=True)
def _logs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary server logs (kept when a start fails) go to the test's folder, not /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def plan(*argv: str, env: dict[str, str] | None = None, model: str = "sim/model") -> LaunchPlan:
    """A minimal plan (the launcher only reads argv, env and model)."""
    return LaunchPlan(
        argv=argv,
        env=env or {},
        attention_backend=AttentionBackend.TRITON,
        deterministic="--enable-deterministic-inference" in argv,
        decisions=(),
        model=model,
    )


def run(p: LaunchPlan | None = None, *sim: str, **kwargs: object) -> AbstractContextManager[Server]:
    """``launch`` with the simulator and test-sized timings; ``sim`` are extra simulator flags."""
    options: dict[str, object] = {"command_prefix": SIM, "grace": GRACE, "ready_timeout": 15.0}
    options.update(kwargs)
    return launch(p or plan(), extra_args=list(sim), **options)  # type: ignore[arg-type]


def logged_pids(server: Server) -> list[int]:
    """Pids the simulator logged for its children and grandchild."""
    pids = []
    for line in server.log_tail(200):
        for marker in ("grandchild pid ", "child pid "):
            if marker in line:
                pids.append(int(line.split(marker)[1].split()[0]))
                break
    return pids


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        assert status == psutil.STATUS_ZOMBIE, f"process {pid} survived teardown ({status})"


def assert_clean(server: Server, extra: list[int] | None = None) -> None:
    assert_gone([server.pid, *(extra or [])])
    assert port_is_bindable(server.host, server.port)


def capture(exc_type: type[BaseException], fn: object) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        fn()  # type: ignore[operator]
    return info.value, time.monotonic() - t0


class TestReady:
    """Tests for readiness: ``launch`` returns only when ``/health_generate`` answers 200."""

    def test_yields_a_serving_handle_and_cleans_up(self, tmp_path: Path) -> None:
        """The handle names a live process and a URL that serves; afterwards both are gone."""
        log = tmp_path / "server.log"
        with run(log_path=log) as server:
            assert server.alive() and server.returncode is None
            assert server.base_url == f"http://127.0.0.1:{server.port}"
            assert requests.get(f"{server.base_url}/health_generate", timeout=5).status_code == 200
            models = requests.get(f"{server.base_url}/v1/models", timeout=5).json()
            assert models["data"][0]["id"] == "sim/model"
            assert any("fired up and ready to roll" in line for line in server.log_tail())
            assert server.log_path == log
        assert not server.alive()
        assert_clean(server)
        assert log.read_text().startswith("$ ")

    def test_temporary_log_is_removed_by_a_clean_stop_only(self) -> None:
        """Without ``log_path``: a clean stop removes the temporary log; a failed start keeps it."""
        with run() as server:
            assert server.log_path.is_file()
        assert not server.log_path.exists()
        with pytest.raises(ServerExited) as info:
            run(None, "--sim-crash-at-start", "1").__enter__()
        assert info.value.log_path is not None and info.value.log_path.is_file()
        info.value.log_path.unlink()

    def test_waits_for_a_slow_server(self) -> None:
        """A server healthy only after 0.6 s is waited for, and returned soon after it is ready."""
        t0 = time.monotonic()
        with run(None, "--sim-healthy-after", "0.6") as server:
            waited = time.monotonic() - t0
            assert 0.6 <= waited < 3.6
        assert_clean(server)

    def test_v1_models_answering_early_is_not_readiness(self) -> None:
        """``/v1/models`` answering 200 while ``/health_generate`` does not: launch keeps waiting."""
        t0 = time.monotonic()
        with run(None, "--sim-models-early", "--sim-healthy-after", "0.6") as server:
            assert time.monotonic() - t0 >= 0.6
        assert_clean(server)

    def test_never_healthy_times_out_with_the_log_tail(self) -> None:
        """A server that never becomes healthy raises ServerStartTimeout at the timeout, not later."""
        exc, took = capture(
            ServerStartTimeout,
            lambda: run(None, "--sim-never-healthy", "--sim-models-early", ready_timeout=0.6).__enter__(),
        )
        assert isinstance(exc, ServerStartTimeout)
        assert 0.6 <= took < 0.6 + GRACE + 3.0
        assert str(exc).splitlines()[0].startswith("server not ready after 0.")
        assert "never answered 200 (last answer: HTTP 503)" in str(exc).splitlines()[0]
        assert any("--sim-never-healthy" in line for line in exc.log_tail)
        assert exc.log_path is not None and exc.pid is not None
        assert_gone([exc.pid])

    def test_odd_cuda_visible_devices_do_not_matter(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Port selection never reads CUDA_VISIBLE_DEVICES (SGLang's breaks on these values)."""
        for value in ("", "GPU-3b1f2c5e-7d0a-4e1b-9c2d-1234567890ab", "10,11", "-1"):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
            port = free_port()
            assert 20000 <= port < 32768
            assert port_is_bindable("127.0.0.1", port)
        with run() as server:
            assert server.alive()
        assert_clean(server)

    def test_plan_env_is_merged_onto_the_parent_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The server sees this process's variables, the plan's and the caller's overrides."""
        monkeypatch.setenv("MLAPROP_TEST_PARENT", "parent")
        p = plan(env={"SGLANG_ENABLE_DETERMINISTIC_INFERENCE": "1", "MLAPROP_TEST_OVERRIDE": "plan"})
        with run(p, env={"MLAPROP_TEST_OVERRIDE": "caller"}) as server:
            seen = psutil.Process(server.pid).environ()
        assert seen["MLAPROP_TEST_PARENT"] == "parent"
        assert seen["SGLANG_ENABLE_DETERMINISTIC_INFERENCE"] == "1"
        assert seen["MLAPROP_TEST_OVERRIDE"] == "caller"
        assert server.command.startswith(
            "SGLANG_ENABLE_DETERMINISTIC_INFERENCE=1 MLAPROP_TEST_OVERRIDE=caller "
        )

    @pytest.mark.parametrize("flag", ["--port", "--host", "--model-path", "--port=1234"])
    def test_launcher_flags_in_the_plan_are_refused(self, flag: str) -> None:
        """The plan cannot set what the launcher owns."""
        with pytest.raises(ValueError, match="belongs to the launcher"):
            start(plan(flag, "1") if "=" not in flag else plan(flag), command_prefix=SIM)


class TestExit:
    """Tests for a server that exits before it is ready: ServerExited, fast, with the cause."""

    @pytest.mark.parametrize("rc", [1, 0, 3])
    def test_crash_at_start_is_reported_with_its_exit_code(self, rc: int) -> None:
        """Any exit code, 0 included, raises ServerExited well before any timeout."""
        exc, took = capture(ServerExited, lambda: run(None, "--sim-crash-at-start", str(rc)).__enter__())
        assert isinstance(exc, ServerExited)
        assert exc.returncode == rc
        assert took < 3.0
        assert str(exc).splitlines()[0].startswith(f"server exited with code {rc} before it was ready")
        assert "simulated crash at start-up" in str(exc).splitlines()[0]
        exit_time = float(next(line for line in exc.log_tail if "simulated crash" in line).split("t=")[1])
        assert time.time() - exit_time < 3.0

    def test_seed_failure_deterministic_on_rocm_sglang_0_5_11(self, tmp_path: Path) -> None:
        """The CI failure end to end: deterministic inference on ROCm with SGLang 0.5.11 rules makes the
        server exit with SGLang's ValueError, and the launcher reports it within a second of the exit."""
        stamp = tmp_path / "exit_time"
        # a shell wrapper records the wall-clock moment the simulated server process exited
        prefix = (
            "sh",
            "-c",
            f'"$0" -m mlaprop.simserver "$@"; rc=$?; date +%s.%N > {stamp}; exit $rc',
            sys.executable,
        )
        p = plan("--trust-remote-code", "--kv-cache-dtype", "fp8_e5m2", "--enable-deterministic-inference")
        exc, took = capture(
            ServerExited,
            lambda: run(
                p, "--sim-platform", "rocm", "--sim-sglang-version", "0.5.11", command_prefix=prefix
            ).__enter__(),
        )
        reported = time.time()
        assert isinstance(exc, ServerExited)
        assert exc.returncode == 1
        assert str(exc).splitlines()[0].endswith(SEED_ERROR)
        assert exc.log_tail[-1] == SEED_ERROR
        assert reported - float(stamp.read_text()) < 1.0
        assert took < 3.0

    def test_composed_rocm_plan_starts_where_the_deterministic_one_fails(self) -> None:
        """The plan ``compose`` makes for ROCm + SGLang 0.5.11 leaves the flag out, starts and serves."""
        env = Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, sglang_version="0.5.11")
        p = compose(env)
        assert not p.has_flag("--enable-deterministic-inference")
        with run(p, "--sim-platform", "rocm", "--sim-arch", "gfx942", "--sim-sglang-version", "0.5.11") as s:
            assert f"Attention backend: {p.attention_backend}" in "\n".join(s.log_tail())
        assert_clean(s)

    def test_composed_nvidia_plan_starts_on_the_predicted_backend(self) -> None:
        """The default NVIDIA plan (deterministic, fp8_e5m2) starts; the simulator resolves the backend
        ``compose`` predicted."""
        p = compose(Environment())
        assert p.has_flag("--enable-deterministic-inference")
        with run(p, "--sim-sglang-version", p.sglang_version) as server:
            assert f"Attention backend: {p.attention_backend}" in "\n".join(server.log_tail())
        assert_clean(server)

    def test_invalid_kv_cache_dtype_is_a_usage_error(self) -> None:
        """argparse's exit 2 and its message reach the caller."""
        exc, took = capture(ServerExited, lambda: run(plan("--kv-cache-dtype", "fp9")).__enter__())
        assert isinstance(exc, ServerExited)
        assert exc.returncode == 2
        assert "invalid choice: 'fp9'" in str(exc).splitlines()[0]
        assert took < 3.0

    def test_missing_command_is_a_server_error(self) -> None:
        """A command that cannot run raises ServerError naming it."""
        with pytest.raises(ServerError, match="could not run the server command"):
            start(plan(), command_prefix=("/nonexistent/python-mlaprop",))

    def test_exit_while_serving_is_reported_by_check(self) -> None:
        """A server that dies after K requests: ``check()`` raises ServerExited with the cause."""
        with run(None, "--sim-die-after-requests", "2") as server:
            url = f"{server.base_url}/generate"
            for _ in range(2):
                body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
                assert requests.post(url, json=body, timeout=5).status_code == 200
            deadline = time.monotonic() + 3.0
            while server.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(ServerExited) as info:
                server.check()
            assert info.value.returncode == 1
            assert "simulated crash after 2 generation requests" in str(info.value).splitlines()[0]
            with pytest.raises(requests.ConnectionError):
                requests.post(url, json=body, timeout=5)
        assert_clean(server)


class TestTeardown:
    """Tests for teardown: every process gone and the port free, on every way out."""

    def test_grandchild_in_another_session_is_found_and_killed(self) -> None:
        """A double-forked grandchild in a new session holding the server's listening socket, and
        children in the group, are all gone when teardown returns; the port is free."""
        with run(None, "--sim-grandchild", "--sim-children", "2") as server:
            pids = logged_pids(server)
            assert len(pids) == 3
            grandchild = psutil.Process(pids[0])
            assert grandchild.ppid() != server.pid
            assert os.getsid(grandchild.pid) != server.pid
            t0 = time.monotonic()
        assert time.monotonic() - t0 < GRACE + 3.0
        assert_clean(server, pids)

    def test_processes_ignoring_sigterm_are_killed_after_the_grace(self) -> None:
        """Server and grandchild ignore SIGTERM: SIGKILL after ``grace``; teardown within grace + bound."""
        sim = ("--sim-ignore-sigterm", "--sim-grandchild", "--sim-grandchild-ignore-sigterm")
        with run(None, *sim) as server:
            pids = logged_pids(server)
            t0 = time.monotonic()
        took = time.monotonic() - t0
        assert GRACE <= took < GRACE + 3.0
        assert server.returncode == -signal.SIGKILL
        assert_clean(server, pids)

    def test_exception_in_the_block_tears_down_and_propagates(self) -> None:
        """An exception leaves the block after teardown, unchanged."""
        with pytest.raises(RuntimeError, match="boom"), run(None, "--sim-grandchild") as server:
            pids = logged_pids(server)
            raise RuntimeError("boom")
        assert_clean(server, pids)

    def test_keyboard_interrupt_tears_down(self) -> None:
        """Ctrl-C in the block tears the server down and still propagates."""
        with pytest.raises(KeyboardInterrupt), run(None, "--sim-children", "1") as server:
            pids = logged_pids(server)
            raise KeyboardInterrupt
        assert_clean(server, pids)

    def test_sigterm_to_this_process_while_serving(self) -> None:
        """SIGTERM to the test process becomes Terminated in the main thread; the server is torn down and
        the previous SIGTERM handler is back afterwards."""
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Terminated) as info, run(None, "--sim-grandchild") as server:
            pids = logged_pids(server)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler long before this ends
        assert info.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == before
        assert_clean(server, pids)

    def test_sighup_to_this_process_while_serving(self) -> None:
        """SIGHUP (a closed terminal, a cancelled CI job) tears down like SIGTERM and exits 129."""
        before = signal.getsignal(signal.SIGHUP)
        with pytest.raises(Terminated) as info, run(None, "--sim-grandchild") as server:
            pids = logged_pids(server)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # interrupted by the handler long before this ends
        assert info.value.code == 128 + signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) == before
        assert_clean(server, pids)

    def test_a_killed_watchdog_takes_the_server_and_teardown_finds_the_rest(self) -> None:
        """SIGKILL to the watchdog: the server dies with it (parent-death signal), and teardown still
        finds its children and the grandchild (process group, session, sampled tree)."""
        with run(None, "--sim-grandchild", "--sim-children", "2") as server:
            pids = logged_pids(server)
            time.sleep(0.6)  # a few samples of the tree
            os.kill(server.watchdog_pid, signal.SIGKILL)
            deadline = time.monotonic() + 3.0
            while server.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.returncode == -signal.SIGKILL
        assert_clean(server, pids)

    def test_sigterm_while_waiting_for_readiness(self) -> None:
        """SIGTERM during the readiness wait stops the wait, tears down and raises Terminated."""
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            exc, took = capture(Terminated, lambda: run(None, "--sim-never-healthy").__enter__())
        finally:
            timer.cancel()
        assert took < 3.0
        assert isinstance(exc, Terminated)

    def test_start_and_stop(self) -> None:
        """The plain API: ``start`` returns a ready server; ``stop`` is idempotent."""
        server = start(plan(), command_prefix=SIM, grace=GRACE)
        try:
            assert requests.get(f"{server.base_url}/health", timeout=5).status_code == 200
        finally:
            server.stop()
        server.stop()
        assert_clean(server)
        with start(plan(), command_prefix=SIM, grace=GRACE) as again:
            assert again.alive()
        assert_clean(again)


class TestPorts:
    """Tests for port selection and the EADDRINUSE retry."""

    @staticmethod
    def _listener() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        return s

    def test_port_in_use_is_retried_on_a_new_port(self) -> None:
        """The first port is taken: the server fails to bind, the launcher relaunches on another port."""
        with self._listener() as busy:
            taken = busy.getsockname()[1]
            picks = iter([taken, free_port()])
            with run(port_picker=lambda host: next(picks)) as server:
                assert server.port != taken
                log = "\n".join(server.log_tail(100))
                assert "address already in use" in log
                assert f"--port {taken}" in log
            assert_clean(server)

    def test_a_port_the_caller_named_is_not_moved(self) -> None:
        """With ``port=`` given and taken, ServerPortInUse comes at once."""
        with self._listener() as busy:
            taken = busy.getsockname()[1]
            exc, took = capture(ServerPortInUse, lambda: run(port=taken).__enter__())
        assert isinstance(exc, ServerPortInUse)
        assert f"port {taken} on 127.0.0.1 is already in use" in str(exc).splitlines()[0]
        assert took < 3.0

    def test_port_attempts_are_bounded(self) -> None:
        """A picker that always returns a busy port: exactly ``port_attempts`` launches, then the error."""
        calls = []
        with self._listener() as busy:
            taken = busy.getsockname()[1]

            def picker(host: str) -> int:
                calls.append(host)
                return int(taken)

            with pytest.raises(ServerPortInUse):
                run(port_picker=picker, port_attempts=2).__enter__()
        assert calls == ["127.0.0.1", "127.0.0.1"]


class TestSecrets:
    """Tests for redaction in the printed command, the mirrored log and error messages."""

    SECRET = "sk-mlaprop-test-5f2c9a"
    TOKEN = "hf_AbCdEfGhIjKlMnOpQrSt"

    def test_mirrored_log_and_command_hide_secrets(self, tmp_path: Path) -> None:
        """Echoed lines, the log file and the command show ``***``; the echo gets the file's lines."""
        out = io.StringIO()
        p = plan("--api-key", self.SECRET, env={"HF_TOKEN": self.TOKEN})
        with run(p, echo=out, log_path=tmp_path / "log") as server:
            assert self.SECRET not in server.command and self.TOKEN not in server.command
            assert "--api-key '***'" in server.command or "--api-key ***" in server.command
            headers = {"Authorization": f"Bearer {self.SECRET}"}
            assert requests.get(f"{server.base_url}/v1/models", headers=headers, timeout=5).status_code == 200
        echoed = out.getvalue()
        assert "fired up and ready to roll" in echoed
        assert "api_key='***'" in echoed
        assert self.SECRET not in echoed and self.TOKEN not in echoed
        written = (tmp_path / "log").read_text()
        assert self.SECRET not in written and self.TOKEN not in written
        assert "api_key='***'" in written
        assert echoed.splitlines() == written.splitlines()[1:]  # the file starts with the command

    def test_error_messages_hide_secrets(self) -> None:
        """ServerExited's message and log tail never carry the key."""
        p = plan("--api-key", self.SECRET, env={"HF_TOKEN": self.TOKEN})
        with pytest.raises(ServerExited) as info:
            run(p, "--sim-crash-at-start", "1").__enter__()
        text = str(info.value)
        assert "api_key='***'" in text
        assert self.SECRET not in text and self.TOKEN not in text
