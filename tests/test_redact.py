"""Tests for ``mlaprop.redact``: secrets become ``***`` in text, argv and environments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlaprop.redact import MASK, is_secret_name, redact, redact_argv, redact_env

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
            ("--max-total-tokens", False),
            ("HF_HOME", False),
            ("SGLANG_IS_IN_CI_AMD", False),
        ],
    )
    def test_is_secret_name(self, name: str, secret: bool) -> None:
        assert is_secret_name(name) is secret


def test_url_credentials_are_masked() -> None:
    """``scheme://user:password@host`` keeps the scheme and host, hides the credentials."""
    from mlaprop.redact import redact as _redact

    assert (
        _redact("eval --base-url http://user:pw@127.0.0.1:1/x") == "eval --base-url http://***@127.0.0.1:1/x"
    )
    assert _redact("https://example.org/a@b") == "https://example.org/a@b"
