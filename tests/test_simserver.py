"""Tests for ``mlaprop.simserver``: SGLang's argument rules, the simulated model, endpoints and faults.

Servers are started with the real launcher (:func:`mlaprop.server.launch`); the command-line behaviour
(tracebacks, exit codes, pre-ready states) is checked on a bare subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from mlaprop.capabilities import KNOWN_VERSIONS, capabilities_for
from mlaprop.environment import Vendor
from mlaprop.server import Server, free_port, launch, port_is_bindable
from mlaprop.simserver import (
    DatasetRow,
    SimModel,
    _sigterm_handler,
    load_dataset,
    resolve_attention_backend,
)

SIM = (sys.executable, "-m", "mlaprop.simserver")
ALLOW_0_5_11 = "['flashinfer', 'fa3', 'triton']"
ALLOW_0_5_13 = "['flashinfer', 'fa3', 'triton', 'ascend']"
ALLOW_0_5_23 = "['ascend', 'fa3', 'fa4', 'flashinfer', 'intel_xpu', 'triton']"


@pytest.fixture(autouse=True)
def _logs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary server logs (kept when a start fails) go to the test's folder, not /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def message(allowlist: str, backend: str) -> str:
    return (
        f"Currently only {allowlist} attention backends are supported for deterministic inference, "
        f"but you explicitly specified '{backend}'."
    )


def serve(*sim: str, **kwargs: Any) -> AbstractContextManager[Server]:
    return launch(None, "sim/model", command_prefix=SIM, extra_args=list(sim), grace=0.5, **kwargs)


def assert_clean(server: Server) -> None:
    """The launcher left no server process and a bindable port."""
    with pytest.raises(psutil.NoSuchProcess):
        if psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(server.pid)
    assert port_is_bindable(server.host, server.port)


def chat(
    server: Server, content: str, max_tokens: int = 2048, headers: dict[str, str] | None = None
) -> requests.Response:
    body = {"model": "x", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return requests.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def generate(server: Server, text: str | list[str], max_new_tokens: int = 16) -> requests.Response:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}
    return requests.post(f"{server.base_url}/generate", json=body, timeout=10)


class TestRules:
    """Tests for ``resolve_attention_backend``: SGLang's deterministic and default-backend rules."""

    @pytest.mark.parametrize(
        ("version", "vendor", "arch", "explicit", "deterministic", "kv", "tp", "expected"),
        [
            # the seed failure: up to 0.5.11 the ROCm default (aiter, 16 heads per rank) comes first
            ("0.5.11", Vendor.AMD, "gfx942", None, True, "fp8_e5m2", 1, message(ALLOW_0_5_11, "aiter")),
            # 0.5.4 fills the MLA default only at start-up, after the deterministic pass (fa3 -> triton)
            ("0.5.4", Vendor.AMD, "gfx942", None, True, "fp8_e5m2", 1, "triton"),
            ("0.5.5", Vendor.AMD, "gfx942", None, True, "fp8_e5m2", 1, message(ALLOW_0_5_11, "aiter")),
            # tp 2: 8 heads per rank -> triton, which is allowed
            ("0.5.11", Vendor.AMD, "gfx942", None, True, "fp8_e5m2", 2, "triton"),
            # from 0.5.12 the deterministic pass picks fa3 first, then fp8_e5m2 moves fa3 to triton
            ("0.5.12", Vendor.AMD, "gfx942", None, True, "fp8_e5m2", 1, "triton"),
            ("0.5.23", Vendor.AMD, "gfx942", None, True, "auto", 1, "fa3"),
            # an explicit aiter fails in every version, with that version's list
            ("0.5.13", Vendor.AMD, "gfx942", "aiter", True, "auto", 1, message(ALLOW_0_5_13, "aiter")),
            ("0.5.23", Vendor.AMD, "gfx942", "aiter", True, "auto", 1, message(ALLOW_0_5_23, "aiter")),
            # no deterministic inference: ROCm default aiter, Hopper fa3 -> triton for fp8_e5m2
            ("0.5.11", Vendor.AMD, "gfx942", None, False, "fp8_e5m2", 1, "aiter"),
            ("0.5.23", Vendor.NVIDIA, "sm90", None, False, "fp8_e5m2", 1, "triton"),
            ("0.5.23", Vendor.NVIDIA, "sm90", None, False, "fp8_e4m3", 1, "fa3"),
            ("0.5.23", Vendor.NVIDIA, "sm100", None, True, "fp8_e5m2", 1, "triton"),
            ("0.5.11", Vendor.NVIDIA, "sm90", None, True, "fp8_e5m2", 1, "triton"),
        ],
    )
    def test_table(
        self,
        version: str,
        vendor: Vendor,
        arch: str,
        explicit: str | None,
        deterministic: bool,
        kv: str,
        tp: int,
        expected: str,
    ) -> None:
        """Each row: the backend SGLang resolves to, or its exact ValueError message."""

        def resolve() -> str:
            backend, _ = resolve_attention_backend(
                version=version,
                vendor=vendor,
                arch=arch,
                attention_backend=explicit,
                deterministic=deterministic,
                kv_cache_dtype=kv,
                tp_size=tp,
            )
            return backend

        if expected.startswith("Currently only"):
            with pytest.raises(ValueError) as info:
                resolve()
            assert str(info.value) == expected
        else:
            assert resolve() == expected

    @pytest.mark.parametrize("version", KNOWN_VERSIONS)
    def test_explicit_backend_outside_the_allowlist_always_fails(self, version: str) -> None:
        """``flashmla`` is in no allow-list: the message lists exactly the version's allowed backends."""
        with pytest.raises(ValueError, match="but you explicitly specified 'flashmla'") as info:
            resolve_attention_backend(
                version=version,
                vendor=Vendor.NVIDIA,
                arch="sm90",
                attention_backend="flashmla",
                deterministic=True,
                kv_cache_dtype="auto",
            )
        listed = re.search(r"Currently only (\[.*?\])", str(info.value))
        assert listed is not None
        expected = {b.value for b in capabilities_for(version).deterministic_backends}
        assert set(json.loads(listed.group(1).replace("'", '"'))) == expected


class TestCommandLine:
    """Tests for the process: exit codes and what it prints, as SGLang would."""

    @staticmethod
    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*SIM, "--model-path", "m", "--port", str(free_port()), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def test_seed_failure_is_a_traceback_ending_in_sglangs_valueerror(self) -> None:
        """ROCm + 0.5.11 + deterministic: traceback on stderr, last line SGLang's ValueError, exit 1."""
        done = self._run(
            "--enable-deterministic-inference",
            "--kv-cache-dtype",
            "fp8_e5m2",
            "--sim-platform",
            "rocm",
            "--sim-sglang-version",
            "0.5.11",
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert lines[-1] == "ValueError: " + message(ALLOW_0_5_11, "aiter")
        assert "_handle_deterministic_inference" in done.stderr

    def test_invalid_kv_cache_dtype_is_exit_2(self) -> None:
        """argparse rejects an unknown KV-cache dtype with a usage error."""
        done = self._run("--kv-cache-dtype", "fp9")
        assert done.returncode == 2
        assert "error: argument --kv-cache-dtype: invalid choice: 'fp9'" in done.stderr

    def test_unknown_simulator_flag_is_exit_2(self) -> None:
        """Regression: ``--sim-args '--sim-error-rat 0.5'`` (a typo) was accepted as an SGLang flag, so the
        fault was never injected and the run passed; unknown ``--sim-*`` flags are a usage error."""
        done = self._run("--sim-error-rat", "0.5", "--sim-max-lifetime", "5")
        assert done.returncode == 2
        assert "unknown simulator flags: --sim-error-rat" in done.stderr.strip().splitlines()[-1]

    def test_backend_without_kernels_fails_at_load(self) -> None:
        """0.5.23 on ROCm with ``auto`` KV cache resolves to fa3: accepted, then fails to load (exit 1)."""
        done = self._run("--enable-deterministic-inference", "--sim-platform", "rocm")
        assert done.returncode == 1
        assert (
            done.stderr.strip()
            .splitlines()[-1]
            .startswith("RuntimeError: attention backend 'fa3' has no kernels for this GPU (rocm gfx942)")
        )

    def test_fused_decode_mla_breaks_triton_on_old_rocm(self) -> None:
        """SGLANG_ROCM_FUSED_DECODE_MLA=1 with triton on ROCm fails before 0.5.23 (sglang issue 23536)."""
        argv = [*SIM, "--model-path", "m", "--port", str(free_port()), "--attention-backend", "triton"]
        argv += ["--sim-platform", "rocm", "--sim-sglang-version", "0.5.11"]
        env = {"SGLANG_ROCM_FUSED_DECODE_MLA": "1", "PATH": "/usr/bin:/bin"}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 1
        assert "issue 23536" in done.stderr.strip().splitlines()[-1]

    @pytest.mark.parametrize("rc", [0, 1, 7])
    def test_crash_at_start(self, rc: int) -> None:
        """``--sim-crash-at-start RC`` exits with RC and says so."""
        done = self._run("--sim-crash-at-start", str(rc), "--unknown-flag", "v")
        assert done.returncode == rc
        assert f"exiting with code {rc}" in done.stdout
        assert "--unknown-flag v" in done.stdout

    def test_models_answers_before_health_generate(self) -> None:
        """``--sim-models-early``: ``/v1/models`` 200 while ``/health_generate`` is still 503."""
        port = free_port()
        argv = [*SIM, "--model-path", "m", "--port", str(port), "--sim-models-early", "--sim-never-healthy"]
        argv += ["--sim-max-lifetime", "20"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            models = None
            while time.monotonic() < deadline:
                try:
                    models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.02)
            assert models is not None and models.status_code == 200
            for path in ("/health_generate", "/health"):
                assert requests.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 503
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "mini.tsv"
    rows = [f"Question {i}: Sam has {i} apples and buys {i} more. How many now?\t{2 * i}" for i in range(9)]
    rows.append("How many pieces are there in all?\t2,125")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(dataset: Path) -> Iterator[Server]:
    """One simulated server for the endpoint tests: 10 questions, accuracy 0.5, an API key."""
    sim = ("--sim-dataset", str(dataset), "--sim-accuracy", "0.5", "--api-key", "k-123")
    with serve(*sim, handle_sigterm=False) as s:
        yield s


AUTH = {"Authorization": "Bearer k-123"}


class TestEndpoints:
    """Tests for the HTTP API against a launched simulator."""

    def test_chat_answers_dataset_questions_with_the_configured_accuracy(
        self, server: Server, dataset: Path
    ) -> None:
        """Exactly round(0.5 * 10) = 5 answers are right; the others are target + 1; ``Answer:`` is last."""
        rows = load_dataset(dataset)
        right = 0
        for row in rows:
            prompt = f"Solve step by step, end with 'Answer: <n>'.\n\n{row.question}"
            reply = chat(server, prompt, headers=AUTH).json()
            text = reply["choices"][0]["message"]["content"]
            got = int(text.splitlines()[-1].removeprefix("Answer: "))
            assert got in (row.answer, row.answer + 1)
            right += got == row.answer
            assert reply["usage"]["completion_tokens"] == len(text.split()) + text.count("\n")
        assert right == 5

    def test_chat_needs_the_api_key_but_health_does_not(self, server: Server) -> None:
        """With ``--api-key``: 401 without the bearer token; health endpoints stay open."""
        assert chat(server, "hi").status_code == 401
        assert requests.get(f"{server.base_url}/health_generate", timeout=5).status_code == 200

    def test_generate_returns_text_and_output_ids(self, server: Server) -> None:
        """``/generate`` answers in SGLang's shape; ``max_new_tokens`` truncates with reason length."""
        body = {"text": "tell me a story", "sampling_params": {"max_new_tokens": 7}}
        reply = requests.post(f"{server.base_url}/generate", json=body, headers=AUTH, timeout=5).json()
        meta = reply["meta_info"]
        assert meta["completion_tokens"] == 7 == len(meta["output_ids"])
        assert reply["output_ids"] == meta["output_ids"]
        assert len(reply["text"].split()) == 7
        assert meta["finish_reason"] == {"type": "length", "length": 7}
        body["text"] = ["a", "b"]
        many = requests.post(f"{server.base_url}/generate", json=body, headers=AUTH, timeout=5).json()
        assert isinstance(many, list) and len(many) == 2

    def test_flush_cache_and_unknown_paths(self, server: Server) -> None:
        """``/flush_cache`` answers 200; unknown paths 404; a bad body 400."""
        assert requests.post(f"{server.base_url}/flush_cache", headers=AUTH, timeout=5).status_code == 200
        assert requests.get(f"{server.base_url}/nope", headers=AUTH, timeout=5).status_code == 404
        bad = requests.post(f"{server.base_url}/generate", data=b"{", headers=AUTH, timeout=5)
        assert bad.status_code == 400


class TestFaults:
    """Tests for the scripted request faults, each through the launcher."""

    def test_error_every_nth_request(self) -> None:
        """``--sim-error-every 3 --sim-error-status 503``: requests 3 and 6 fail, the rest succeed."""
        with serve("--sim-error-every", "3", "--sim-error-status", "503") as s:
            codes = [generate(s, "x").status_code for _ in range(7)]
        assert_clean(s)
        assert codes == [200, 200, 503, 200, 200, 503, 200]

    def test_error_rate_is_seeded(self) -> None:
        """``--sim-error-rate 0.5``: the same seed fails the same requests; some but not all fail."""
        runs = []
        for _ in range(2):
            with serve("--sim-error-rate", "0.5", "--sim-seed", "7") as s:
                runs.append([generate(s, "x").status_code for _ in range(20)])
            assert_clean(s)
        assert runs[0] == runs[1]
        assert 0 < runs[0].count(500) < 20

    def test_malformed_json_every_nth_request(self) -> None:
        """``--sim-malformed-every 2``: every second answer is 200 with a body that is not JSON."""
        with serve("--sim-malformed-every", "2") as s:
            replies = [chat(s, "hello") for _ in range(4)]
        assert_clean(s)
        assert [r.status_code for r in replies] == [200] * 4
        for i, reply in enumerate(replies, 1):
            if i % 2:
                assert reply.json()["object"] == "chat.completion"
            else:
                with pytest.raises(ValueError):
                    reply.json()


class TestSigterm:
    """SIGTERM ends the server at once, however many arrive (regression: a second SIGTERM during the first
    handler deadlocked it on the log lock, and teardown waited the whole grace period)."""

    def test_handler_survives_reentry(self) -> None:
        """A second SIGTERM runs the handler inside the first: both end with code 0, one log line."""
        r, w = os.pipe()
        codes: list[int] = []
        handler = None

        def end(code: int) -> None:
            codes.append(code)
            if len(codes) == 1:  # the second signal arrives while the first handler is still running
                assert handler is not None
                handler(signal.SIGTERM, None)

        try:
            handler = _sigterm_handler(w, end)
            handler(signal.SIGTERM, None)
            os.close(w)
            logged = os.read(r, 4096).decode()
        finally:
            os.close(r)
        assert codes == [0, 0]
        assert logged.count("\n") == 1 and logged.endswith("] Received SIGTERM; shutting down.\n")

    @staticmethod
    def _busy(port: int, stop: threading.Event) -> None:
        """Generation requests back to back: the server's threads hold the GIL and take the log lock, which
        stretches the SIGTERM handler's log write (the window the old deadlock needed) to milliseconds."""
        body = b'{"text": "x", "sampling_params": {"max_new_tokens": 256}}'
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(head % len(body) + body)
                    while conn.recv(65536):
                        pass
            except OSError:
                time.sleep(0.001)

    def test_three_sigterms_1ms_apart_end_it_within_2s(self, tmp_path: Path) -> None:
        """20 busy simulators, each sent 3 SIGTERMs 1 ms apart: every one exits 0 within 2 s.

        Before the fix about 1 in 10 hung here (the handler re-entered while it held the log lock).
        """
        for batch in range(2):
            procs: list[tuple[subprocess.Popen[bytes], Path, int]] = []
            try:
                for i in range(10):
                    log, port = tmp_path / f"sim-{batch}-{i}.log", free_port()
                    argv = [*SIM, "--model-path", "m", "--port", str(port), "--sim-import-delay", "0"]
                    argv += ["--sim-max-lifetime", "60"]
                    with log.open("wb") as fh:
                        procs.append((subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT), log, port))
                for proc, log, _ in procs:
                    deadline = time.monotonic() + 20
                    while "fired up" not in log.read_text() and time.monotonic() < deadline:
                        assert proc.poll() is None, log.read_text()
                        time.sleep(0.01)
                for proc, log, port in procs:
                    stop = threading.Event()
                    load = [threading.Thread(target=self._busy, args=(port, stop)) for _ in range(2)]
                    for t in load:
                        t.start()
                    try:
                        time.sleep(0.02)
                        for _ in range(3):
                            os.kill(proc.pid, signal.SIGTERM)
                            time.sleep(0.001)
                        try:
                            rc = proc.wait(timeout=2)
                        except subprocess.TimeoutExpired:
                            pytest.fail(
                                f"the simulator outlived 3 SIGTERMs by 2 s:\n{log.read_text()[-2000:]}"
                            )
                    finally:
                        stop.set()
                        for t in load:
                            t.join(timeout=5)
                    assert rc == 0
                    text = log.read_text()
                    assert "Received SIGTERM; shutting down." in text, text[-2000:]
                    assert "Traceback" not in text, text[-2000:]
            finally:
                for proc, _, _ in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)


class TestBatchDependence:
    """Tests for batch-dependent outputs unless ``--enable-deterministic-inference``."""

    @staticmethod
    def _outputs(s: Server) -> tuple[list[int], list[list[int]]]:
        alone = generate(s, "the same prompt", 40).json()["meta_info"]["output_ids"]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: generate(s, "the same prompt", 40), range(4)))
        return alone, [r.json()["meta_info"]["output_ids"] for r in replies]

    def test_outputs_change_with_the_batch_by_default(self) -> None:
        """Sent alone and inside a batch of 4, the same prompt gets different output ids."""
        with serve("--sim-latency", "0.3") as s:
            alone, batched = self._outputs(s)
        assert all(ids != alone for ids in batched)
        assert all(len(ids) == len(alone) == 40 for ids in batched)

    def test_outputs_are_identical_with_deterministic_inference(self) -> None:
        """With the flag, one distinct output whatever the batch."""
        with serve("--sim-latency", "0.3", "--enable-deterministic-inference") as s:
            alone, batched = self._outputs(s)
        assert all(ids == alone for ids in batched)


class TestModel:
    """Tests for ``SimModel`` and ``load_dataset``."""

    def test_exact_accuracy_on_mgsm_en(self, mgsm_dir: Path) -> None:
        """On the 250 MGSM-en rows, accuracy P answers exactly round(P * 250) rows right."""
        rows = load_dataset(mgsm_dir / "mgsm_en.tsv")
        assert len(rows) == 250
        for p, expected in ((0.8, 200), (0.784, 196), (0.0, 0), (1.0, 250)):
            model = SimModel.build(rows, p, deterministic=True, seed=0)
            right = 0
            for row in rows:
                text, _, finish = model.generate(f"Question:\n{row.question}\nAnswer:", 2048, batch=1)
                assert finish == "stop"
                right += text.splitlines()[-1] == f"Answer: {row.answer}"
            assert right == expected

    def test_choice_of_rows_depends_on_the_seed_only(self) -> None:
        """Same seed, same rows; another seed, (here) other rows."""
        rows = [DatasetRow(f"q{i}?", i) for i in range(50)]
        a = SimModel.build(rows, 0.5, True, seed=1)
        assert a.correct == SimModel.build(rows, 0.5, False, seed=1).correct
        assert a.correct != SimModel.build(rows, 0.5, True, seed=2).correct
        assert len(a.correct) == 25

    def test_accuracy_out_of_range(self) -> None:
        with pytest.raises(ValueError, match=r"within \[0, 1\]"):
            SimModel.build([], 1.5, True, 0)

    def test_dataset_with_commas_and_a_bad_line(self, tmp_path: Path) -> None:
        """``2,125`` reads as 2125; a line without a tab is named in the error."""
        good = tmp_path / "good.tsv"
        good.write_text("How many?\t2,125\n\nAnd now?\t-3\n", encoding="utf-8")
        assert load_dataset(good) == (DatasetRow("How many?", 2125), DatasetRow("And now?", -3))
        bad = tmp_path / "bad.tsv"
        bad.write_text("ok\t1\nno tab here\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"bad\.tsv:2: expected 'question<TAB>integer'"):
            load_dataset(bad)

    def test_dataset_with_bom_and_crlf(self, tmp_path: Path) -> None:
        """A UTF-8 byte-order mark and CRLF line ends read as the plain file (regression: the BOM stuck to the
        first question, which then matched no prompt)."""
        plain = tmp_path / "plain.tsv"
        plain.write_text("First question?\t3\nSecond one?\t2,125\n", encoding="utf-8")
        variant = tmp_path / "bom_crlf.tsv"
        variant.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
        rows = load_dataset(variant)
        assert (
            rows == load_dataset(plain) == (DatasetRow("First question?", 3), DatasetRow("Second one?", 2125))
        )
        model = SimModel.build(rows, 1.0, deterministic=True, seed=0)
        assert model.find("Solve this.\n\nFirst question?") == 0
        text, _, _ = model.generate("Solve this.\n\nFirst question?", 2048, batch=1)
        assert text.splitlines()[-1] == "Answer: 3"
