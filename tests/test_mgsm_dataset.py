"""Tests for the MGSM dataset: validation, cache, download, prompt (on the real files in ``../shared``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from mlaprop.mgsm import (
    DATASET_SHA256,
    DATASET_URL,
    EXPECTED_ROWS,
    LANG_TO_INSTRUCTIONS,
    LANGUAGES,
    DatasetUnavailable,
    InvalidDataset,
    build_prompt,
    chat_request,
    default_cache_dir,
    load_dataset,
    parse_dataset,
    resolve_dataset,
)
from tests.eval_fixtures import Answer, closed_port, mgsm_path, serve


class TestRealFiles:
    """Tests for loading the published files."""

    def test_english(self, mgsm_dir: Path) -> None:
        """The English file has 250 rows, matches its pin, and reads the first row as simple-evals does."""
        ds = load_dataset(mgsm_path(mgsm_dir), "en")
        assert len(ds) == EXPECTED_ROWS
        assert ds.canonical is True
        assert ds.sha256 == DATASET_SHA256["en"]
        first = ds.items[0]
        assert first.qid == "mgsm_en_000"
        assert first.line == 1
        assert first.target == "18"
        assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
        assert ds.items[-1].qid == "mgsm_en_249"
        assert ds.items[-1].line == 250

    def test_thousands_commas(self, mgsm_dir: Path) -> None:
        """Targets written with thousands commas are kept as written and read as integers."""
        ds = load_dataset(mgsm_path(mgsm_dir), "en")
        with_commas = [i for i in ds.items if "," in i.target]
        assert [i.target for i in with_commas[:2]] == ["2,125", "114,200"]
        assert with_commas[0].target_value == 2125

    @pytest.mark.parametrize("lang", LANGUAGES)
    def test_every_language_matches_its_pin(self, mgsm_dir: Path, lang: str) -> None:
        """Each pinned digest is the digest of the published file, which validates with 250 rows."""
        data = mgsm_path(mgsm_dir, lang).read_bytes()
        assert hashlib.sha256(data).hexdigest() == DATASET_SHA256[lang]
        ds = load_dataset(mgsm_path(mgsm_dir, lang), lang)
        assert (len(ds), ds.canonical, ds.lang) == (EXPECTED_ROWS, True, lang)

    def test_bom_and_crlf(self, mgsm_dir: Path, tmp_path: Path) -> None:
        """A UTF-8 BOM and CRLF line ends give the same rows (but not the canonical digest)."""
        original = load_dataset(mgsm_path(mgsm_dir), "en")
        data = mgsm_path(mgsm_dir).read_bytes()
        variant = tmp_path / "bom_crlf.tsv"
        variant.write_bytes(b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"))
        ds = load_dataset(variant, "en")
        assert ds.items == original.items
        assert ds.canonical is False


def _err(data: bytes, path: str = "x.tsv") -> InvalidDataset:
    with pytest.raises(InvalidDataset) as info:
        parse_dataset(data, "en", path)
    return info.value


class TestValidation:
    """Tests for the errors of :func:`parse_dataset`: file, line, problem, fix."""

    @pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
    def test_empty(self, data: bytes) -> None:
        """An empty (or blank) file is refused as a whole, with how to get the real one."""
        e = _err(data)
        assert (e.path, e.line, e.problem) == ("x.tsv", None, "the file is empty")
        assert "--dataset" in e.fix

    def test_no_tab(self) -> None:
        """A row without a TAB names its line and says to use a TAB."""
        e = _err(b"q one\t1\nq two 2\nq three\t3\n")
        assert e.line == 2
        assert e.problem == "expected 2 tab-separated columns (question, answer), found 1"
        assert "TAB" in e.fix
        assert str(e).startswith("x.tsv:2: expected 2 tab-separated columns")

    def test_three_columns(self) -> None:
        """A row with two TABs is refused with its column count."""
        e = _err(b"q\t1\nq\tx\t2\n")
        assert (e.line, e.problem) == (2, "expected 2 tab-separated columns (question, answer), found 3")

    @pytest.mark.parametrize("target", [b"18.5", b"eighteen", b"$18", b"1,23", b"18 eggs"])
    def test_non_integer_target(self, target: bytes) -> None:
        """A target that is not a whole number is refused with its value."""
        e = _err(b"q\t1\nq2\t" + target + b"\n")
        assert e.line == 2
        assert e.problem == f"the answer {target.decode()!r} is not an integer"

    def test_non_utf8(self) -> None:
        """Latin-1 bytes are refused with the line and byte where decoding fails."""
        e = _err(b"q\t1\nq\t2\ncaf\xe9\t3\n")
        assert e.line == 3
        assert e.problem.startswith("not valid UTF-8 (byte 0xe9 at byte 4 of the line")
        assert "UTF-8" in e.fix

    def test_utf16(self) -> None:
        """A UTF-16 file is named as such."""
        e = _err("q\t1\n".encode("utf-16"))
        assert e.line == 1
        assert "UTF-16" in e.problem

    def test_blank_line_between_rows(self) -> None:
        """A blank line between rows is refused (row ids would shift); blank lines at the end are not."""
        e = _err(b"q\t1\n\nq\t2\n")
        assert (e.line, e.problem) == (2, "blank line between rows")
        assert len(parse_dataset(b"q\t1\nq\t2\n\n\n")) == 2

    def test_empty_question(self) -> None:
        """A row with nothing before the TAB is refused."""
        assert _err(b"q\t1\n \t2\n").line == 2

    @pytest.mark.parametrize(
        ("row", "problem", "fix"),
        [
            (b"q\t", "the answer is empty (nothing after the TAB)", "integer answer after the TAB"),
            (b"q\t  ", "the answer is empty (nothing after the TAB)", "integer answer after the TAB"),
            (b"\tq", "the question is empty", "a question before the TAB"),
            (b"\t5", "the question is empty", "a question before the TAB"),
        ],
    )
    def test_tab_at_an_end(self, row: bytes, problem: str, fix: str) -> None:
        """``q<TAB>`` and ``<TAB>q`` say which side is empty (regression: "found 1 column")."""
        e = _err(b"a\t1\n" + row + b"\nb\t2\n")
        assert (e.line, e.problem) == (2, problem)
        assert fix in e.fix

    def test_cr_only_line_ends(self) -> None:
        """Old-Mac CR line ends are named as such, with a conversion (regression: "found 3 columns")."""
        e = _err(b"a\t1\rb\t2\rc\t3\r")
        assert (e.line, e.problem) == (
            1,
            "the line ends are carriage returns only (old Mac style), so the file reads as one line",
        )
        assert "tr '\\r' '\\n'" in e.fix

    def test_stray_cr_inside_a_line(self) -> None:
        """A CR in the middle of one row of an LF file is named, with its line."""
        e = _err(b"a\t1\nb\rx\t2\nc\t3\n")
        assert (e.line, e.problem) == (2, "a carriage return (CR) inside the line")

    def test_negative_and_commas_accepted(self) -> None:
        """``-5`` and ``2,125`` are integers."""
        items = parse_dataset(b"a\t-5\nb\t2,125\n")
        assert [(i.target, i.target_value) for i in items] == [("-5", -5), ("2,125", 2125)]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing path says so, and where it may have come from (regression: a bad MLAPROP_DATASET was
        blamed on --dataset, which the user had not passed)."""
        with pytest.raises(InvalidDataset, match=r"no such file\. .*--dataset \(or MLAPROP_DATASET"):
            load_dataset(tmp_path / "nope.tsv")

    def test_published_file_of_another_language(self, mgsm_dir: Path) -> None:
        """The English file loaded as German is refused by its content (regression: it ran silently)."""
        with pytest.raises(InvalidDataset) as info:
            load_dataset(mgsm_path(mgsm_dir, "en"), "de")
        assert (info.value.line, info.value.problem) == (
            None,
            "it is the published file of MGSM-en, but the language asked for is de",
        )
        assert info.value.fix.startswith("Pass --lang en to evaluate this file, or give the MGSM-de file")

    def test_file_named_for_another_language(self, tmp_path: Path) -> None:
        """A (non-published) ``mgsm_en.tsv`` loaded as German is refused by its name; as English it loads."""
        path = tmp_path / "mgsm_en.tsv"
        path.write_bytes(b"How many?\t3\n")
        with pytest.raises(InvalidDataset, match="its name says MGSM-en, but the language asked for is de"):
            load_dataset(path, "de")
        assert len(load_dataset(path, "en")) == 1
        other = tmp_path / "my_questions.tsv"
        other.write_bytes(b"How many?\t3\n")
        assert load_dataset(other, "de").lang == "de"

    def test_directory(self, tmp_path: Path) -> None:
        """A directory given as the file says which file to give."""
        with pytest.raises(InvalidDataset, match="is a directory"):
            load_dataset(tmp_path)

    def test_unknown_language(self) -> None:
        """An unknown language lists the valid ones."""
        with pytest.raises(ValueError, match="expected one of bn, de, en"):
            parse_dataset(b"q\t1\n", "xx")


class TestCacheAndDownload:
    """Tests for :func:`resolve_dataset` and :func:`default_cache_dir`."""

    def test_cache_dir_xdg(self) -> None:
        """``XDG_CACHE_HOME`` wins; unset or relative falls back to ``~/.cache``."""
        assert default_cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/mlaprop/mgsm")
        assert default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/mlaprop/mgsm")
        assert default_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path("/h/.cache/mlaprop/mgsm")

    def test_download_then_cache(self, mgsm_dir: Path, tmp_path: Path) -> None:
        """A cache miss downloads, verifies and stores the file; the next call reads the cache only."""
        data = mgsm_path(mgsm_dir).read_bytes()
        with serve(lambda m, p, b: Answer(text=data.decode())) as srv:
            ds = resolve_dataset("en", cache_dir=tmp_path, url=f"{srv.url}/mgsm_en.tsv")
            assert srv.count("/mgsm_en.tsv") == 1
        assert (tmp_path / "mgsm_en.tsv").read_bytes() == data
        assert (len(ds), ds.canonical, ds.path) == (250, True, str(tmp_path / "mgsm_en.tsv"))
        again = resolve_dataset("en", cache_dir=tmp_path, download=False)
        assert again.items == ds.items
        assert list(tmp_path.iterdir()) == [tmp_path / "mgsm_en.tsv"]  # no temp files left

    def test_download_with_wrong_digest(self, tmp_path: Path) -> None:
        """A download with another digest is refused and nothing is cached."""
        with (
            serve(lambda m, p, b: Answer(text="q\t1\n")) as srv,
            pytest.raises(DatasetUnavailable, match="not the pinned") as info,
        ):
            resolve_dataset("en", cache_dir=tmp_path, url=f"{srv.url}/mgsm_en.tsv")
        assert "--dataset PATH" in str(info.value)
        assert not (tmp_path / "mgsm_en.tsv").exists()

    def test_offline_no_cache(self, tmp_path: Path) -> None:
        """Offline with no cache: the error names --dataset and the cache path to fill."""
        url = f"http://127.0.0.1:{closed_port()}/mgsm_en.tsv"
        with pytest.raises(DatasetUnavailable) as info:
            resolve_dataset("en", cache_dir=tmp_path, url=url, timeout_s=2)
        msg = str(info.value)
        assert "Could not download MGSM-en" in msg
        assert "--dataset PATH" in msg
        assert str(tmp_path / "mgsm_en.tsv") in msg
        assert DATASET_URL.format(lang="en") in msg

    def test_downloads_off(self, tmp_path: Path) -> None:
        """``download=False`` with an empty cache fails without touching the network."""
        with pytest.raises(DatasetUnavailable, match="downloads are off"):
            resolve_dataset("en", cache_dir=tmp_path, download=False)

    def test_corrupt_cache_is_replaced(self, mgsm_dir: Path, tmp_path: Path) -> None:
        """A cached copy with the wrong digest is downloaded again."""
        (tmp_path / "mgsm_en.tsv").write_bytes(b"truncated\t1\n")
        data = mgsm_path(mgsm_dir).read_bytes()
        with serve(lambda m, p, b: Answer(text=data.decode())) as srv:
            ds = resolve_dataset("en", cache_dir=tmp_path, url=f"{srv.url}/x")
        assert ds.canonical is True

    def test_corrupt_cache_offline(self, tmp_path: Path) -> None:
        """A corrupt cache and no network: the error says the cache is corrupt."""
        (tmp_path / "mgsm_en.tsv").write_bytes(b"truncated\t1\n")
        with pytest.raises(DatasetUnavailable, match="does not match the pinned SHA-256"):
            resolve_dataset("en", cache_dir=tmp_path, download=False)

    def test_explicit_path(self, mgsm_dir: Path, tmp_path: Path) -> None:
        """``dataset=PATH`` is used as is, and a modified copy is flagged non-canonical."""
        copy = tmp_path / "mine.tsv"
        shutil.copyfile(mgsm_path(mgsm_dir), copy)
        assert resolve_dataset("en", copy, download=False).canonical is True
        copy.write_bytes(copy.read_bytes() + b"extra question\t7\n")
        ds = resolve_dataset("en", copy, download=False)
        assert (len(ds), ds.canonical) == (251, False)


class TestPrompt:
    """Tests for the prompt and request body."""

    def test_english_prompt(self, mgsm_dir: Path) -> None:
        """The prompt is simple-evals' instruction, a blank line, then the question."""
        item = load_dataset(mgsm_path(mgsm_dir)).items[0]
        prompt = build_prompt(item.question, "en")
        assert prompt == (
            "Solve this math problem. Give the reasoning steps before giving the final answer on the last "
            'line by itself in the format of "Answer:". Do not add anything other than the integer answer '
            'after "Answer:".\n\n' + item.question
        )
        assert set(LANG_TO_INSTRUCTIONS) == set(LANGUAGES)

    def test_chat_request(self, mgsm_dir: Path) -> None:
        """One user message, temperature 0, max_tokens 2048 (SGLang's run_eval sampler)."""
        item = load_dataset(mgsm_path(mgsm_dir)).items[1]
        assert chat_request(item, "m") == {
            "model": "m",
            "messages": [{"role": "user", "content": build_prompt(item.question)}],
            "temperature": 0.0,
            "max_tokens": 2048,
        }
