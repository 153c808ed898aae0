"""The fast cases of the fault matrix (``benchmarks/faults.py``) as tests, with generous bounds.

The server is the fake SGLang in ``tests/fakes`` (mlaprop's simulated server plus fault switches); each
test asserts on pids (the re-parented, empty-environment grandchild included), ports, exit codes and the
text mlaprop writes, never on "it ran".
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from mlaprop.redact import Redactor, _encodings
from mlaprop.server import (
    ServerExited,
    ServerPortInUse,
    ServerPortTaken,
    free_port,
    launch,
    port_is_bindable,
)
from mlaprop.watchdog import descendants

ROOT = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
FAKE = (sys.executable, "-m", "sglang.launch_server")
API_KEY = "sk-faults-test-Kq81xZ"
OPENAI = "sk-openai-faults-Pw42vN"
GRACE = 0.5

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake SGLang on ``PYTHONPATH``; yields the events file it appends to."""
    events = tmp_path / "events"
    path = os.pathsep.join([str(FAKES), str(ROOT), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("FAKE_SGLANG_EVENTS", str(events))
    monkeypatch.setenv("FAKE_SGLANG_FAULTS", "")
    monkeypatch.setenv("FAKE_SGLANG_SIM_ARGS", "")
    yield events


def read_events(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def event_pids(events: Path) -> list[int]:
    return [int(line.split()[1]) for line in read_events(events) if line.startswith("pid ")]


def event_ports(events: Path) -> list[int]:
    return [int(line.split()[1]) for line in read_events(events) if line.startswith("listen ")]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from mlaprop.server import launch
    sim = sys.argv[1:]
    with launch(None, "m", command_prefix=(sys.executable, "-m", "sglang.launch_server"), extra_args=sim,
                grace=0.5, ready_timeout=60) as server:
        print(server.watchdog_pid, server.pid, flush=True)
        time.sleep(60)
    """
)


class TestOwnDeath:
    """mlaprop dies (any signal, SIGKILL included): nothing of the server survives, no port stays bound."""

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
    @pytest.mark.parametrize("stage", ["launch", "serving"])
    def test_death_of_the_launcher_kills_the_whole_tree(
        self, fake: Path, monkeypatch: pytest.MonkeyPatch, sig: int, stage: str
    ) -> None:
        """Killed while the server starts or serves, with children and a re-parented grandchild in a new
        session with an empty environment that ignores SIGTERM: every process is gone within grace + 5 s
        and every port the tree listened on is bindable again."""
        monkeypatch.setenv("FAKE_SGLANG_FAULTS", "grandchild")
        sim = ["--sim-children", "2"] + (["--sim-healthy-after", "60"] if stage == "launch" else [])
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *sim], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        try:
            assert wait_for(lambda: any(e.endswith(" grandchild") for e in read_events(fake)), 30.0)
            if stage == "serving":
                assert holder.stdout is not None
                holder.stdout.readline()  # "watchdog server": ready

            def family() -> list[int]:
                tree = [p.pid for p in psutil.Process(holder.pid).children(recursive=True)]
                return sorted(set(tree + event_pids(fake)))

            assert wait_for(lambda: len(family()) >= 5, 10.0)  # watchdog, server, 2 children, grandchild
            pids = family()
            grandchild = next(int(e.split()[1]) for e in read_events(fake) if e.endswith(" grandchild"))
            assert psutil.Process(grandchild).ppid() != holder.pid
            assert os.getsid(grandchild) != os.getsid(holder.pid)
            t0 = time.monotonic()
            holder.send_signal(sig)
            holder.wait(timeout=30)
            gone = wait_for(lambda: not any(alive(p) for p in pids), GRACE + 5.0)
            took = time.monotonic() - t0
        finally:
            holder.kill()
            holder.wait()
        assert gone, f"survivors after {signal.Signals(sig).name}: {[p for p in pids if alive(p)]}"
        assert took < GRACE + 5.0
        for port in event_ports(fake):
            assert wait_for(lambda port=port: port_is_bindable("127.0.0.1", port), 5.0), port

    def test_watchdog_descendants_include_reparented_processes(
        self, fake: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The watchdog is the subreaper: the double-forked grandchild is its descendant, not PID 1's."""
        monkeypatch.setenv("FAKE_SGLANG_FAULTS", "grandchild,polite")
        with launch(None, "m", command_prefix=FAKE, grace=GRACE, ready_timeout=30) as server:
            assert wait_for(lambda: any(e.endswith(" grandchild") for e in read_events(fake)), 10.0)
            grandchild = next(int(e.split()[1]) for e in read_events(fake) if e.endswith(" grandchild"))
            assert wait_for(lambda: grandchild in descendants(server.watchdog_pid), 5.0)
            assert psutil.Process(grandchild).environ() == {}
            assert grandchild in {p.pid for p in server.tree()}
        assert not alive(grandchild)


class TestPorts:
    """Readiness means our server; a port that is busy on every attempt says so first."""

    def test_foreign_server_on_the_port_is_not_ready(self, fake: Path) -> None:
        """Another program answering 200 on the port the server should use: ServerPortTaken naming it."""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        port = free_port()
        foreign = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=foreign.serve_forever, daemon=True).start()
        t0 = time.monotonic()
        try:
            with (
                pytest.raises(ServerPortTaken) as info,
                launch(
                    None,
                    "m",
                    command_prefix=FAKE,
                    port=port,
                    extra_args=["--sim-import-delay", "3"],
                    grace=GRACE,
                    ready_timeout=30,
                ),
            ):
                pass
        finally:
            foreign.shutdown()
            foreign.server_close()
        assert time.monotonic() - t0 < 3.0
        headline = str(info.value).splitlines()[0]
        assert headline.startswith(f"port {port} is served by PID {os.getpid()} (")
        assert "not the launched server" in headline
        assert info.value.owner_pid == os.getpid()
        assert not alive(info.value.pid or 0)

    def test_port_busy_on_every_attempt_names_the_cause_first(
        self, fake: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every attempt fails to bind: ServerPortInUse whose first line is the cause, within seconds, after
        exactly ``port_attempts`` launches, and nothing printed before it."""
        monkeypatch.setenv("FAKE_SGLANG_FAULTS", "port-busy")
        t0 = time.monotonic()
        with pytest.raises(ServerPortInUse) as info, launch(None, "m", command_prefix=FAKE, grace=GRACE):
            pass
        assert time.monotonic() - t0 < 5.0
        assert "address already in use" in str(info.value).splitlines()[0]
        assert sum(1 for e in read_events(fake) if e.endswith(" server")) == 3
        assert capsys.readouterr().err == ""


class TestLogs:
    """The live log: redacted as written, bounded, mirrored line for line."""

    def test_echoed_secrets_never_reach_log_mirror_or_errors(
        self, fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A server echoing its --api-key and OPENAI_API_KEY bare, repr'd, JSON-escaped and URL-encoded:
        no encoding of either is in the log file, the mirror, or a crash's error message."""
        monkeypatch.setenv("FAKE_SGLANG_FAULTS", "echo-secrets")
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI)
        forms = _encodings(API_KEY) | _encodings(OPENAI)
        out = io.StringIO()
        log = tmp_path / "server.log"
        args = ["--api-key", API_KEY]
        with launch(None, "m", command_prefix=FAKE, extra_args=args, echo=out, log_path=log, grace=GRACE):
            pass
        written = log.read_text()
        assert "using credential ***" in written and '{"credential": "***"' in written
        assert out.getvalue().splitlines() == written.splitlines()[1:]
        crash = [*args, "--sim-crash-at-start", "3"]
        with pytest.raises(ServerExited) as info, launch(None, "m", command_prefix=FAKE, extra_args=crash):
            pass
        for text in (written, out.getvalue(), str(info.value)):
            assert not [f for f in forms if f in text]

    def test_flood_is_cut_bounded_and_mirrored_whole(
        self, fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """30 MB of log, one line of 6 MB: the long line is cut and marked, every other line reaches the
        file and the mirror, and this process's peak RSS grows by far less than the flood."""
        import resource

        monkeypatch.setenv("FAKE_SGLANG_FAULTS", "flood")
        monkeypatch.setenv("FAKE_SGLANG_FLOOD_MB", "30")
        log = tmp_path / "server.log"
        mirror = tmp_path / "mirror.txt"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with (
            open(mirror, "w") as echo,
            launch(None, "m", command_prefix=FAKE, echo=echo, log_path=log, grace=GRACE),
        ):
            assert wait_for(lambda: "flood done" in read_events(fake), 60.0)
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        text = log.read_text()
        lines = text.count("Decode batch.")
        assert lines > 100_000
        assert mirror.read_text().count("Decode batch.") == lines
        assert "bytes cut]" in text and "flood done" in text
        assert max(len(line) for line in text.splitlines()) < 17 * 1024
        assert grew_mb < 25


class TestRedactorWiring:
    """The launcher's redactor: secrets from the command line, the environment and the caller."""

    def test_caller_secrets_are_masked_in_the_live_log(self, fake: Path, tmp_path: Path) -> None:
        """A value only the caller knows (``redactor=``) is masked in what the server prints."""
        log = tmp_path / "server.log"
        with launch(
            None,
            "m",
            command_prefix=FAKE,
            extra_args=["--served-model-name", "callers-own-secret-xyz"],
            log_path=log,
            grace=GRACE,
            redactor=Redactor(("callers-own-secret-xyz",)),
        ) as server:
            assert "callers-own-secret-xyz" not in server.command
        assert "callers-own-secret-xyz" not in log.read_text()
        assert "served_model_name='***'" in log.read_text()

    def test_a_callers_plain_redactor_runs_on_the_live_log(self, fake: Path, tmp_path: Path) -> None:
        """Any ``str -> str`` (a job's redactor) given as ``redactor=`` is applied to every log line."""
        log = tmp_path / "server.log"
        with launch(
            None,
            "m",
            command_prefix=FAKE,
            extra_args=["--served-model-name", "plainvalue123"],
            log_path=log,
            grace=GRACE,
            redactor=lambda text: text.replace("plainvalue123", "[hidden]"),
        ):
            pass
        assert "plainvalue123" not in log.read_text()
        assert "served_model_name='[hidden]'" in log.read_text()
