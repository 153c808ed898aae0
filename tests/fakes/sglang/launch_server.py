"""Fake ``python -m sglang.launch_server``: :mod:`mlaprop.simserver` plus hostile behaviour, for the fault
matrix (``benchmarks/faults.py``) and ``tests/test_faults.py``.

Switches, from the environment (so they pass through mlaprop unchanged):

- ``FAKE_SGLANG_FAULTS``: comma-separated, any of
  ``echo-secrets`` (print the argv list, the ``--api-key`` value and secret environment variables: bare,
  repr'd, JSON-escaped, URL-encoded, in a fake traceback, on stdout and stderr, and in the body of every 3rd
  generation answer, an HTTP 500),
  ``grandchild`` (double-fork a grandchild with an empty environment in a new session that listens on a port
  of its own and ignores SIGTERM; its parent exits, so it is re-parented),
  ``flood`` (write ``FAKE_SGLANG_FLOOD_MB`` MB, default 100, of log while serving: SGLang-like lines and one
  line of a fifth of it) from a thread, starting ``FAKE_SGLANG_FLOOD_HEAD_START`` seconds (default 0)
  before the server starts serving,
  ``port-busy`` (fail at once the way uvicorn does when the port is taken),
  ``foreign`` (ask the process listening on ``FAKE_SGLANG_FOREIGN`` (a directory: write ``<port>.want``) to
  take our port first, as another program would, then start and fail to bind);
- ``FAKE_SGLANG_EVENTS``: a file to append ``pid N ROLE``, ``listen PORT`` and ``request`` lines to;
- ``FAKE_SGLANG_SIM_ARGS``: more ``--sim-*`` flags (``shlex`` syntax), e.g. ``--sim-healthy-after 60``;
- ``FAKE_SGLANG_DATASET``: the MGSM TSV to answer from (``--sim-dataset``, accuracy 1).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

EVENTS = os.environ.get("FAKE_SGLANG_EVENTS")


def event(line: str, path: str | None = EVENTS) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _option(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def grandchild_main(events: str, polite: bool) -> None:
    """The re-parented grandchild: empty environment, own session, a listening socket, deaf to SIGTERM
    unless ``polite``."""
    import signal

    if not polite:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    event(f"pid {os.getpid()} grandchild", events)
    event(f"listen {s.getsockname()[1]}", events)
    while True:
        time.sleep(1)


def spawn_grandchild(polite: bool) -> None:
    code = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-S', sys.argv[1], '--grandchild', "
        "sys.argv[2], sys.argv[3]], env={}, start_new_session=True, stdin=subprocess.DEVNULL)"
    )
    args = [sys.executable, "-S", "-c", code, __file__, EVENTS or "", "polite" if polite else "stubborn"]
    subprocess.run(args, env={}, check=False)


def echo_secrets(argv: list[str]) -> list[str]:
    values = [v for v in (_option(argv, "--api-key"),) if v]
    values += [v for k, v in os.environ.items() if k.endswith(("_API_KEY", "_TOKEN")) and v]
    print(f"launch_server argv: {sys.argv!r}")
    for v in values:
        print(f"using credential {v}")
        print(json.dumps({"credential": v, "note": "echoed"}))
        print(f"GET /auth?c={urllib.parse.quote(v, safe='')}")
        print(f"Traceback (most recent call last):\nValueError: invalid credential {v!r}", file=sys.stderr)
    sys.stdout.flush()
    return values


def flood(megabytes: float) -> None:
    line = (
        b"[2026-12-02 15:00:00 TP0] Decode batch. #running-req: 1, #token: 1234, token usage: 0.01, "
        b"gen throughput (token/s): 123.45, #queue-req: 0\n"
    )
    total = int(megabytes * 1024 * 1024)
    big = total // 5
    chunk = line * (64 * 1024 // len(line))
    written = 0
    while written < total - big:
        os.write(1, chunk)
        written += len(chunk)
    piece = b"x" * (1024 * 1024)
    for _ in range(big // len(piece)):
        os.write(1, piece)
    os.write(1, b"\nflood done\n")
    event("flood done")


def patch_error_bodies(values: list[str]) -> None:
    from mlaprop import simserver

    original = simserver._Handler._json

    def _json(self: Any, code: int, payload: Any) -> None:
        if code >= 500 and isinstance(payload, dict) and values:
            payload = {**payload, "message": f"{payload.get('message')}: bad credential {values[0]}"}
        original(self, code, payload)

    simserver._Handler._json = _json  # type: ignore[method-assign]


def patch_request_events() -> None:
    from mlaprop import simserver

    original = simserver._Handler.do_POST

    def do_POST(self: Any) -> None:
        event("request")
        original(self)

    simserver._Handler.do_POST = do_POST  # type: ignore[method-assign]


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--grandchild":
        grandchild_main(sys.argv[2], sys.argv[3] == "polite")
        return 0
    argv = sys.argv[1:]
    faults = set(filter(None, os.environ.get("FAKE_SGLANG_FAULTS", "").split(",")))
    port = int(_option(argv, "--port") or 30000)
    event(f"pid {os.getpid()} server")
    extra = shlex.split(os.environ.get("FAKE_SGLANG_SIM_ARGS", ""))
    if os.environ.get("FAKE_SGLANG_DATASET"):
        extra += ["--sim-dataset", os.environ["FAKE_SGLANG_DATASET"], "--sim-accuracy", "1"]
    if "port-busy" in faults:
        print(
            f"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
            "address already in use",
            file=sys.stderr,
        )
        return 1
    if "foreign" in faults:
        folder = Path(os.environ["FAKE_SGLANG_FOREIGN"])
        (folder / f"{port}.want").write_text("")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        time.sleep(2.0)  # "loading the model" while the other program answers on our port
    if "grandchild" in faults:
        spawn_grandchild(polite="polite" in faults)
    values = echo_secrets(argv) if "echo-secrets" in faults else []
    if values:
        extra += ["--sim-error-every", os.environ.get("FAKE_SGLANG_ERROR_EVERY", "3")]
        patch_error_bodies(values)
    patch_request_events()
    if "flood" in faults:
        mb = float(os.environ.get("FAKE_SGLANG_FLOOD_MB", "100"))
        threading.Thread(target=flood, args=(mb,), daemon=True).start()
        time.sleep(float(os.environ.get("FAKE_SGLANG_FLOOD_HEAD_START", "0")))
    from mlaprop import simserver

    event(f"listen {port}")
    return simserver.main([*argv, *extra])


if __name__ == "__main__":
    sys.exit(main())
