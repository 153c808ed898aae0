"""Regression cases for ``compose``: the environments that broke or nearly broke SGLang's MLA FP8 CI."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlaprop.args import read_plan
from mlaprop.capabilities import capabilities_for
from mlaprop.compose import DETERMINISTIC_FLAG, UnsupportedCombination, compose, resolve_backend
from mlaprop.detect import HardwareProbe, detect_environment
from mlaprop.environment import (
    Action,
    AttentionBackend,
    CIMarkers,
    Environment,
    InvalidEnvironment,
    KVCacheDtype,
    LaunchRequest,
    Vendor,
)

B = AttentionBackend


def _probe(vendor: Vendor, arch: str, count: int = 8, hip: bool = False, cuda: str | None = "12.8"):  # type: ignore[no-untyped-def]
    return lambda: HardwareProbe(vendor, arch, count, True, hip, cuda, "test")


def _decided(plan, action: Action, subject: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.reason for d in plan.decisions if d.action is action and d.subject == subject]


# (id, environ, probe, request, flag expected, predicted backend, explicit --attention-backend or None)
CASES = [
    (
        "rocm-gfx942-no-backend",
        {"MLAPROP_SGLANG_VERSION": "0.5.11"},
        _probe(Vendor.AMD, "gfx942", hip=True, cuda=None),
        LaunchRequest(),
        False,
        B.AITER,
        None,
    ),
    (
        "h200-sm90-ci",
        {"SGLANG_IS_IN_CI": "true", "MLAPROP_SGLANG_VERSION": "0.5.11"},
        _probe(Vendor.NVIDIA, "sm90"),
        LaunchRequest(),
        True,
        B.TRITON,
        None,
    ),
    (
        "cuda-box-with-amd-ci-marker",
        {"SGLANG_IS_IN_CI_AMD": "1"},
        _probe(Vendor.NVIDIA, "sm90"),
        LaunchRequest(),
        False,
        B.TRITON,
        None,
    ),
    (
        "rocm-with-marker-unset",
        {},
        _probe(Vendor.AMD, "gfx942", hip=True, cuda=None),
        LaunchRequest(),
        False,
        B.AITER,
        None,
    ),
    (
        "amd-ci-marker-yes",
        {"SGLANG_IS_IN_CI_AMD": "yes"},
        _probe(Vendor.NVIDIA, "sm90"),
        LaunchRequest(),
        False,
        B.TRITON,
        None,
    ),
    (
        "b200-sm100-deepseek",
        {"MLAPROP_SGLANG_VERSION": "0.5.23"},
        _probe(Vendor.NVIDIA, "sm100", cuda="12.9"),
        LaunchRequest(),
        True,
        B.TRITON,
        None,
    ),
    (
        "a100-sm80-deterministic-e4m3",
        {"MLAPROP_SGLANG_VERSION": "0.5.23"},
        _probe(Vendor.NVIDIA, "sm80"),
        LaunchRequest(kv_cache_dtype=KVCacheDtype.FP8_E4M3),
        True,
        B.TRITON,
        B.TRITON,
    ),
    (
        "a100-sm80-deterministic-e5m2",
        {"MLAPROP_SGLANG_VERSION": "0.5.23"},
        _probe(Vendor.NVIDIA, "sm80"),
        LaunchRequest(),
        True,
        B.TRITON,
        None,
    ),
    (
        "rocm-tp2",
        {"MLAPROP_SGLANG_VERSION": "0.5.11"},
        _probe(Vendor.AMD, "gfx942", hip=True, cuda=None),
        LaunchRequest(tp_size=2),
        False,
        B.TRITON,
        None,
    ),
    (
        "rocm-hip-and-rocr-masks",
        {"HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "1,2"},
        lambda: HardwareProbe(Vendor.AMD, "gfx942", 8, False, True, None, "rocminfo"),
        LaunchRequest(),
        False,
        B.AITER,
        None,
    ),
]


@pytest.mark.parametrize(
    ("environ", "probe", "request_", "flag", "predicted", "explicit"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_regression(environ, probe, request_, flag, predicted, explicit):  # type: ignore[no-untyped-def]
    """Each named environment gets the flag exactly where it should, the predicted backend, and sets
    ``--attention-backend`` only where SGLang's own choice would be wrong."""
    env = detect_environment(environ, probe=probe)
    plan = compose(env, request_)
    assert (DETERMINISTIC_FLAG in plan.argv) is flag
    assert plan.attention_backend is predicted
    assert plan.option("--attention-backend") == (explicit.value if explicit else None)
    if not flag:
        assert _decided(plan, Action.DROPPED, DETERMINISTIC_FLAG)


def test_cuda_box_with_amd_marker_records_the_conflict():
    """``SGLANG_IS_IN_CI_AMD=1`` on NVIDIA hardware: the AMD signal wins and a decision names the conflict."""
    env = detect_environment({"SGLANG_IS_IN_CI_AMD": "1"}, probe=_probe(Vendor.NVIDIA, "sm90"))
    plan = compose(env)
    (conflict,) = _decided(plan, Action.NOTED, "vendor")
    assert "AMD signal on NVIDIA hardware" in conflict and "SGLANG_IS_IN_CI_AMD='1'" in conflict


def test_marker_yes_records_that_sglang_parsers_disagree():
    """``yes`` is false to ``is_in_amd_ci`` and true to ``EnvBool``: the plan says so."""
    plan = compose(Environment(ci=CIMarkers(None, "yes")))
    (note,) = _decided(plan, Action.NOTED, "SGLANG_IS_IN_CI_AMD")
    assert "False to SGLang's is_in_amd_ci" in note and "True to EnvBool" in note


def test_rocm_tp2_on_old_sglang_turns_off_fused_decode_mla():
    """ROCm, tp=2 resolves to triton; SGLang 0.5.11 applies fused decode MLA to every backend, so the plan
    sets ``SGLANG_ROCM_FUSED_DECODE_MLA=0``; 0.5.23 does not need it."""
    old = compose(
        Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, sglang_version="0.5.11", gpu_count=2),
        LaunchRequest(tp_size=2),
    )
    new = compose(
        Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, sglang_version="0.5.23", gpu_count=2),
        LaunchRequest(tp_size=2),
    )
    assert dict(old.env) == {"SGLANG_ROCM_FUSED_DECODE_MLA": "0"}
    assert dict(new.env) == {}
    assert old.option("--tp-size") == "2"


def test_both_rocm_masks_set_is_reported():
    """Both ``HIP_VISIBLE_DEVICES`` and ``ROCR_VISIBLE_DEVICES``: HIP indexes into ROCR's list; a note says
    so, and the visible count follows both masks."""
    env = detect_environment(
        {"HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "1,2"},
        probe=lambda: HardwareProbe(Vendor.AMD, "gfx942", 8, False, True, None, "rocminfo"),
    )
    assert env.gpu_count == 1
    assert any("both ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES" in n for n in env.notes)
    hidden = detect_environment(
        {"HIP_VISIBLE_DEVICES": "2", "ROCR_VISIBLE_DEVICES": "1,2"},
        probe=lambda: HardwareProbe(Vendor.AMD, "gfx942", 8, False, True, None, "rocminfo"),
    )
    assert hidden.gpu_count == 0
    with pytest.raises(UnsupportedCombination, match="hide every device"):
        compose(hidden)


def test_old_composition_on_rocm_0_5_11_is_sglangs_value_error():
    """The seed failure, modelled: deterministic forced onto ROCm with SGLang 0.5.11 resolves to aiter first
    and fails the allow-list with SGLang's own message."""
    with pytest.raises(UnsupportedCombination) as err:
        resolve_backend(
            rocm=True,
            arch="gfx942",
            cuda_version=None,
            capabilities=capabilities_for("0.5.11"),
            deterministic=True,
            explicit=None,
            kv_cache_dtype=KVCacheDtype.FP8_E5M2,
            tp_size=1,
            kv_heads=16,
            deepseek_family=True,
        )
    assert (
        "Currently only ['fa3', 'flashinfer', 'triton'] attention backends are supported for deterministic"
        in str(err.value)
    )
    assert "you explicitly specified 'aiter'" in str(err.value)


def test_pre_hopper_fallback_to_fa3_is_overridden_with_triton_and_explained():
    """On sm80 with SGLang >= 0.5.12 the deterministic pass would pick fa3 (needs sm90); mlaprop sets
    triton explicitly and explains why."""
    plan = compose(
        Environment(arch="sm80", sglang_version="0.5.12"), LaunchRequest(kv_cache_dtype=KVCacheDtype.AUTO)
    )
    assert plan.option("--attention-backend") == "triton"
    (why,) = _decided(plan, Action.ADDED, "--attention-backend")
    assert "fa3" in why and "no kernels for sm80" in why


def test_launcher_owned_options_are_refused():
    """``--port`` / ``--model-path`` / ``--host`` in the extra arguments are refused: the launcher owns them."""
    for extra in (("--port", "1234"), ("--model-path", "x"), ("--host=0.0.0.0",), ("--model", "y")):
        with pytest.raises(ValueError, match="set by mlaprop's launcher"):
            compose(Environment(), LaunchRequest(extra_args=extra))


def test_newer_sglang_than_known_uses_newest_rules_and_says_so():
    """A version newer than the newest known composes with the newest rules and a decision saying so."""
    plan = compose(Environment(sglang_version="0.6.1"))
    assert plan.deterministic
    assert any("newer than the newest version mlaprop knows" in d.reason for d in plan.decisions)


# Rules found by the contract suite (tests/contract) against SGLang 0.5.11 and 0.5.23's own pipeline.
@pytest.mark.parametrize(
    ("env", "request_", "flag_backend", "predicted"),
    [
        pytest.param(
            Environment(arch="sm100", cuda_version="12.8", sglang_version="0.5.11"),
            LaunchRequest(),
            "triton",
            B.TRITON,
            id="b200-0.5.11-default-flashinfer-fails-radix",
        ),
        pytest.param(
            Environment(arch="sm100", cuda_version="12.8", sglang_version="0.5.23"),
            LaunchRequest(),
            None,
            B.TRITON,
            id="b200-0.5.23-deterministic-fallback-triton",
        ),
        pytest.param(
            Environment(arch="sm100", cuda_version="12.4", sglang_version="0.5.23"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.FP8_E4M3),
            "triton",
            B.TRITON,
            id="blackwell-old-cuda-falls-back-to-fa3-without-kernels",
        ),
        pytest.param(
            Environment(arch="sm110", cuda_version="13.0", sglang_version="0.5.23"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.AUTO),
            "triton",
            B.TRITON,
            id="sm110-deterministic-fallback-is-fa3",
        ),
        pytest.param(
            Environment(arch="sm80", sglang_version="0.5.23"),
            LaunchRequest(attention_backend=B.FA3),
            "fa3",
            B.TRITON,
            id="explicit-fa3-with-fp8-e5m2-runs-as-triton-off-hopper",
        ),
        pytest.param(
            Environment(arch="sm100", cuda_version="12.8", sglang_version="0.5.23"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.MXFP8),
            None,
            B.TRITON,
            id="mxfp8-on-blackwell",
        ),
    ],
)
def test_contract_found_rules(env, request_, flag_backend, predicted):  # type: ignore[no-untyped-def]
    """Plans where SGLang's real pipeline showed the right answer: the explicit backend mlaprop sets (if any)
    and the backend SGLang resolves to."""
    plan = compose(env, request_)
    assert plan.option("--attention-backend") == flag_backend
    assert plan.attention_backend is predicted


@pytest.mark.parametrize(
    ("env", "request_", "match"),
    [
        pytest.param(
            Environment(sglang_version="0.5.23"),
            LaunchRequest(attention_backend=B.FLASHINFER),
            r"DeepSeek-family .* SGLang allows only ascend, fa3, fa4, triton",
            id="flashinfer-deterministic-deepseek",
        ),
        pytest.param(
            Environment(sglang_version="0.5.23", arch="sm100"),
            LaunchRequest(attention_backend=B.CUTLASS_MLA, deterministic=False),
            "SGLang 0.5.23 has no --attention-backend cutlass_mla",
            id="cutlass-mla-gone-in-0.5.20",
        ),
        pytest.param(
            Environment(sglang_version="0.5.11"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.MXFP8),
            "SGLang 0.5.11 has no --kv-cache-dtype mxfp8",
            id="mxfp8-not-a-choice-in-0.5.11",
        ),
        pytest.param(
            Environment(sglang_version="0.5.23"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.MXFP8),
            "mxfp8 needs an NVIDIA Blackwell GPU",
            id="mxfp8-on-hopper",
        ),
        pytest.param(
            Environment(sglang_version="0.5.23", arch="sm100"),
            LaunchRequest(kv_cache_dtype=KVCacheDtype.NVFP4),
            "does not compose the FP4 KV cache nvfp4",
            id="fp4-kv-is-policy",
        ),
        pytest.param(
            Environment(sglang_version="0.5.23", arch="sm100"),
            LaunchRequest(
                attention_backend=B.TRTLLM_MLA, deterministic=False, kv_cache_dtype=KVCacheDtype.BFLOAT16
            ),
            "trtllm_mla accepts only auto, bf16, fp8_e4m3",
            id="trtllm-mla-rejects-bfloat16-spelling",
        ),
    ],
)
def test_contract_found_refusals(env, request_, match):  # type: ignore[no-untyped-def]
    """Requests SGLang itself rejects (or mlaprop's FP4 policy) are refused before any launch, saying why."""
    with pytest.raises(UnsupportedCombination, match=match):
        compose(env, request_)


@pytest.mark.parametrize("version", ["0.5.11rc1", "0.5.11.dev0", "0.5.11+rocm"])
def test_prerelease_versions_say_which_rules_apply(version):  # type: ignore[no-untyped-def]
    """A pre-release, development or local SGLang build composes with its release's rules and says so."""
    plan = compose(Environment(sglang_version=version))
    assert any("the rules of 0.5.11 are used" in d.reason for d in plan.decisions)


# ---------------------------------------------------------------------------------------------------------
# Spellings SGLang's argparse accepts (issue 9): every check applies to what SGLang will read
# ---------------------------------------------------------------------------------------------------------

_AMD = Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, cuda_version=None, gpu_count=8)
_H200 = Environment(vendor=Vendor.NVIDIA, arch="sm90", gpu_count=1, cuda_version="12.8")


@pytest.mark.parametrize("version", ["0.5.4", "0.5.11", "0.5.23"])
@pytest.mark.parametrize(
    ("env", "extra", "error", "match"),
    [
        (
            _AMD,
            ("--enable-det",),
            UnsupportedCombination,
            r"`--enable-det` is SGLang's `--enable-deterministic-inference`.*AMD/ROCm",
        ),
        (
            _AMD,
            ("--enable-deterministic-inf", "--log-level", "info"),
            UnsupportedCombination,
            r"`--enable-deterministic-inf` is SGLang's `--enable-deterministic-inference`",
        ),
        (
            _H200,
            ("--attention-back", "aiter"),
            UnsupportedCombination,
            r"aiter.*`--attention-back` is SGLang's `--attention-backend`",
        ),
        (
            _H200,
            ("--attention-backend=aiter",),
            UnsupportedCombination,
            r"attention backend aiter",
        ),
        (
            _H200,
            ("--tp-s", "8"),
            UnsupportedCombination,
            r"size 8 needs 8 GPUs.*`--tp-s` is SGLang's `--tp-size`",
        ),
        (_H200, ("--tp-size=8",), UnsupportedCombination, r"size 8 needs 8 GPUs"),
        (
            _H200,
            ("--kv-cache", "mxfp8"),
            UnsupportedCombination,
            r"mxfp8 needs an NVIDIA Blackwell.*`--kv-cache` is SGLang's `--kv-cache-dtype`",
        ),
        (_H200, ("--por", "1"), InvalidEnvironment, r"`--por` is SGLang's `--port`.*launcher"),
        (_H200, ("--model-pa", "x"), InvalidEnvironment, r"`--model-pa` is SGLang's `--model-path`"),
        (_H200, ("--hos=0.0.0.0",), InvalidEnvironment, r"`--hos` is SGLang's `--host`"),
        (_H200, ("--conf", "x.yaml"), InvalidEnvironment, r"--config.*further options from that file"),
    ],
    ids=[
        "amd-enable-det",
        "amd-enable-deterministic-inf",
        "attention-back-aiter",
        "attention-backend=aiter",
        "tp-s-8",
        "tp-size=8",
        "kv-cache-mxfp8",
        "por",
        "model-pa",
        "hos=",
        "conf",
    ],
)
def test_sglang_spelling_cannot_bypass_a_rule(env, extra, error, match, version):  # type: ignore[no-untyped-def]
    """Each spelling SGLang's argparse reads as a refused option (prefix, ``=`` form) is refused, and the
    message names what SGLang would have read."""
    if "mxfp8" in extra and version != "0.5.23":
        pytest.skip("mxfp8 exists from 0.5.16")
    with pytest.raises(error, match=match):
        compose(replace(env, sglang_version=version), LaunchRequest(extra_args=extra))


def test_kv_cache_prefix_is_folded_not_duplicated():
    """``--kv-cache fp8_e4m3`` replaces the requested KV dtype (it is SGLang's ``--kv-cache-dtype``): one
    ``--kv-cache-dtype`` in the plan, written in full, and SGLang's reading of the plan agrees."""
    plan = compose(_H200, LaunchRequest(extra_args=("--kv-cache", "fp8_e4m3")))
    assert plan.argv.count("--kv-cache-dtype") == 1 and "--kv-cache" not in plan.argv
    assert read_plan(plan).kv_cache_dtype == "fp8_e4m3"
    assert plan.attention_backend is B.FA3


def test_rl_on_policy_target_implies_deterministic_and_is_refused_on_amd():
    """``--rl-on-policy-target`` turns deterministic inference on in SGLang 0.5.5+
    (``_handle_deterministic_inference``): refused on AMD, prefix included; 0.5.4 has no such option."""
    for extra in (("--rl-on-policy-target", "fsdp"), ("--rl-on", "fsdp")):
        with pytest.raises(UnsupportedCombination, match=r"--rl-on-policy-target.*turns SGLang's"):
            compose(_AMD, LaunchRequest(extra_args=extra))
    with pytest.raises(InvalidEnvironment, match=r"SGLang 0.5.4's parser.*unrecognized arguments: --rl-on"):
        compose(replace(_AMD, sglang_version="0.5.4"), LaunchRequest(extra_args=("--rl-on", "fsdp")))


@pytest.mark.parametrize("version", ["0.5.4", "0.5.11", "0.5.23"])
def test_plan_server_args_reads_the_plan_as_sglang(version):
    """``LaunchPlan.server_args`` is SGLang's reading of the plan: backend, KV dtype, tp, deterministic, the
    model from the launcher's ``--model-path``."""
    env = replace(_H200, gpu_count=2, sglang_version=version)
    plan = compose(env, LaunchRequest(tp_size=2, extra_args=("--api-key=k1", "--load-format", "dummy")))
    read = read_plan(plan)
    assert (read.kv_cache_dtype, read.tp_size, read.deterministic) == ("fp8_e5m2", "2", True)
    assert (read.api_key, read.load_format, read.model_path) == ("k1", "dummy", plan.model)
    assert read.host is None and read.port is None


def test_unknown_option_is_refused_as_sglang_would():
    """An option SGLang's parser does not know exits 2 there; mlaprop refuses it up front, naming it."""
    with pytest.raises(InvalidEnvironment, match=r"unrecognized arguments: --no-such-flag"):
        compose(_H200, LaunchRequest(extra_args=("--no-such-flag",)))


def test_refused_argument_error_masks_secret_values():
    """argparse's complaint echoes the tokens it refuses; a secret option's value never shows in it."""
    with pytest.raises(InvalidEnvironment) as info:
        compose(_H200, LaunchRequest(extra_args=("--hf-token", "sekrit123", "--api-key=othersecret456")))
    assert "unrecognized arguments" in str(info.value)
    assert "sekrit123" not in str(info.value) and "othersecret456" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Rules read from each release's wheel (issue 9)
# ---------------------------------------------------------------------------------------------------------

_MI300X_TP2 = Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, cuda_version=None, gpu_count=2)
_B200 = Environment(vendor=Vendor.NVIDIA, arch="sm100", gpu_count=1, cuda_version="12.8")


@pytest.mark.parametrize(
    ("version", "set_to_0"),
    [
        ("0.5.4", True),
        ("0.5.11", True),
        ("0.5.15", True),
        ("0.5.16", False),
        ("0.5.22", False),
        ("0.5.23", False),
    ],
)
def test_rocm_fused_decode_mla_quirk_per_version(version, set_to_0):  # type: ignore[no-untyped-def]
    """SGLang's ROCm fused MLA decode path applies to every backend up to 0.5.15.post1 and to aiter alone from
    0.5.16 (PR 30355, ``_dispatch_mla_subtype``): triton on ROCm (tp 2) gets SGLANG_ROCM_FUSED_DECODE_MLA=0
    exactly up to 0.5.15, and the decision says which versions."""
    plan = compose(replace(_MI300X_TP2, sglang_version=version), LaunchRequest(tp_size=2))
    assert plan.attention_backend is B.TRITON
    assert (plan.env.get("SGLANG_ROCM_FUSED_DECODE_MLA") == "0") is set_to_0
    reasons = _decided(plan, Action.ADDED, "SGLANG_ROCM_FUSED_DECODE_MLA")
    assert bool(reasons) is set_to_0
    if reasons:
        assert "0.5.4 to 0.5.15.post1" in reasons[0] and "0.5.20" not in reasons[0]


def test_users_own_fused_decode_value_is_named_when_overridden():
    """A user's SGLANG_ROCM_FUSED_DECODE_MLA=1 overridden by the plan is said so; on 0.5.16+ it is left and
    noted."""
    env = replace(_MI300X_TP2, sglang_version="0.5.11", rocm_fused_decode_mla="1")
    plan = compose(env, LaunchRequest(tp_size=2))
    replaced = _decided(plan, Action.REPLACED, "SGLANG_ROCM_FUSED_DECODE_MLA")
    assert plan.env["SGLANG_ROCM_FUSED_DECODE_MLA"] == "0"
    assert replaced and "you set SGLANG_ROCM_FUSED_DECODE_MLA='1'" in replaced[0]
    newer = compose(replace(env, sglang_version="0.5.16"), LaunchRequest(tp_size=2))
    assert "SGLANG_ROCM_FUSED_DECODE_MLA" not in newer.env
    assert _decided(newer, Action.NOTED, "SGLANG_ROCM_FUSED_DECODE_MLA")


def test_detect_keeps_the_users_fused_decode_value():
    """detect_environment carries the user's SGLANG_ROCM_FUSED_DECODE_MLA into the Environment."""
    env = detect_environment(
        {"SGLANG_ROCM_FUSED_DECODE_MLA": "1", "MLAPROP_SGLANG_VERSION": "0.5.11"},
        _probe(Vendor.AMD, "gfx942", hip=True, cuda=None),
    )
    assert env.rocm_fused_decode_mla == "1"


def test_0_5_4_blackwell_deepseek_deterministic_is_flashinfer():
    """0.5.4's deterministic pass runs before the MLA default (filled at start-up in model_runner) and picks
    flashinfer on SM100 for every model; a backend outside fa3/triton only disables the radix cache there, so
    flashinfer is a plan, not a refusal (0.5.5+ refuse it for DeepSeek)."""
    env = replace(_B200, sglang_version="0.5.4")
    plan = compose(env)
    assert plan.deterministic and plan.attention_backend is B.FLASHINFER
    assert plan.option("--attention-backend") is None
    explicit = compose(env, LaunchRequest(attention_backend=B.FLASHINFER))
    assert explicit.attention_backend is B.FLASHINFER
    with pytest.raises(UnsupportedCombination, match="DeepSeek-family"):
        compose(replace(env, sglang_version="0.5.5"), LaunchRequest(attention_backend=B.FLASHINFER))


def test_0_5_4_rocm_deterministic_pass_runs_first():
    """On 0.5.4 the ROCm deterministic fallback (fa3, then triton for fp8_e5m2 at start-up) is what SGLang
    resolves; mlaprop still leaves the flag out on AMD."""
    caps = capabilities_for("0.5.4")
    backend, _ = resolve_backend(
        rocm=True,
        arch="gfx942",
        cuda_version=None,
        capabilities=caps,
        deterministic=True,
        explicit=None,
        kv_cache_dtype=KVCacheDtype.FP8_E5M2,
        tp_size=1,
        kv_heads=16,
        deepseek_family=True,
    )
    assert backend is B.TRITON and caps.deterministic_resolves_first


@pytest.mark.parametrize(
    ("version", "env", "kv", "outcome"),
    [
        ("0.5.11", _B200, "fp8_e4m3", "has no --attention-backend tokenspeed_mla"),
        ("0.5.12", _B200, "fp8_e4m3", B.TOKENSPEED_MLA),
        ("0.5.22", replace(_B200, arch="sm120"), "fp8_e4m3", B.TOKENSPEED_MLA),
        ("0.5.12", _B200, "fp8_e5m2", "accepts only fp8_e4m3"),
        ("0.5.12", _H200, "fp8_e4m3", "no kernels for nvidia sm90"),
        ("0.5.23", _B200, "fp8_e4m3", B.CUTEDSL_MLA),
        ("0.5.23", _B200, "fp8_e5m2", "silently switch the KV cache"),
        ("0.5.23", replace(_B200, arch="sm120"), "fp8_e4m3", "cutedsl_mla on SGLang 0.5.23"),
    ],
)
def test_tokenspeed_mla(version, env, kv, outcome):  # type: ignore[no-untyped-def]
    """tokenspeed_mla exists from 0.5.12, needs Blackwell and fp8_e4m3 KV (server_args.py 0.5.12); 0.5.23
    renames it to cutedsl_mla (serving_hook.py), which needs SM100, and forces fp8_e4m3 KV."""
    req = LaunchRequest(
        attention_backend=B.TOKENSPEED_MLA, kv_cache_dtype=KVCacheDtype(kv), deterministic=False
    )
    env = replace(env, sglang_version=version)
    if isinstance(outcome, AttentionBackend):
        plan = compose(env, req)
        assert plan.attention_backend is outcome and plan.option("--attention-backend") == "tokenspeed_mla"
    else:
        with pytest.raises(UnsupportedCombination, match=outcome):
            compose(env, req)


@pytest.mark.parametrize(
    ("version", "arch", "runs"),
    [
        ("0.5.16", "sm90", True),
        ("0.5.16", "sm100", True),
        ("0.5.16", "sm120", False),
        ("0.5.18", "sm120", True),
    ],
)
def test_fa4_architecture_gate(version, arch, runs):  # type: ignore[no-untyped-def]
    """fa4 (flash_attn.cute, flashattention_backend.py fa_impl_ver 4) runs on sm90/sm100/sm110, and on sm120
    from 0.5.18 (its sm120 kernel)."""
    env = replace(_H200, arch=arch, sglang_version=version)
    req = LaunchRequest(attention_backend=B.FA4, deterministic=False, kv_cache_dtype=KVCacheDtype.AUTO)
    if runs:
        assert compose(env, req).attention_backend is B.FA4
    else:
        with pytest.raises(UnsupportedCombination, match="no kernels"):
            compose(env, req)


def test_0_5_23_rocm_rccl_check_is_named():
    """0.5.23 refuses deterministic inference on ROCm with tp > 2 and --disable-custom-all-reduce
    (overrides.py _deterministic_rocm_rccl_check); mlaprop's refusal quotes that rule."""
    env = replace(_AMD, sglang_version="0.5.23")
    req = LaunchRequest(tp_size=4, extra_args=("--enable-det", "--disable-custom-all"))
    with pytest.raises(UnsupportedCombination, match=r"RCCL, which is not batch-invariant"):
        compose(env, req)


@pytest.mark.parametrize(
    ("version", "accepted"),
    [("0.5.16", False), ("0.5.17", True), ("0.5.23", True)],
)
def test_fa4_deterministic_deepseek_follows_the_literal_list_in_0_5_16(version, accepted):  # type: ignore[no-untyped-def]
    """0.5.16's radix list has fa4, but its DeepSeek check in server_args.py tests the literal
    ``["fa3", "triton"]`` (deepseek_deterministic_attention_backends); 0.5.17+ test the radix list. The
    contract suite found the 0.5.16 difference (8 Blackwell plans SGLang refused)."""
    env = replace(_H200, arch="sm100", sglang_version=version)
    req = LaunchRequest(attention_backend=B.FA4, kv_cache_dtype=KVCacheDtype.AUTO)
    caps = capabilities_for(version)
    if accepted:
        plan = compose(env, req)
        assert plan.deterministic and plan.attention_backend is B.FA4
    else:
        with pytest.raises(UnsupportedCombination, match="SGLang allows only fa3, triton"):
            compose(env, req)
    if version == "0.5.16":
        assert B.FA4 in caps.radix_backends
        assert caps.deepseek_refusal("fa4").startswith("Currently only ['fa3', 'triton'] attention backends")


@pytest.mark.parametrize("version", ["0.5.4", "0.5.11", "0.5.23"])
def test_equal_prefill_and_decode_backends_are_the_attention_backend(version):  # type: ignore[no-untyped-def]
    """SGLang makes equal --prefill-attention-backend and --decode-attention-backend the attention backend,
    over --attention-backend too (_handle_attention_backend_compatibility): on NVIDIA, aiter so spelled is
    refused before launch (it was composed, and the server died with SGLang's ValueError); on ROCm 0.5.11,
    triton so spelled is predicted and gets SGLANG_ROCM_FUSED_DECODE_MLA=0 (it was predicted aiter)."""
    nvidia = replace(_H200, sglang_version=version)
    both = ("--prefill-attention-back", "aiter", "--decode-attention-backend=aiter")
    with pytest.raises(UnsupportedCombination, match=r"aiter.*equal --prefill-attention-backend"):
        compose(nvidia, LaunchRequest(extra_args=("--attention-backend", "triton", *both)))
    amd = replace(_AMD, sglang_version=version)
    plan = compose(
        amd, LaunchRequest(extra_args=("--prefill-attention-backend", "triton", "--decode-att", "triton"))
    )
    assert plan.attention_backend is B.TRITON and not plan.deterministic
    assert plan.option("--attention-backend") == "triton"
    if capabilities_for(version).rocm_fused_decode_mla_any_backend:
        assert plan.env.get("SGLANG_ROCM_FUSED_DECODE_MLA") == "0"
    mixed = compose(amd, LaunchRequest(extra_args=("--prefill-attention-backend", "triton")))
    assert mixed.attention_backend is B.AITER
