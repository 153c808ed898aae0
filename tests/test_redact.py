"""Tests for ``mlaprop.redact``: secrets become ``***`` in text, argv and environments."""

from __future__ import annotations

import json
import shlex
import urllib.parse

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from mlaprop.redact import (
    MASK,
    LogFilter,
    Redactor,
    is_secret_name,
    redact,
    redact_argv,
    redact_env,
    secrets_in,
)

# secret values as people write them: letters, digits, - _ . (never only digits, never "None")
secrets = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{5,40}", fullmatch=True).filter(lambda s: s != "None")


class TestRedact:
    """Tests for ``redact``."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("--api-key sk-123 --port 5", "--api-key *** --port 5"),
            ("--api-key=abc --x", "--api-key=*** --x"),
            ("--admin-api-key abc", "--admin-api-key ***"),
            ("HF_TOKEN=hf_abc", "HF_TOKEN=***"),
            ("export HUGGING_FACE_HUB_TOKEN='tok'", "export HUGGING_FACE_HUB_TOKEN='***'"),
            ("OPENAI_API_KEY: sk-xyz", "OPENAI_API_KEY: ***"),
            ("{'MY_SECRET': 'hunter2', 'A': 1}", "{'MY_SECRET': '***', 'A': 1}"),
            ('{"GITHUB_TOKEN": "ghp_x"}', '{"GITHUB_TOKEN": "***"}'),
            (
                "ServerArgs(model_path='m', api_key='s3', port=1)",
                "ServerArgs(model_path='m', api_key='***', port=1)",
            ),
            ("ServerArgs(api_key=None, admin_api_key=None)", "ServerArgs(api_key=None, admin_api_key=None)"),
            ("Authorization: Bearer x", "Authorization: Bearer ***"),
            ("{'Authorization': 'Bearer abc'}", "{'Authorization': 'Bearer ***'}"),
            ("curl -H 'authorization: bearer abcdefgh'", "curl -H 'authorization: bearer ***'"),
            ("token is hf_AbCdEfGhIjKl here", "token is *** here"),
        ],
    )
    def test_secrets_are_masked(self, text: str, expected: str) -> None:
        """Each secret value becomes ``***``; its name and the rest of the line stay."""
        assert redact(text) == expected

    @pytest.mark.parametrize(
        "text",
        [
            "Prefill batch. #new-seq: 1, #new-token: 7, #cached-token: 0, token usage: 0.00, #running-req: 0",
            "max_new_tokens=5 completion_tokens: 12 HF_TOKENIZER=x use_hf_transfer",
            "The server is fired up and ready to roll!",
            "ValueError: Currently only ['flashinfer', 'fa3', 'triton'] attention backends are supported",
            "--tokenizer-path /models/x --skip-tokenizer-init --max-total-tokens 4096",
        ],
    )
    def test_ordinary_lines_are_unchanged(self, text: str) -> None:
        """SGLang's ordinary log lines and flags pass through untouched."""
        assert redact(text) == text

    @given(secret=secrets)
    def test_no_form_leaks_the_secret(self, secret: str) -> None:
        """Whatever the value, none of the usual spellings shows it."""
        forms = [
            f"--api-key {secret}",
            f"--api-key={secret}",
            f"HF_TOKEN={secret}",
            f"SGLANG_API_KEY={secret}",
            f"api_key='{secret}'",
            f"Authorization: Bearer {secret}",
            f"x hf_{secret.replace('-', 'a').replace('_', 'b').replace('.', 'c')}0123456789 y",
        ]
        for form in forms:
            out = redact(form)
            assert secret not in out, form
            assert MASK in out


class TestArgvAndEnv:
    """Tests for ``redact_argv``, ``redact_env`` and ``is_secret_name``."""

    def test_argv(self) -> None:
        """Values after secret flags, ``--flag=value`` forms and embedded tokens are masked; length kept."""
        argv = [
            "python",
            "--api-key",
            "k",
            "--port",
            "1",
            "--hf-token=hf_abcdefghijkl",
            "HF_TOKEN=x",
            "--api-key",
        ]
        assert redact_argv(argv) == [
            "python",
            "--api-key",
            MASK,
            "--port",
            "1",
            "--hf-token=***",
            "HF_TOKEN=***",
            "--api-key",
        ]

    def test_flag_followed_by_a_flag_is_not_consumed(self) -> None:
        assert redact_argv(["--api-key", "--port", "5"]) == ["--api-key", "--port", "5"]

    def test_env(self) -> None:
        """Secret-named values are masked, others are redacted text; empty values stay empty."""
        env = {"HF_TOKEN": "x", "PATH": "/bin", "NOTE": "hf_abcdefghijkl", "EMPTY_TOKEN": "", "A_SECRET": "s"}
        assert redact_env(env) == {
            "HF_TOKEN": MASK,
            "PATH": "/bin",
            "NOTE": MASK,
            "EMPTY_TOKEN": "",
            "A_SECRET": MASK,
        }

    @pytest.mark.parametrize(
        ("name", "secret"),
        [
            ("HF_TOKEN", True),
            ("--api-key", True),
            ("api_key", True),
            ("OPENAI_API_KEY", True),
            ("DB_PASSWORD", True),
            ("AWS_SECRET_ACCESS_KEY", True),
            ("AWS_ACCESS_KEY_ID", True),
            ("PASSWD", True),
            ("NPM_AUTH", True),
            ("GOOGLE_APPLICATION_CREDENTIALS", True),
            ("--max-total-tokens", False),
            ("MAX_TOKENS", False),
            ("AUTHOR", False),
            ("HF_HOME", False),
            ("SGLANG_IS_IN_CI_AMD", False),
        ],
    )
    def test_is_secret_name(self, name: str, secret: bool) -> None:
        assert is_secret_name(name) is secret


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG", "wJalrXUtnFEMIK7MDENG"),
        ("aws_access_key: AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("NPM_AUTH=npm_s3cr3tvalue", "npm_s3cr3tvalue"),
        ("passwd='hunter two'", "hunter two"),
        ("--db-passwd hunter2", "hunter2"),
        ("GCP_PRIVATE_KEY=abcdef123", "abcdef123"),
    ],
)
def test_more_secret_names_are_masked_in_text(text: str, hidden: str) -> None:
    """Values of AWS, npm, passwd and private-key style names are masked in free text."""
    from mlaprop.redact import redact as _redact

    out = _redact(text)
    assert hidden not in out
    assert MASK in out


def test_url_credentials_are_masked() -> None:
    """``scheme://user:password@host`` keeps the scheme and host, hides the credentials."""
    from mlaprop.redact import redact as _redact

    assert (
        _redact("eval --base-url http://user:pw@127.0.0.1:1/x") == "eval --base-url http://***@127.0.0.1:1/x"
    )
    assert _redact("https://example.org/a@b") == "https://example.org/a@b"


# any value a person could choose as a key: printable, quotes, backslashes, spaces and non-ASCII included
any_secret = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("'\"\\ %+/&="),
    min_size=6,
    max_size=30,
).filter(lambda s: s.strip() == s and s.lower() not in {"true", "false", "none", "null"})


class TestRedactor:
    """Tests for masking by value: ``Redactor``, ``secrets_in``, ``LogFilter``."""

    @given(secret=any_secret)
    def test_every_encoding_of_a_known_secret_is_masked(self, secret: str) -> None:
        """Whatever the value, bare, quoted, repr'd, JSON-escaped (twice too), URL-encoded, shell-quoted and
        in an exception text, no spelling survives; the text around it does."""
        assume(not secret.isdigit())
        r = Redactor((secret,))
        event("non-ascii" if not secret.isascii() else "ascii")
        event("needs escaping" if repr(secret)[1:-1] != secret else "plain")
        texts = [
            f"value {secret} end",
            f"argv: {['--api-key', secret]!r}",
            json.dumps({"message": f"bad key {secret}"}),
            json.dumps({"detail": repr(secret)}),
            json.dumps(json.dumps({"k": secret})),
            f"GET /x?key={urllib.parse.quote(secret, safe='')}",
            f"GET /x?key={urllib.parse.quote_plus(secret)}",
            f"$ serve --token {shlex.quote(secret)}",
            f"ValueError: invalid key {secret!r}",
            f"b{secret.encode()!r}",
        ]
        for text in texts:
            out = r(text)
            assert secret not in out, text
            assert MASK in out, text

    @pytest.mark.parametrize(
        "argv",
        [
            ["--api-key", "sk-abcdef"],
            ["--api-key=sk-abcdef"],
            ["--api-ke", "sk-abcdef"],
            ["--admin-api-key", "sk-abcdef"],
            ["--hf-token=sk-abcdef"],
            ["--model", "m", "--base-url", "http://user:sk-abcdef@host/x"],
        ],
    )
    def test_secrets_in_argv_in_every_spelling_sglang_accepts(self, argv: list[str]) -> None:
        """Each spelling argparse accepts for a secret flag, and URL credentials, yield the value."""
        assert "sk-abcdef" in secrets_in(argv)

    def test_secrets_in_environment(self) -> None:
        """Secret-named variables, URL credentials and hf_ tokens in any variable; short and boolean
        values and ordinary variables are left out."""
        env = {
            "HF_TOKEN": "hf_AbCdEfGhIjKlMn",
            "OPENAI_API_KEY": "sk-openai",
            "MY_SERVICE_TOKEN": "tok-12345",
            "HTTPS_PROXY": "http://bob:pr0xy-pass@proxy:3128",
            "NOTE": "uses hf_ZyXwVuTsRqPo",
            "SHORT_TOKEN": "abc",
            "FLAG_TOKEN": "true",
            "PATH": "/usr/bin",
            "MAX_TOKENS": "4096",
        }
        found = secrets_in(environ=env)
        for value in ("hf_AbCdEfGhIjKlMn", "sk-openai", "tok-12345", "pr0xy-pass", "hf_ZyXwVuTsRqPo"):
            assert value in found
        for value in ("abc", "true", "/usr/bin", "4096"):
            assert value not in found

    def test_from_sources_masks_values_and_patterns(self) -> None:
        """The redactor built from argv and environ masks the bare values and still every pattern."""
        r = Redactor.from_sources(
            argv=["--api-key", "sk-srv-1234"], environ={"OPENAI_API_KEY": "sk-oai-5678"}, extra=["x"]
        )
        assert r.secrets == ("sk-srv-1234", "sk-oai-5678")  # "x" is too short to mask by value
        assert r("a sk-srv-1234 b sk-oai-5678 c HF_TOKEN=zzz") == "a *** b *** c HF_TOKEN=***"

    def test_followed_by_merges_redactors_and_chains_callables(self) -> None:
        """A Redactor's secrets are merged; any other ``str -> str`` runs after, in order."""
        r = Redactor(("first-secret",)).followed_by(Redactor(("second-secret",)))
        assert r.secrets == ("first-secret", "second-secret")
        chained = r.followed_by(lambda t: t.replace("a", "4")).followed_by(lambda t: t.upper())
        assert chained("a first-secret b second-secret") == "4 *** B ***"

    def test_short_values_are_not_masked_by_value(self) -> None:
        """A 3-character key would garble every text it appears in: masked by pattern only."""
        r = Redactor(("abc", "1"))
        assert r("abc 1 --api-key abc") == "abc 1 --api-key ***"

    def test_partial_tail_of_a_cut_secret_is_masked(self) -> None:
        r = Redactor(("sk-secret-abcdef",))
        assert r.mask_partial_tail("log sk-secret-ab") == "log ***"
        assert r.mask_partial_tail("log sk-") == "log sk-"  # fewer than 4 characters say nothing


class TestLogFilter:
    """Tests for the streaming log filter."""

    @given(
        lines=st.lists(st.text(alphabet="ab =:-_'\"", max_size=40), max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    )
    def test_output_does_not_depend_on_how_the_input_is_split(
        self, lines: list[str], cuts: list[int]
    ) -> None:
        """Fed in arbitrary pieces, the filter writes exactly what it writes when fed the whole log."""
        data = "\n".join(lines).encode()
        r = Redactor(("ab=ab",))
        whole = LogFilter(r)
        expected = whole.feed(data) + whole.close()
        pieces = LogFilter(r)
        got = b""
        start = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts):
            got += pieces.feed(data[start:cut])
            start = max(start, cut)
        got += pieces.feed(data[start:]) + pieces.close()
        event(f"{len(cuts)} cuts")
        assert got == expected

    def test_long_lines_are_cut_and_marked_and_memory_is_bounded(self) -> None:
        """A 1 MB line fed in 64 KiB reads: the filter holds at most max_line bytes and marks the cut."""
        f = LogFilter(Redactor(("sk-secret-abcdef",)), max_line=1024)
        line = b"x" * 1010 + b"sk-secret-abcdef" + b"y" * (1024 * 1024)
        out = b""
        for i in range(0, len(line), 65536):
            out += f.feed(line[i : i + 65536])
            assert len(f._partial) <= 1024
        out += f.feed(b"\nnext sk-secret-abcdef line\n")
        first, second, _ = out.split(b"\n")
        assert first.startswith(b"x" * 1010 + b"***")
        assert first.endswith(b"[mlaprop: %d bytes cut]" % (len(line) - 1024))
        assert b"abcdef" not in first and b"sk-secret" not in first
        assert second == b"next *** line"
        assert f.lines_cut == 1

    def test_lines_are_redacted_by_pattern_and_value(self) -> None:
        f = LogFilter(Redactor(("opaque-value-42",)))
        out = f.feed(b"ServerArgs(api_key='k1') x\nerror: opaque-value-42\npartial") + f.close()
        assert out == b"ServerArgs(api_key='***') x\nerror: ***\npartial\n"
