"""The fault matrix: ``mlaprop run`` against a hostile fake SGLang, and mlaprop's own death.

Run from the repository root: ``python benchmarks/faults.py [--quick] [--cases a,b]`` (about 2 minutes;
``--quick`` leaves out the 100 MB flood). The fake is ``tests/fakes/sglang/launch_server.py``, found as
``python -m sglang.launch_server`` through ``PYTHONPATH`` exactly as real SGLang would be; it is mlaprop's
simulated server plus the fault switches its docstring lists. Every run carries three secrets (an
``--api-key``, ``OPENAI_API_KEY`` and ``HF_TOKEN``).

Cases: mlaprop killed by SIGKILL / SIGHUP / SIGTERM / SIGINT while the server starts (``launch``: it never
becomes ready) and while MGSM runs (``eval``), the server tree holding children and a re-parented grandchild
with an empty environment that ignores SIGTERM (so teardown waits the 10 s grace before SIGKILL;
``-polite``: the grandchild obeys SIGTERM); ``grandchild`` (the same grandchild, a normal run);
``secrets`` (the server echoes every secret bare, repr'd, JSON-escaped, URL-encoded, in tracebacks and in
the body of every 3rd answer, an HTTP 500; ``secrets-abort``: every answer, so the eval stops at the
error bound and the error bodies reach the report); ``flood`` (100 MB of log while MGSM runs, one line of 20 MB, mirrored with
``--server-log``); ``foreign`` (another program answers on the server's port first); ``port-busy`` (the
server fails to bind on every attempt).

Per case it prints: handled (the case's own criterion, below, and no survivor, no bound port), the exit code,
seconds from the fault to the moment mlaprop had exited and every process of the tree was gone (for cases
without an injected fault: the whole run), survivors (processes of the tree alive 15 s after mlaprop exited),
ports still bound, secret occurrences in stdout, stderr and every file of the report folder (in any
encoding; ``where`` names the files), and mlaprop's peak RSS (``VmHWM``). Targets: every case handled, 0
survivors, 0 secrets, peak RSS under 100 MB with the flood. Exits 1 if a target is missed.

Handled means, besides no survivor and no port: kills: exit code 128+signal (SIGKILL: -9) and, for the
signals mlaprop can catch, a report whose status is not ``running``; ``flood``: the mirror on stderr has as
many flood lines as ``server.log`` and the 20 MB line is cut and marked; ``foreign``: the first stderr line
says the port is served by another process; ``port-busy``: the first stderr line names "address already in
use", within 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mlaprop.redact import _encodings  # noqa: E402
from mlaprop.server import port_is_bindable  # noqa: E402

FAKES = ROOT / "tests" / "fakes"
DATASET = ROOT.parent / "shared" / "data" / "mgsm" / "mgsm_en.tsv"
# characters that every encoding spells differently (URL: / + = ; JSON and repr: " \\), so a form that
# is masked only bare shows up in the count
API_KEY = 'sk-fault/api+key="7Qz\\9xW2'
SECRETS = {
    "OPENAI_API_KEY": "sk-openai/fault+Vb8=1Kq0",
    "HF_TOKEN": "hf_FaultMatrixTokenAbCdEf123",
}
SURVIVOR_WAIT = 15.0


@dataclass
class Case:
    name: str
    faults: str = ""
    sim_args: str = ""
    limit: int = 40
    signum: int | None = None
    stage: str | None = None  # "launch" or "eval": when to send the signal
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Outcome], str | None] | None = None  # extra criterion: None when met, else why not


@dataclass
class Outcome:
    case: Case
    rc: int
    seconds: float
    survivors: list[int]
    ports: list[int]
    secrets: dict[str, int]
    peak_rss_mb: float
    stdout: str
    stderr_head: list[str]
    report: Path
    problem: str | None = None

    @property
    def handled(self) -> bool:
        return self.problem is None and not self.survivors and not self.ports


class ForeignServer:
    """Another program: takes the port named by each ``<port>.want`` file in a folder and answers 200."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"foreign": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[ThreadingHTTPServer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            for want in self.folder.glob("*.want"):
                port = int(want.stem)
                want.unlink()
                with contextlib.suppress(OSError):
                    srv = ThreadingHTTPServer(("127.0.0.1", port), self.Handler)
                    self.servers.append(srv)
                    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


def events(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def count_secrets(texts: dict[str, str]) -> dict[str, int]:
    forms = set()
    for value in (API_KEY, *SECRETS.values()):
        forms |= _encodings(value)
    found = {}
    for where, text in texts.items():
        n = sum(text.count(f) for f in forms)
        if n:
            found[where] = n
    return found


def run_case(case: Case, work: Path) -> Outcome:
    report = work / case.name
    ev = work / f"{case.name}.events"
    foreign_dir = work / f"{case.name}.foreign"
    foreign_dir.mkdir()
    env = {
        **os.environ,
        **SECRETS,
        "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)]),
        "FAKE_SGLANG_FAULTS": case.faults,
        "FAKE_SGLANG_SIM_ARGS": case.sim_args,
        "FAKE_SGLANG_EVENTS": str(ev),
        "FAKE_SGLANG_DATASET": str(DATASET),
        "FAKE_SGLANG_FOREIGN": str(foreign_dir),
        **case.env,
    }
    model = work / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    argv = [
        sys.executable, "-c", "import sys; from mlaprop.cli import main; sys.exit(main())",
        "run", "--vendor", "nvidia", "--arch", "sm90", "--gpus", "1", "--sglang-version", "0.5.11",
        "--model", str(model), "--dataset", str(DATASET), "--limit", str(case.limit),
        "--report-dir", str(report), "--determinism", "off", "--ready-timeout", "60",
        "--server-args", f"--api-key {shlex.quote(API_KEY)}", *case.extra,
    ]  # fmt: skip
    foreign = ForeignServer(foreign_dir) if "foreign" in case.faults else None
    out_path, err_path = work / f"{case.name}.out", work / f"{case.name}.err"
    seen: dict[int, psutil.Process] = {}
    ports: set[int] = set()
    peak_kb = 0
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        me = psutil.Process(proc.pid)
        fault_at: float | None = None
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):  # IndexError: a zombie
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
            with contextlib.suppress(psutil.Error):
                for p in me.children(recursive=True):
                    seen.setdefault(p.pid, p)
            lines = events(ev)
            if case.signum is not None and fault_at is None:
                started = sum(1 for line in lines if line.endswith(" grandchild")) >= 1
                requests_seen = sum(1 for line in lines if line == "request")
                if (case.stage == "launch" and started) or (case.stage == "eval" and requests_seen >= 20):
                    time.sleep(0.2 if case.stage == "launch" else 0.0)
                    with contextlib.suppress(psutil.Error):
                        for p in me.children(recursive=True):
                            seen.setdefault(p.pid, p)
                    fault_at = time.monotonic()
                    os.kill(proc.pid, case.signum)
            if time.monotonic() - t0 > 300:
                proc.kill()
            time.sleep(0.02)
        exited = time.monotonic()
    rc = proc.returncode
    for line in events(ev):
        kind, _, value = line.partition(" ")
        if kind == "pid":
            pid = int(value.split()[0])
            with contextlib.suppress(psutil.Error):
                seen.setdefault(pid, psutil.Process(pid))
        elif kind == "listen":
            ports.add(int(value))
    # wait for the tree to go (the watchdog works after mlaprop is gone)
    deadline = exited + SURVIVOR_WAIT
    alive: list[int] = []
    gone_at = exited
    while True:
        alive = [pid for pid, p in seen.items() if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
        gone_at = time.monotonic()
    if foreign is not None:
        foreign.close()
    bound = sorted(p for p in ports if not port_is_bindable("127.0.0.1", p))
    for pid in alive:  # clean up after a failed case
        with contextlib.suppress(psutil.Error):
            seen[pid].kill()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    texts = {"stdout": stdout, "stderr": stderr}
    for f in sorted(report.rglob("*")) if report.exists() else []:
        if f.is_file():
            texts[f.name] = f.read_text(errors="replace")
    start = fault_at if fault_at is not None else t0
    outcome = Outcome(
        case=case,
        rc=rc,
        seconds=max(exited, gone_at) - start,
        survivors=alive,
        ports=bound,
        secrets=count_secrets(texts),
        peak_rss_mb=peak_kb / 1024,
        stdout=stdout,
        stderr_head=stderr.splitlines()[:3],
        report=report,
    )
    outcome.problem = _criterion(case, outcome)
    return outcome


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _criterion(case: Case, o: Outcome) -> str | None:
    if case.signum is not None:
        want = -signal.SIGKILL if case.signum == signal.SIGKILL else 128 + case.signum
        if o.rc != want:
            return f"exit code {o.rc}, expected {want}"
        if case.signum != signal.SIGKILL:
            with contextlib.suppress(OSError, ValueError):
                status = json.loads((o.report / "summary.json").read_text()).get("status")
                if status == "running":
                    return "summary.json still says running"
    return case.check(o) if case.check else None


def _flood_check(o: Outcome) -> str | None:
    log = (o.report / "server.log").read_text(errors="replace")
    in_log = log.count("Decode batch.")
    err = (o.report.parent / f"{o.case.name}.err").read_text(errors="replace")
    in_err = err.count("Decode batch.")
    if in_log == 0 or in_log != in_err:
        return f"mirror has {in_err} flood lines, server.log {in_log}"
    if "bytes cut]" not in log or "flood done" not in log:
        return "the long line was not cut and marked, or the flood did not finish"
    if o.peak_rss_mb >= 100:
        return f"peak RSS {o.peak_rss_mb:.0f} MB"
    return None


def _first_line_check(needle: str, within: float) -> Callable[[Outcome], str | None]:
    def check(o: Outcome) -> str | None:
        first = o.stderr_head[0] if o.stderr_head else ""
        if needle not in first:
            return f"first stderr line: {first[:120]!r}"
        if o.seconds > within:
            return f"took {o.seconds:.1f} s"
        return None

    return check


def _clean_run(o: Outcome) -> str | None:
    return None if o.rc in (0, 1) else f"exit code {o.rc}"


def _aborted_run(o: Outcome) -> str | None:
    """An eval stopped at the error bound: exit 3 (infrastructure), and (checked for every case) no secret."""
    return None if o.rc == 3 else f"exit code {o.rc}, expected 3 (aborted eval)"


def cases(quick: bool) -> list[Case]:
    hostile = "grandchild"
    out = []
    for stage, sim_args, limit in (
        ("launch", "--sim-children 2 --sim-healthy-after 120", 40),
        ("eval", "--sim-children 2 --sim-latency 0.05", 250),
    ):
        for sig in (signal.SIGKILL, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            out.append(
                Case(
                    f"{signal.Signals(sig).name.lower()}-{stage}",
                    faults=hostile,
                    sim_args=sim_args,
                    limit=limit,
                    signum=sig,
                    stage=stage,
                )
            )
    for sig in (signal.SIGKILL, signal.SIGTERM):
        name = f"{signal.Signals(sig).name.lower()}-eval-polite"
        out.append(
            Case(
                name,
                faults="grandchild,polite",
                sim_args="--sim-children 2 --sim-latency 0.05",
                limit=250,
                signum=sig,
                stage="eval",
            )
        )
    out.append(Case("grandchild", faults="grandchild", sim_args="--sim-children 2", check=_clean_run))
    out.append(Case("secrets", faults="echo-secrets", extra=("--server-log",), check=_clean_run))
    out.append(
        Case(
            "secrets-abort",
            faults="echo-secrets",
            env={"FAKE_SGLANG_ERROR_EVERY": "1"},
            check=_aborted_run,
        )
    )
    if not quick:
        out.append(
            Case(
                "flood",
                faults="flood",
                sim_args="--sim-latency 3",
                limit=250,
                # 4 waves of 3 s: the run must outlast the flood (one wave of 250 would end it first)
                extra=("--server-log", "--concurrency", "64"),
                env={"FAKE_SGLANG_FLOOD_HEAD_START": "1"},
                check=_flood_check,
            )
        )
    out.append(Case("foreign", faults="foreign", check=_first_line_check("not the launched server", 30.0)))
    out.append(Case("port-busy", faults="port-busy", check=_first_line_check("address already in use", 5.0)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out the 100 MB flood")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--verbose", action="store_true", help="print each case's first stderr lines")
    args = parser.parse_args()
    chosen = [c for c in cases(args.quick) if not args.cases or c.name in args.cases.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mlaprop-faults-"))
    rows = []
    print(
        f"{'case':<20} {'handled':<8} {'rc':>4} {'seconds':>8} {'survivors':>9} {'ports':>5} "
        f"{'secrets':>7} {'peak MB':>8}  where",
        flush=True,
    )
    try:
        for case in chosen:
            o = run_case(case, work)
            rows.append(o)
            where = ",".join(f"{k}:{v}" for k, v in o.secrets.items()) or "-"
            print(
                f"{case.name:<20} {'yes' if o.handled else 'NO':<8} {o.rc:>4} {o.seconds:>8.2f} "
                f"{len(o.survivors):>9} {len(o.ports):>5} {sum(o.secrets.values()):>7} "
                f"{o.peak_rss_mb:>8.1f}  {where}" + (f"  ({o.problem})" if o.problem else ""),
                flush=True,
            )
            if args.verbose:
                for line in o.stderr_head:
                    print(f"    | {line[:300]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missed = [o.case.name for o in rows if not o.handled or o.secrets]
    print(f"targets: {'met' if not missed else 'missed by ' + ', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
