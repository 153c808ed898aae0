"""Regression tests: reading an MGSM file is bounded (issue 13). ``--dataset /dev/zero`` used to read without
limit and a FIFO hung the run; both are refused now, before any read, and files or downloads larger than
:data:`mlaprop.mgsm.MAX_DATASET_BYTES` are refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlaprop.mgsm import MAX_DATASET_BYTES, DatasetUnavailable, InvalidDataset, load_dataset, resolve_dataset
from tests.eval_fixtures import Answer, serve


def _refused_within(seconds: float, path: Path) -> InvalidDataset:
    """``load_dataset(path)``'s error, failing the test if it takes longer than ``seconds`` (a hang)."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            load_dataset(path)
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"load_dataset({path}) still running after {seconds} s"
    assert time.monotonic() - started < seconds
    (exc,) = box
    assert isinstance(exc, InvalidDataset), repr(exc)
    return exc


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_is_refused_before_any_read() -> None:
    """``/dev/zero`` is a character device: refused at once, naming the kind of file and the fix."""
    exc = _refused_within(5, Path("/dev/zero"))
    assert "is a character device, not a regular file" in str(exc)
    assert str(exc).startswith("/dev/zero: ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_without_writer_does_not_hang(tmp_path: Path) -> None:
    """A FIFO nobody writes to: refused at once (the open does not block, nothing is read)."""
    fifo = tmp_path / "mgsm_en.tsv"
    os.mkfifo(fifo)
    exc = _refused_within(5, fifo)
    assert "is a FIFO (named pipe), not a regular file" in str(exc)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """A regular file one byte over the limit (sparse, so the test is cheap) is refused by size."""
    big = tmp_path / "big.tsv"
    with big.open("wb") as fh:
        fh.truncate(MAX_DATASET_BYTES + 1)
    exc = _refused_within(5, big)
    assert "is larger than 8 MiB" in str(exc)


def test_file_at_the_limit_is_read_and_parsed(tmp_path: Path) -> None:
    """A file of exactly the limit is read (and then judged by its content, not refused by size)."""
    f = tmp_path / "exact.tsv"
    f.write_bytes(b"x" * MAX_DATASET_BYTES)
    with pytest.raises(InvalidDataset) as info:
        load_dataset(f)
    assert "larger than" not in str(info.value)


def test_oversized_download_is_refused(tmp_path: Path) -> None:
    """A download larger than the limit stops reading past it and is reported as unavailable."""
    blob = "q\t1\n" * (MAX_DATASET_BYTES // 4 + 1)
    with serve(lambda m, p, b: Answer(text=blob)) as srv, pytest.raises(DatasetUnavailable) as info:
        resolve_dataset("en", cache_dir=tmp_path, url=f"{srv.url}/mgsm_en.tsv")
    assert f"larger than {MAX_DATASET_BYTES} bytes" in str(info.value)
    assert not (tmp_path / "mgsm_en.tsv").exists()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_cli_dataset_dev_zero_exits_2_quickly(tmp_path: Path) -> None:
    """``mlaprop run --simulate --dataset /dev/zero`` exits 2 within seconds with the cause on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlaprop.cli", "run", "--simulate", "--vendor", "nvidia", "--arch", "sm90",
         "--dataset", "/dev/zero", "--report-dir", str(tmp_path / "r"), "--no-progress"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "/dev/zero: is a character device, not a regular file" in proc.stderr
