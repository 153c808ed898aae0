"""MGSM: the dataset (download, cache, validation), SGLang's prompt, and two answer extractors.

The prompt, sampling and the ``simple-evals`` extractor follow ``mgsm_eval.py`` of openai/simple-evals
(copied into SGLang as ``python/sglang/test/simple_eval_mgsm.py``, run by ``sglang.test.run_eval`` for
``mgsm_en``), so scores compare with SGLang's gate. The data (250 rows per language of
``question<TAB>integer answer``; CC BY 4.0) is fetched at run time from simple-evals' public location and
checked against pinned SHA-256 digests; it is never stored in this repository.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import requests

__all__ = [
    "DATASET_SHA256",
    "DATASET_URL",
    "EXPECTED_ROWS",
    "LANGUAGES",
    "LANG_TO_ANSWER_PREFIX",
    "LANG_TO_INSTRUCTIONS",
    "MAX_DATASET_BYTES",
    "MAX_TOKENS",
    "TEMPERATURE",
    "DatasetUnavailable",
    "InvalidDataset",
    "MgsmDataset",
    "MgsmItem",
    "Parser",
    "build_prompt",
    "chat_request",
    "default_cache_dir",
    "extract",
    "is_correct",
    "load_dataset",
    "parse_answer_robust",
    "parse_answer_simple_evals",
    "parse_dataset",
    "resolve_dataset",
    "score_robust",
    "score_simple_evals",
]

#: simple-evals' ``ALL_LANGUAGES``.
LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

#: simple-evals' ``LANG_TO_FPATH`` (also SGLang's); ``{lang}`` is one of :data:`LANGUAGES`.
DATASET_URL = "https://openaipublic.blob.core.windows.net/simple-evals/mgsm_{lang}.tsv"

#: Rows per language in the published files.
EXPECTED_ROWS = 250

#: The largest MGSM file read, bytes (8 MiB). The published files are 58-177 KB; anything far larger is the
#: wrong file (``--dataset /dev/zero``, a log, a model shard), refused instead of read without limit.
MAX_DATASET_BYTES = 8 * 1024 * 1024

#: SHA-256 of the published files (computed from the copies in ``shared/data/mgsm``, 250 rows each).
DATASET_SHA256: Mapping[str, str] = {
    "bn": "6b00bc7cc635547e866989284afa924d789b5affa2eb8de623c385dd943ad977",
    "de": "4dfea30fede44b813e2e496f5f0534049e83c7cc8aed6e00600b30ec62053626",
    "en": "50021d0f28cc957edcb44e7806425b1c7fbd648ddcb9e0a8ec689d10e57d40fa",
    "es": "5bd27ebdf00140cec845c5298dc17715f5cd57d8edda6df1976db40bf3f0750a",
    "fr": "36207c1c03fd7cd3ea491441eb755408199f94e4a647851df531bbaedc99d606",
    "ja": "59a2b50debe77981fd784cb3b2bef1505e3abf2a37116dc9d7a366ab029b4637",
    "ru": "6bd30fd2e80c5bac23f566fb4ae0e6a55a19578401fbf9a01fb21beb3645fef8",
    "sw": "2bac828d77229e65d7c7197b1ad4a2cb5b1fe99b163f2cbdd66501de6a2115c4",
    "te": "dd6b1452c244bb2e4ba254c01ea84137f80c1cefc57d69c23b0ed88b9c0f36b7",
    "th": "f3932dc5ad8e9d0ea82b017adc1e1461dd647af861e7166d6741986602a0cfd6",
    "zh": "b2fa63151022370a0de1f4211c8c284eae74b0f5a3b003b1d5982c0d4a73f661",
}

#: simple-evals' ``LANG_TO_INSTRUCTIONS``, verbatim (including the Japanese text's missing first character),
#: so prompts are byte-identical to SGLang's ``mgsm_en``. ``{input}`` is the question.
LANG_TO_INSTRUCTIONS: Mapping[str, str] = {
    "en": 'Solve this math problem. Give the reasoning steps before giving the final answer on the last line by itself in the format of "Answer:". Do not add anything other than the integer answer after "Answer:".\n\n{input}',
    "bn": 'এই গণিতের সমস্যাটি সমাধান করুন। চূড়ান্ত উত্তর দেওয়ার আগে যুক্তিসম্পন্ন পদক্ষেপ প্রদান করুন। চূড়ান্ত উত্তরটি একক সংখ্যা হিসাবে "উত্তর:" এর পরে শেষ লাইনে দিন। "উত্তর:" এর পরে অন্য কিছু যুক্ত করবেন না।.\n\n{input}',
    "de": 'Löse dieses Mathematikproblem. Gib die Schritte zur Begründung an, bevor du die endgültige Antwort in der letzten Zeile alleine im Format "Antwort:" gibst. Füge nichts anderes als die ganzzahlige Antwort nach "Antwort:" hinzu.\n\n{input}',
    "es": 'Resuelve este problema matemático. Proporciona los pasos de razonamiento antes de dar la respuesta final en la última línea por sí misma en el formato de "Respuesta:". No añadas nada más que la respuesta entera después de "Respuesta:".\n\n{input}',
    "fr": 'Résolvez ce problème de mathématiques. Donnez les étapes de raisonnement avant de fournir la réponse finale sur la dernière ligne elle-même dans le format de "Réponse:". N\'ajoutez rien d\'autre que la réponse entière après "Réponse:".\n\n{input}',
    "ja": 'の数学の問題を解いてください。最終的な答えを出す前に、解答の推論過程を記述してください。そして最後の行には "答え:" の形式で答えを記述し、その後には整数の答え以外何も追加しないでください。\n\n{input}',
    "ru": 'Решите эту математическую задачу. Объясните шаги рассуждения перед тем, как дать окончательный ответ в последней строке сам по себе в формате "Ответ:". Не добавляйте ничего, кроме целочисленного ответа после "Ответ:".\n\n{input}',
    "sw": 'Suluhisha tatizo hili la hesabu. Toa hatua za mantiki kabla ya kutoa jibu la mwisho kwenye mstari wa mwisho peke yake katika muundo wa "Jibu:". Usiongeze chochote kingine isipokuwa jibu la integer baada ya "Jibu:".\n\n{input}',
    "te": "ఈ గణిత సమస్యను పరిష్కరించండి. చివరి సమాధానాన్ని ఇవ్వదానికి ముందు తర్కాత్మక అదుగులను ఇవ్వండి. చివరి పంక్తిలో మాత్రమే 'సమాధానం:' అనే ఆకారంలో చివరి సమాధానాద్ని ఇవ్వండి సమాధానం: తర్వాత పూర్ణాంక సమాధానానికి తప్పించి ఎదేనా చేర్చవద్దు.\n\n{input}",
    "th": 'แก้ปัญหาคณิตศาสตร์นี้ ให้ให้ขั้นตอนการใช้เหตุผลก่อนที่จะให้คำตอบสุดท้ายในบรรทัดสุดท้ายโดยอยู่ในรูปแบบ "คำตอบ:" ไม่ควรเพิ่มอะไรนอกจากคำตอบที่เป็นจำนวนเต็มหลังจาก "คำตอบ:"\n\n{input}',
    "zh": '解决这个数学问题。在最后一行给出答案前，请提供推理步骤。最后一行应该以 "答案: " 的形式独立给出答案。在 "答案：" 后不要添加除整数答案之外的任何内容。\n\n{input}',
}

#: simple-evals' ``LANG_TO_ANSWER_PREFIX`` (case-sensitive in simple-evals).
LANG_TO_ANSWER_PREFIX: Mapping[str, str] = {
    "en": "Answer",
    "bn": "উত্তর",
    "de": "Antwort",
    "es": "Respuesta",
    "fr": "Réponse",
    "ja": "答え",
    "ru": "Ответ",
    "sw": "Jibu",
    "te": "సమాధానం",
    "th": "คำตอบ",
    "zh": "答案",
}

#: SGLang's ``run_eval`` sampler defaults for ``mgsm_en`` (``ChatCompletionSampler``): greedy, 2048 tokens.
TEMPERATURE = 0.0
MAX_TOKENS = 2048


# --------------------------------------------------------------------------------------------- errors


class InvalidDataset(ValueError):
    """An MGSM file that cannot be used.

    Attributes:
        path: the file.
        line: 1-based line number of the problem, or ``None`` when it concerns the whole file.
        problem: what is wrong.
        fix: how to fix it.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str, fix: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.fix = fix
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}. {fix}")


class DatasetUnavailable(RuntimeError):
    """The MGSM file is not in the cache and could not be downloaded (offline, blocked, or changed upstream).

    The message says how to provide the file: ``--dataset PATH``, or a copy at the cache path.
    """


def _check_lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown MGSM language {lang!r}: expected one of {', '.join(LANGUAGES)}")
    return lang


# --------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class MgsmItem:
    """One MGSM row.

    Attributes:
        index: 0-based row number among the data rows (the question id's number).
        line: 1-based line number in the file.
        question: the question, as simple-evals reads it (the line stripped of surrounding whitespace).
        target: the answer exactly as written in the file (may carry thousands commas: ``"2,125"``).
        lang: language code.
    """

    index: int
    line: int
    question: str
    target: str
    lang: str

    @property
    def qid(self) -> str:
        """Stable question id, ``mgsm_<lang>_<index>`` with the index zero-padded to 3 digits."""
        return f"mgsm_{self.lang}_{self.index:03d}"

    @property
    def target_value(self) -> int:
        """The target as an integer (commas removed)."""
        return int(self.target.replace(",", ""))


@dataclass(frozen=True)
class MgsmDataset:
    """A validated MGSM file.

    Attributes:
        lang: language code.
        path: where it was read from.
        sha256: SHA-256 of the file's bytes.
        items: the rows, in file order.
        canonical: ``sha256`` equals the pinned digest of the published file (a score on another file is not
            comparable with SGLang's gate).
    """

    lang: str
    path: str
    sha256: str
    items: tuple[MgsmItem, ...]
    canonical: bool

    def __len__(self) -> int:
        return len(self.items)


_TARGET = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _decode(data: bytes, path: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InvalidDataset(
            path, 1, "the file is UTF-16 (byte-order mark FF FE / FE FF), not UTF-8", "Re-save it as UTF-8."
        )
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidDataset(
            path,
            line,
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte {col} of the line: {exc.reason})",
            "Re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8`), or download it again.",
        ) from None


def parse_dataset(data: bytes, lang: str = "en", path: str = "<bytes>") -> tuple[MgsmItem, ...]:
    """Parse and validate MGSM TSV bytes: ``question<TAB>integer answer`` per line.

    A UTF-8 byte-order mark and CRLF line ends are accepted; blank lines at the end are ignored. Each row is
    read as simple-evals reads it (``line.strip().split("\\t")``).

    Raises:
        InvalidDataset: empty file; not UTF-8 (or UTF-16); CR-only line ends or a stray CR inside a row; a
            blank line between rows; a row without exactly two tab-separated columns; an empty question or
            answer; a target that is not an integer (``18``, ``-5`` or ``2,125``). The message names the
            file, the line, the problem and the fix.
        ValueError: unknown ``lang``.
    """
    _check_lang(lang)
    if not data.strip():
        raise InvalidDataset(
            path,
            None,
            "the file is empty",
            f"Expected {EXPECTED_ROWS} lines of `question<TAB>answer`; download it again or pass "
            "--dataset PATH.",
        )
    text = _decode(data, path)
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    items: list[MgsmItem] = []
    for lineno, raw in enumerate(lines, start=1):
        if "\r" in raw.rstrip("\r"):
            cr_only = len(lines) == 1 or all("\r" in ln.rstrip("\r") for ln in lines if ln.strip())
            raise InvalidDataset(
                path,
                lineno,
                "the line ends are carriage returns only (old Mac style), so the file reads as one line"
                if cr_only
                else "a carriage return (CR) inside the line",
                "Convert the line ends to LF, for example `tr '\\r' '\\n' < in.tsv > out.tsv`."
                if cr_only
                else "Remove it: rows end with LF or CRLF, and a question holds no CR.",
            )
        row = raw.rstrip("\r").strip()
        if not row:
            raise InvalidDataset(
                path,
                lineno,
                "blank line between rows",
                "Remove it: every line must be `question<TAB>answer`.",
            )
        cols = row.split("\t")
        if len(cols) == 1 and "\t" in raw:  # the TAB was at an end and strip() took it
            before, _, after = raw.strip(" \r\n").partition("\t")
            if not after.strip():
                raise InvalidDataset(
                    path,
                    lineno,
                    "the answer is empty (nothing after the TAB)",
                    "Each line needs an integer answer after the TAB, such as `question<TAB>18`.",
                )
            if not before.strip():
                raise InvalidDataset(
                    path, lineno, "the question is empty", "Each line needs a question before the TAB."
                )
        if len(cols) != 2:
            fix = (
                "Separate the question and the answer with one TAB character (not spaces)."
                if len(cols) == 1
                else "A question must not contain TAB characters; each line holds exactly one TAB."
            )
            raise InvalidDataset(
                path, lineno, f"expected 2 tab-separated columns (question, answer), found {len(cols)}", fix
            )
        question, target = cols[0], cols[1].strip()
        if not question.strip():
            raise InvalidDataset(
                path, lineno, "the question is empty", "Each line needs a question before the TAB."
            )
        if not _TARGET.fullmatch(target):
            shown = target if len(target) <= 40 else target[:37] + "..."
            raise InvalidDataset(
                path,
                lineno,
                f"the answer {shown!r} is not an integer",
                "MGSM answers are whole numbers such as 18, -5 or 2,125 (no decimals, units or words).",
            )
        items.append(MgsmItem(index=len(items), line=lineno, question=question, target=target, lang=lang))
    return tuple(items)


_FILE_NAME = re.compile(r"mgsm_([a-z]{2})\.tsv", re.IGNORECASE)


def _wrong_language(path: Path, lang: str, other: str, why: str) -> InvalidDataset:
    return InvalidDataset(
        path,
        None,
        f"{why} MGSM-{other}, but the language asked for is {lang}",
        f"Pass --lang {other} to evaluate this file, or give the MGSM-{lang} file "
        f"(mgsm_{lang}.tsv) to --dataset.",
    )


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _read_bounded(p: Path, lang: str, limit: int = MAX_DATASET_BYTES) -> bytes:
    """The bytes of the regular file ``p``, at most ``limit`` of them.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor before any read, so a FIFO
    neither blocks the open nor the read, and a device (``/dev/zero``) is never read.

    Raises:
        InvalidDataset: missing, a directory, not a regular file, unreadable, or larger than ``limit`` bytes.
    """
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    )
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise InvalidDataset(
            p, None, "no such file", "Check the path given to --dataset (or MLAPROP_DATASET, its default)."
        ) from None
    except IsADirectoryError:
        raise InvalidDataset(
            p, None, "is a directory", f"Give the TSV file itself, e.g. {p / f'mgsm_{lang}.tsv'}."
        ) from None
    except OSError as exc:
        raise InvalidDataset(p, None, f"cannot be read ({exc.strerror})", "Check its permissions.") from None
    too_big = InvalidDataset(
        p,
        None,
        f"is larger than {limit // (1024 * 1024)} MiB, far larger than any MGSM file (58-177 KB)",
        f"Give the MGSM TSV itself (mgsm_{lang}.tsv, 250 rows).",
    )
    chunks: list[bytes] = []
    size = 0
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidDataset(
                p, None, "is a directory", f"Give the TSV file itself, e.g. {p / f'mgsm_{lang}.tsv'}."
            )
        if not stat.S_ISREG(info.st_mode):
            raise InvalidDataset(
                p,
                None,
                f"is {_file_kind(info.st_mode)}, not a regular file",
                "Save the MGSM TSV to a file and pass that file's path.",
            )
        if info.st_size > limit:
            raise too_big
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InvalidDataset(p, None, f"cannot be read ({exc.strerror})", "Check its permissions.") from None
    finally:
        os.close(fd)
    if size > limit:
        raise too_big
    return b"".join(chunks)


def load_dataset(path: str | os.PathLike[str], lang: str = "en") -> MgsmDataset:
    """Read and validate an MGSM TSV file.

    Only a regular file of at most :data:`MAX_DATASET_BYTES` bytes is read: a FIFO, a device such as
    ``/dev/zero`` or a socket is refused before any read (it would hang or never end).

    Raises:
        InvalidDataset: the file is missing, unreadable, not a regular file, larger than
            :data:`MAX_DATASET_BYTES`, or malformed (see :func:`parse_dataset`), or it is
            another language's: named ``mgsm_<other>.tsv``, or byte for byte another language's published
            file (the prompt and the answer prefix would be ``lang``'s, and the score meaningless).
        ValueError: unknown ``lang``.
    """
    _check_lang(lang)
    p = Path(path)
    data = _read_bounded(p, lang)
    digest = hashlib.sha256(data).hexdigest()
    for other, pinned in DATASET_SHA256.items():
        if digest == pinned and other != lang:
            raise _wrong_language(p, lang, other, "it is the published file of")
    named = _FILE_NAME.fullmatch(p.name)
    if named and named.group(1).lower() in LANGUAGES and named.group(1).lower() != lang:
        raise _wrong_language(p, lang, named.group(1).lower(), "its name says")
    items = parse_dataset(data, lang=lang, path=str(p))
    return MgsmDataset(
        lang=lang, path=str(p), sha256=digest, items=items, canonical=digest == DATASET_SHA256[lang]
    )


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/mlaprop/mgsm``, or ``~/.cache/mlaprop/mgsm`` when that is unset or empty.

    ``environ`` defaults to ``os.environ`` (the XDG Base Directory rule: a relative value is ignored).
    """
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "mlaprop" / "mgsm"


def _how_to_provide(lang: str, cached: Path) -> str:
    return (
        f"Provide the file yourself: pass --dataset PATH, or put a copy of "
        f"{DATASET_URL.format(lang=lang)} at {cached} (SHA-256 {DATASET_SHA256[lang]})."
    )


def _download(url: str, timeout_s: float, limit: int = MAX_DATASET_BYTES) -> bytes:
    with requests.get(url, timeout=(min(10.0, timeout_s), timeout_s), stream=True) as resp:
        if resp.status_code != 200:
            raise OSError(f"HTTP {resp.status_code} from {url}")
        body = bytearray()
        for chunk in resp.iter_content(chunk_size=1 << 16):
            body += chunk
            if len(body) > limit:
                raise OSError(f"the answer from {url} is larger than {limit} bytes; no MGSM file is")
        return bytes(body)


def resolve_dataset(
    lang: str = "en",
    dataset: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str | None = None,
    timeout_s: float = 60.0,
    environ: Mapping[str, str] | None = None,
) -> MgsmDataset:
    """Find, fetch if needed, verify and load the MGSM file for ``lang``.

    With ``dataset`` that file is used as is (its digest is still compared, see ``MgsmDataset.canonical``).
    Otherwise the cache (``cache_dir``, default :func:`default_cache_dir`) is used when its copy matches the
    pinned SHA-256; a missing or mismatching copy is downloaded from ``url`` (default :data:`DATASET_URL`),
    verified, and written atomically.

    Args:
        timeout_s: per-request download timeout, seconds.
        download: ``False`` never touches the network.

    Raises:
        InvalidDataset: the file is malformed (see :func:`parse_dataset`).
        DatasetUnavailable: no valid cached copy and the download failed, was disabled, or returned bytes
            with another digest; the message says how to provide the file.
        ValueError: unknown ``lang``.
    """
    _check_lang(lang)
    if dataset is not None:
        return load_dataset(dataset, lang)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(environ)
    cached = folder / f"mgsm_{lang}.tsv"
    pinned = DATASET_SHA256[lang]
    stale = ""
    if cached.is_file():
        try:
            data = _read_bounded(cached, lang)
        except InvalidDataset:
            data = b""  # unreadable or oversized: treated as stale, replaced by a download
        if hashlib.sha256(data).hexdigest() == pinned:
            return load_dataset(cached, lang)
        stale = f"The cached copy {cached} does not match the pinned SHA-256 (corrupt or truncated). "
    if not download:
        raise DatasetUnavailable(
            f"MGSM-{lang} is not in the cache and downloads are off. {stale}" + _how_to_provide(lang, cached)
        )
    source = url or DATASET_URL.format(lang=lang)
    try:
        data = _download(source, timeout_s)
    except (OSError, requests.RequestException) as exc:
        raise DatasetUnavailable(
            f"Could not download MGSM-{lang} from {source} ({type(exc).__name__}: {exc}); "
            f"no valid copy in the cache. {stale}" + _how_to_provide(lang, cached)
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise DatasetUnavailable(
            f"The file downloaded from {source} has SHA-256 {digest}, not the pinned {pinned} "
            "(changed upstream, or a proxy/captive portal answered). Nothing was cached. "
            + _how_to_provide(lang, cached)
        )
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".mgsm_{lang}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, cached)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return load_dataset(cached, lang)


# --------------------------------------------------------------------------------------------- prompt


def build_prompt(question: str, lang: str = "en") -> str:
    """The user message SGLang's ``mgsm_<lang>`` sends: the instruction, a blank line, the question.

    Raises:
        ValueError: unknown ``lang``.
    """
    return LANG_TO_INSTRUCTIONS[_check_lang(lang)].format(input=question)


def chat_request(item: MgsmItem, model: str) -> dict[str, object]:
    """The ``POST /v1/chat/completions`` body for ``item``: one user message, temperature 0, 2048 tokens."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": build_prompt(item.question, item.lang)}],
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
    }


# --------------------------------------------------------------------------------------------- extractors


class Parser(str, enum.Enum):
    """Answer extractors. ``simple-evals`` gates by default so scores compare with SGLang's."""

    SIMPLE_EVALS = "simple-evals"
    ROBUST = "robust"

    def __str__(self) -> str:
        return str(self.value)


_SE_NUMBER = re.compile(r"\d+\.?\d*")


def parse_answer_simple_evals(response: str, answer_prefix: str = "Answer") -> str:
    """simple-evals' ``parse_answer``, behaviour for behaviour.

    Needs the exact, case-sensitive prefix; takes the text after its last occurrence, removes commas, and
    returns the **last** unsigned number in it with a trailing ``.`` removed, or ``""``. Its known misses are
    kept on purpose: ``answer: 18`` -> ``""``, ``Answer: -5`` -> ``"5"``, ``Answer: 18 (from 2 x 9)`` ->
    ``"9"``, ``The answer is 72.`` -> ``""``.
    """
    if answer_prefix not in response:
        return ""
    answer_text = response.split(answer_prefix)[-1].strip()
    numbers = _SE_NUMBER.findall(answer_text.replace(",", ""))
    return numbers[-1].rstrip(".") if numbers else ""


def score_simple_evals(target: str, prediction: str) -> bool:
    """simple-evals' ``score_mgsm``: string equality after dropping commas and trailing decimal zeros."""
    if "." in prediction:
        prediction = prediction.rstrip("0").rstrip(".")
    return target.replace(",", "") == prediction.replace(",", "")


# A number: optional sign (ASCII hyphen or U+2212), optional $, digits with or without thousands commas,
# optional decimals. Not preceded by a letter, digit, dot or hyphen ("2-3" and "x9" are not "-3" and "9").
_ROBUST_NUMBER = re.compile(r"(?<![\w.\-−])([-−]?)\s?\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d,]\d)")
_BRACKETED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _normalise_number(match: re.Match[str]) -> str:
    sign, digits, decimals = match.group(1), match.group(2).replace(",", ""), match.group(3) or ""
    try:
        value = Decimal(digits + decimals)
    except InvalidOperation:  # pragma: no cover - the regex only admits digits
        return ""
    if sign:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str:
    m = _ROBUST_NUMBER.search(text)
    return _normalise_number(m) if m else ""


def _last_number(text: str) -> str:
    found = list(_ROBUST_NUMBER.finditer(text))
    return _normalise_number(found[-1]) if found else ""


def _answer_line_number(after: str) -> str:
    """The number right after an answer marker: on the rest of its line, else on the next non-empty one."""
    lines = after.split("\n")
    candidates = [lines[0]]
    rest = [ln for ln in lines[1:] if ln.strip()]
    if rest and not re.search(r"\d", lines[0]):
        candidates.append(rest[0])
    for line in candidates:
        line = _BRACKETED.sub(" ", line)
        if "=" in line:  # "Answer: 3 + 4 = 7"
            line = line.rsplit("=", 1)[1]
        found = _first_number(line)
        if found:
            return found
    return ""


def _prefix_pattern(lang: str) -> re.Pattern[str]:
    prefixes = {LANG_TO_ANSWER_PREFIX[lang], "Answer"}
    parts = []
    for p in sorted(prefixes, key=len, reverse=True):
        if p.isascii():  # a word: not inside "answered" or "reanswer"
            parts.append(rf"(?<![^\W\d_]){re.escape(p)}(?![^\W\d_])")
        else:
            parts.append(re.escape(p))
    return re.compile("|".join(parts), re.IGNORECASE)


_CONNECTOR = re.compile(
    r"[\s*_#]*(?:[:：]|(?:is|was|would\s+be|will\s+be|should\s+be|equals|=)(?![^\W\d_]))", re.IGNORECASE
)


def parse_answer_robust(response: str, lang: str = "en") -> str:
    """Extract the final answer, fixing simple-evals' known misses; returns a normalised number or ``""``.

    Rules, in order:
      1. The last answer marker followed by a number: a prefix (the language's, or English ``answer``; any
         case; a whole word) followed by ``:`` or by ``is``/``was``/``=``. Its number is the **first** one on
         the rest of the line (or on the next non-empty line when the rest has none), ignoring bracketed
         asides and taking what follows the last ``=``.
      2. Otherwise the last ``\\boxed{...}``.
      3. Otherwise the last number on the last non-empty line.
    Numbers keep their sign, lose ``$`` and thousands commas, and trailing decimal zeros:
    ``answer: 18`` -> ``18``; ``Answer: -5`` -> ``-5``; ``Answer: 18 (from 2 x 9)`` -> ``18``;
    ``Answer: 18\\n\\nNote: she keeps 3 eggs.`` -> ``18``; ``The answer is 72.`` -> ``72``;
    ``Answer: $1,234.00`` -> ``1234``.

    Raises:
        ValueError: unknown ``lang``.
    """
    _check_lang(lang)
    text = response.replace("\r\n", "\n")
    for m in reversed(list(_prefix_pattern(lang).finditer(text))):
        connector = _CONNECTOR.match(text, m.end())
        if connector is None:
            continue
        found = _answer_line_number(text[connector.end() :])
        if found:
            return found
    boxed = _BOXED.findall(text)
    if boxed:
        found = _first_number(boxed[-1])
        if found:
            return found
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return _last_number(lines[-1]) if lines else ""


def score_robust(target: str, prediction: str) -> bool:
    """Numeric equality of ``prediction`` (from :func:`parse_answer_robust`) and ``target``; ``""`` fails."""
    if not prediction:
        return False
    try:
        return Decimal(prediction.replace(",", "")) == Decimal(target.replace(",", ""))
    except InvalidOperation:
        return False


def extract(parser: Parser, response: str, lang: str = "en") -> str:
    """The answer ``parser`` reads from ``response`` (``""`` when none)."""
    if Parser(parser) is Parser.SIMPLE_EVALS:
        return parse_answer_simple_evals(response, LANG_TO_ANSWER_PREFIX[_check_lang(lang)])
    return parse_answer_robust(response, lang)


def is_correct(parser: Parser, target: str, extracted: str) -> bool:
    """Whether ``extracted`` (from :func:`extract` with the same ``parser``) matches ``target``."""
    if Parser(parser) is Parser.SIMPLE_EVALS:
        return score_simple_evals(target, extracted)
    return score_robust(target, extracted)
