"""Contract tests: mlaprop's plans against the installed SGLang's own parser and resolution pipeline.

Run with ``tox -m contract`` (SGLang 0.5.23 and 0.5.11, each in its own environment). Every test is marked
``contract`` and needs the ``sglang`` fixture; without SGLang they skip (``MLAPROP_CONTRACT=1`` makes that an
error). Rule disagreements already reported are listed in :data:`KNOWN_DISAGREEMENTS`: each must still
reproduce (so a fixed rule is noticed and its entry deleted), and nothing outside them may disagree.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from packaging.version import Version

from mlaprop.capabilities import Capabilities, capabilities_for
from mlaprop.compose import DETERMINISTIC_FLAG, FP4_KV_CACHE_DTYPES, compose, resolve_backend
from mlaprop.environment import (
    AttentionBackend,
    CIMarkers,
    Environment,
    KVCacheDtype,
    LaunchRequest,
    Vendor,
)
from tests import strategies as S
from tests.contract.contract import Kind, Verdict, check, naive_argv, on_version
from tests.contract.sglang_sim import SGLang, platform_for

pytestmark = pytest.mark.contract

# ---------------------------------------------------------------------------------------------------------
# Rule disagreements found by this suite and reported to the owner of mlaprop/compose.py and capabilities.py.
# ---------------------------------------------------------------------------------------------------------


def _last(argv: tuple[str, ...], option: str) -> str | None:
    """The value argparse keeps for ``option`` in ``argv`` (the last one; ``--x v`` or ``--x=v``)."""
    value = None
    for i, token in enumerate(argv):
        if token == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(option + "="):
            value = token.split("=", 1)[1]
    return value


def _effective(v: Verdict) -> tuple[str | None, str | None]:
    """(attention backend, KV-cache dtype) in the argv SGLang was given for the verdict."""
    return _last(v.argv, "--attention-backend"), _last(v.argv, "--kv-cache-dtype")


def _cuda_below(v: Verdict, version: str) -> bool:
    e = v.environment
    return e.cuda_version is not None and Version(e.cuda_version) < Version(version)


@dataclass(frozen=True)
class Disagreement:
    """A known difference between mlaprop's rules and SGLang's behaviour, reported for a fix in mlaprop."""

    key: str
    versions: tuple[str, ...]  # SGLang versions where it reproduces
    matches: Callable[[Verdict], bool]
    summary: str

    def applies(self, version: str) -> bool:
        return version in self.versions


#: Empty: every disagreement this suite found (DeepSeek radix list under deterministic inference, per-version
#: --kv-cache-dtype and --attention-backend choices, Blackwell's CUDA >= 12.8, SM110's deterministic
#: fallback, explicit fa3 + fp8_e5m2 off Hopper, cutlass_mla) has been fixed in mlaprop/capabilities.py and
#: mlaprop/compose.py. Add an entry here only while a fix is pending; the suite fails once it no longer shows.
KNOWN_DISAGREEMENTS: tuple[Disagreement, ...] = ()


def known(verdict: Verdict) -> Disagreement | None:
    """The known disagreement that explains a mismatch, if any."""
    for d in KNOWN_DISAGREEMENTS:
        if d.applies(verdict.environment.sglang_version) and d.matches(verdict):
            return d
    return None


def assert_agrees(verdict: Verdict) -> None:
    """The verdict is an agreement, a confirmed refusal, mlaprop's AMD policy, or a known disagreement."""
    if verdict.ok:
        return
    assert known(verdict) is not None, f"mlaprop and SGLang disagree:\n{verdict}"


# ---------------------------------------------------------------------------------------------------------
# The exhaustive sweep
# ---------------------------------------------------------------------------------------------------------


#: The strategies' NVIDIA architectures plus the Blackwell variants they leave out (SM110 Thor, SM121 GB10).
SWEEP_NVIDIA_ARCHS = (*S.NVIDIA_ARCHS, "sm110", "sm121")


def sweep_environments() -> Iterator[Environment]:
    """Every platform the strategies draw (NVIDIA arch x CUDA version, HIP torch on NVIDIA, AMD arch), with
    and without the AMD CI marker on NVIDIA."""
    for arch, cuda in itertools.product(SWEEP_NVIDIA_ARCHS, S.CUDA_VERSIONS):
        for marker in (None, "1"):
            yield Environment(
                vendor=Vendor.NVIDIA, arch=arch, gpu_count=8, cuda_version=cuda, ci=CIMarkers(None, marker)
            )
        yield Environment(vendor=Vendor.NVIDIA, arch=arch, gpu_count=8, torch_hip=True, cuda_version=cuda)
    for arch in S.AMD_ARCHS:
        yield Environment(vendor=Vendor.AMD, arch=arch, gpu_count=8, torch_hip=True, cuda_version=None)


def sweep_requests() -> Iterator[LaunchRequest]:
    """Default requests (every KV dtype, deterministic or not, tp 1-8), every explicit backend with the FP8
    and auto KV dtypes, and each extra-argument fragment of the strategies."""
    for kv, det, tp in itertools.product(KVCacheDtype, (True, False), S.TP_SIZES):
        yield LaunchRequest(kv_cache_dtype=kv, deterministic=det, tp_size=tp)
    for backend, kv, det, tp in itertools.product(
        AttentionBackend, ("auto", "fp8_e5m2", "fp8_e4m3"), (True, False), (1, 2)
    ):
        yield LaunchRequest(
            kv_cache_dtype=KVCacheDtype(kv), deterministic=det, tp_size=tp, attention_backend=backend
        )
    for fragment, det in itertools.product((*S.EXTRA_FRAGMENTS, (DETERMINISTIC_FLAG,)), (True, False)):
        yield LaunchRequest(deterministic=det, extra_args=fragment)


#: Every Nth sweep case (``tests/contract/run_versions.py`` sets it off the anchor versions 0.5.11 and 0.5.23);
#: the sample is stratified: case (i, j) of environment i and request j is kept when (i + j) % N == 0, so every
#: environment and every request is still checked.
SAMPLE = max(1, int(os.environ.get("MLAPROP_CONTRACT_SAMPLE", "1") or 1))


@pytest.fixture(scope="module")
def sweep(sglang: SGLang) -> list[Verdict]:
    """Every sweep environment x every sweep request (or the stratified :data:`SAMPLE`), checked against
    SGLang (each distinct argv and platform resolved once)."""
    requests = list(sweep_requests())
    return [
        check(sglang, e, r)
        for i, e in enumerate(sweep_environments())
        for j, r in enumerate(requests)
        if (i + j) % SAMPLE == 0
    ]


class TestSweep:
    """Tests for the exhaustive sweep of environments and requests."""

    def test_every_plan_and_refusal_agrees_with_sglang(self, sweep: list[Verdict]) -> None:
        """Outside the known disagreements, every plan parses, resolves without error to the predicted
        backend, and every refusal is one SGLang shares (or mlaprop's AMD policy)."""
        unexplained = [v for v in sweep if not v.ok and known(v) is None]
        kinds = Counter(v.kind for v in sweep)
        assert kinds[Kind.PLAN_AGREES] > 1000 // SAMPLE and kinds[Kind.REFUSAL_CONFIRMED] > 1000 // SAMPLE, (
            kinds
        )
        print(f"SGLang {sweep[0].environment.sglang_version}: {len(sweep)} sweep cases {dict(kinds)}")
        assert not unexplained, f"{len(unexplained)} unexplained disagreements, first ones:\n" + "\n".join(
            str(v) for v in unexplained[:15]
        )

    def test_each_known_disagreement_still_reproduces(self, sweep: list[Verdict], sglang: SGLang) -> None:
        """Each known disagreement for this SGLang version still shows; one that no longer does has been
        fixed in mlaprop (or SGLang) and its entry in KNOWN_DISAGREEMENTS must go."""
        hits = Counter(d.key for v in sweep if not v.ok for d in [known(v)] if d is not None)
        stale = [d.key for d in KNOWN_DISAGREEMENTS if d.applies(sglang.version) and hits[d.key] == 0]
        assert not stale, f"fixed? delete these from KNOWN_DISAGREEMENTS in {__file__}: {stale}"

    def test_policy_refusals_are_only_mlaprops_two_rules(self, sweep: list[Verdict]) -> None:
        """mlaprop refuses beyond SGLang's argument pipeline only for a forced deterministic flag where an AMD
        signal is present, for FP4 KV caches (``FP4_KV_CACHE_DTYPES``), and for a tp the GPUs or the model's
        heads cannot hold (SGLang fails on those at start-up)."""
        policy = [v for v in sweep if v.kind is Kind.POLICY_REFUSAL]
        assert policy, "the sweep forces the deterministic flag on AMD: expected policy refusals"
        amd = [v for v in policy if DETERMINISTIC_FLAG in v.request.extra_args]
        allowed = {
            b.value for b in capabilities_for(policy[0].environment.sglang_version).deterministic_backends
        }
        assert amd and {v.sglang_backend for v in amd} <= allowed
        rest = [v for v in policy if v not in amd]
        assert all(
            v.request.kv_cache_dtype in FP4_KV_CACHE_DTYPES
            or v.detail.startswith("tp ")
            or v.detail.startswith("mlaprop refuses tokenspeed_mla")
            for v in rest
        )


# ---------------------------------------------------------------------------------------------------------
# Hypothesis-drawn environments and requests
# ---------------------------------------------------------------------------------------------------------

_drawn = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestDrawn:
    """Tests for environments and requests drawn by the shared strategies."""

    @_drawn
    @given(env=S.environments(), req=S.requests())
    @example(
        env=Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, cuda_version=None),
        req=LaunchRequest(),
    )
    @example(env=Environment(arch="sm90", cuda_version="12.4"), req=LaunchRequest())
    def test_drawn_request_agrees_with_sglang(
        self, sglang: SGLang, env: Environment, req: LaunchRequest
    ) -> None:
        """A drawn (environment, request) is a plan SGLang parses and resolves as predicted, or a refusal
        SGLang shares (or a known, reported disagreement)."""
        assert_agrees(check(sglang, env, req))

    @_drawn
    @given(env=S.nvidia_without_amd_signal(), req=S.default_requests())
    def test_nvidia_default_request_keeps_the_flag_and_resolves(
        self, sglang: SGLang, env: Environment, req: LaunchRequest
    ) -> None:
        """On NVIDIA without an AMD signal the upstream test's request keeps the deterministic flag, and
        SGLang resolves it with deterministic inference on."""
        verdict = check(sglang, env, req)
        assert_agrees(verdict)
        if verdict.kind is Kind.PLAN_AGREES:
            assert DETERMINISTIC_FLAG in verdict.argv
            assert verdict.sglang_backend == verdict.predicted


# ---------------------------------------------------------------------------------------------------------
# Named platforms, with values
# ---------------------------------------------------------------------------------------------------------

H200 = Environment(vendor=Vendor.NVIDIA, arch="sm90", gpu_count=8, cuda_version="12.8")
A100 = Environment(vendor=Vendor.NVIDIA, arch="sm80", gpu_count=8, cuda_version="12.8")
B200 = Environment(vendor=Vendor.NVIDIA, arch="sm100", gpu_count=8, cuda_version="12.8")
RTX5090 = Environment(vendor=Vendor.NVIDIA, arch="sm120", gpu_count=8, cuda_version="12.8")
MI300X = Environment(vendor=Vendor.AMD, arch="gfx942", gpu_count=8, torch_hip=True, cuda_version=None)
MI355X = Environment(vendor=Vendor.AMD, arch="gfx950", gpu_count=8, torch_hip=True, cuda_version=None)
UPSTREAM = LaunchRequest()  # --trust-remote-code --kv-cache-dtype fp8_e5m2, deterministic wanted


@pytest.mark.parametrize(
    ("name", "env", "req", "flag", "backend_flag", "resolved"),
    [
        ("H200 upstream test", H200, UPSTREAM, True, None, "triton"),  # fa3 + fp8_e5m2 -> triton
        ("H200 fp8_e4m3", H200, replace(UPSTREAM, kv_cache_dtype=KVCacheDtype.FP8_E4M3), True, None, "fa3"),
        ("H200 no determinism", H200, replace(UPSTREAM, deterministic=False), False, None, "triton"),
        ("A100 upstream test", A100, UPSTREAM, True, None, "triton"),
        ("RTX 5090 upstream test", RTX5090, UPSTREAM, True, None, "triton"),
        ("MI300X upstream test", MI300X, UPSTREAM, False, None, "aiter"),  # 16 KV heads per rank
        ("MI300X tp 2", MI300X, replace(UPSTREAM, tp_size=2), False, None, "triton"),  # 8 per rank
        ("MI355X upstream test", MI355X, UPSTREAM, False, None, "aiter"),
        (
            "MI300X triton asked",
            MI300X,
            replace(UPSTREAM, attention_backend=AttentionBackend.TRITON),
            False,
            "triton",
            "triton",
        ),
    ],
)
def test_named_platform_resolves_as_predicted(
    sglang: SGLang,
    name: str,
    env: Environment,
    req: LaunchRequest,
    flag: bool,
    backend_flag: str | None,
    resolved: str,
) -> None:
    """The plan for a named platform carries the deterministic flag where expected, and SGLang resolves the
    backend mlaprop predicts (the same on 0.5.11 and 0.5.23)."""
    verdict = check(sglang, env, req)
    assert verdict.kind is Kind.PLAN_AGREES, str(verdict)
    assert (DETERMINISTIC_FLAG in verdict.argv) is flag
    assert _last(verdict.argv, "--attention-backend") == backend_flag
    if name.startswith("RTX 5090") and not capabilities_for(sglang.version).deterministic_deepseek_triton:
        resolved = "flashinfer"  # 0.5.4: the deterministic fallback on SM120 is flashinfer for every model
    assert verdict.predicted == verdict.sglang_backend == resolved


def test_b200_upstream_test(sglang: SGLang) -> None:
    """B200 (sm100, CUDA 12.8) with the upstream request resolves to triton on every version: 0.5.12+ picks
    triton for deterministic DeepSeek by itself; 0.5.11 would fill in flashinfer first and then reject it for
    DeepSeek, so mlaprop sets --attention-backend triton there, and SGLang's own pipeline agrees."""
    verdict = check(sglang, B200, UPSTREAM)
    assert verdict.kind is Kind.PLAN_AGREES, str(verdict)
    v = Version(sglang.version)
    v054 = v < Version(
        "0.5.5"
    )  # deterministic fallback flashinfer for every model, radix cache just disabled
    assert verdict.sglang_backend == ("flashinfer" if v054 else "triton")
    explicit = "--attention-backend" in verdict.argv
    assert explicit is (Version("0.5.5") <= v < Version("0.5.12")), verdict.argv
    bare = sglang.resolve(naive_argv(UPSTREAM), platform_for(on_version(B200, sglang.version)))
    if Version("0.5.5") <= v < Version("0.5.12"):
        assert not bare.ok and bare.error is not None and "flashinfer" in bare.error


# ---------------------------------------------------------------------------------------------------------
# The original CI failure, reproduced with SGLang's own code
# ---------------------------------------------------------------------------------------------------------


class TestOriginalFailure:
    """Tests for the MLA FP8 test's CI failure on ROCm (deterministic flag always added, no backend)."""

    def test_old_composition_on_rocm(self, sglang: SGLang) -> None:
        """Up to 0.5.11 the old composition on ROCm raises SGLang's deterministic ValueError naming aiter;
        from 0.5.12 SGLang's deterministic pass picks a backend first and it resolves (fa3 -> triton)."""
        env = on_version(MI300X, sglang.version)
        outcome = sglang.resolve(naive_argv(UPSTREAM), platform_for(env))
        if capabilities_for(sglang.version).deterministic_resolves_first:
            assert outcome.ok and outcome.backend == "triton", outcome
        else:
            assert outcome.error is not None
            assert outcome.error.startswith("ValueError: Currently only ")
            assert "attention backends are supported for deterministic inference" in outcome.error
            assert "you explicitly specified 'aiter'" in outcome.error

    @pytest.mark.parametrize(
        "env", [MI300X, MI355X, replace(H200, torch_hip=True)], ids=["gfx942", "gfx950", "hip"]
    )
    def test_mlaprop_plan_on_rocm_resolves(self, sglang: SGLang, env: Environment) -> None:
        """mlaprop's plan for the same request leaves the flag out and SGLang resolves it to aiter."""
        plan = compose(on_version(env, sglang.version), UPSTREAM)
        assert DETERMINISTIC_FLAG not in plan.argv
        outcome = sglang.resolve(plan.argv, platform_for(env), plan.env)
        assert outcome.ok, outcome
        assert outcome.backend == plan.attention_backend == "aiter"
        assert outcome.values["enable_deterministic_inference"] is False

    def test_old_composition_on_hopper_resolves(self, sglang: SGLang) -> None:
        """The old composition always worked on Hopper: fa3 + fp8_e5m2 -> triton, deterministic on."""
        outcome = sglang.resolve(naive_argv(UPSTREAM), platform_for(on_version(H200, sglang.version)))
        assert outcome.ok and outcome.backend == "triton"
        assert outcome.values["enable_deterministic_inference"] is True
        assert outcome.values["sampling_backend"] == "pytorch"


# ---------------------------------------------------------------------------------------------------------
# Drift canaries: SGLang's live rules against mlaprop/capabilities.py
# ---------------------------------------------------------------------------------------------------------


def allowlist_drift(version: str, live: frozenset[str], caps: Capabilities) -> str | None:
    """Why mlaprop's deterministic allow-list for ``version`` differs from SGLang's, or ``None``."""
    ours = {b.value for b in caps.deterministic_backends}
    if ours == set(live):
        return None
    added, removed = sorted(set(live) - ours), sorted(ours - set(live))
    message = (
        f"SGLang {version}'s DETERMINISTIC_ATTENTION_BACKEND_CHOICES is {sorted(live)}; mlaprop has "
        f"{sorted(ours)} (SGLang added {added}, removed {removed}). Update the `det` set in "
        "mlaprop/capabilities.py _rules() for this version."
    )
    if "aiter" in added:
        message += (
            " aiter is now allowed: the AMD rule in mlaprop/compose.py (step 2, drop "
            "--enable-deterministic-inference where any AMD signal is present) can be retired for this version, "
            "once the ROCm runtime failures (sglang issue 23536) are checked on hardware."
        )
    return message


def radix_drift(version: str, live: frozenset[str], caps: Capabilities) -> str | None:
    """Why mlaprop's radix list for ``version`` differs from SGLang's, or ``None``."""
    ours = {b.value for b in caps.radix_backends}
    if ours == set(live):
        return None
    return (
        f"SGLang {version}'s RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND is {sorted(live)}; mlaprop has "
        f"{sorted(ours)}. Update the `radix` set in mlaprop/capabilities.py _rules() for this version"
        + (
            "; flashinfer joined, so deterministic DeepSeek models may use it (KNOWN_DISAGREEMENTS "
            "deepseek-radix changes)"
            if "flashinfer" in set(live) - ours
            else ""
        )
    )


class TestDriftCanaries:
    """Tests that SGLang's live rules still match mlaprop's for the installed version."""

    def test_deterministic_allowlist(self, sglang: SGLang) -> None:
        """SGLang's deterministic allow-list equals ``capabilities_for(version).deterministic_backends``."""
        drift = allowlist_drift(
            sglang.version, sglang.deterministic_allowlist(), capabilities_for(sglang.version)
        )
        assert drift is None, drift
        assert "aiter" not in sglang.deterministic_allowlist()

    def test_radix_list(self, sglang: SGLang) -> None:
        """SGLang's radix list equals ``capabilities_for(version).radix_backends``."""
        drift = radix_drift(sglang.version, sglang.radix_list(), capabilities_for(sglang.version))
        assert drift is None, drift

    @pytest.mark.parametrize("tp", [1, 2, 4, 8])
    def test_rocm_default_backend(self, sglang: SGLang, tp: int) -> None:
        """With no backend and no determinism, SGLang's ROCm default for the test model (aiter for 16 or
        128 KV heads per rank, else triton) is what mlaprop's resolve_backend predicts."""
        caps = capabilities_for(sglang.version)
        ours, _ = resolve_backend(
            rocm=True,
            arch="gfx942",
            cuda_version=None,
            capabilities=caps,
            deterministic=False,
            explicit=None,
            kv_cache_dtype=KVCacheDtype.AUTO,
            tp_size=tp,
            kv_heads=16,
            deepseek_family=True,
        )
        argv = ["--trust-remote-code", "--kv-cache-dtype", "auto"] + (
            ["--tp-size", str(tp)] if tp > 1 else []
        )
        outcome = sglang.resolve(argv, platform_for(on_version(MI300X, sglang.version)))
        assert outcome.ok, outcome
        assert outcome.backend == ours.value, (
            f"SGLang {sglang.version} resolves {outcome.backend} on ROCm at tp {tp}; mlaprop predicts {ours}: "
            "update the ROCm branch of mlaprop/compose.py resolve_backend (and capabilities.py if it is "
            "version-dependent)"
        )
        assert outcome.backend == ("aiter" if tp == 1 else "triton")

    def test_rocm_deterministic_ordering(self, sglang: SGLang) -> None:
        """Whether SGLang's deterministic pass runs before the platform default (it then resolves ROCm +
        deterministic without a backend) matches ``Capabilities.deterministic_resolves_first``."""
        caps = capabilities_for(sglang.version)
        outcome = sglang.resolve(
            ["--trust-remote-code", "--kv-cache-dtype", "auto", DETERMINISTIC_FLAG],
            platform_for(on_version(MI300X, sglang.version)),
        )
        assert outcome.ok is caps.deterministic_resolves_first, (
            f"SGLang {sglang.version}: ROCm + deterministic without a backend -> {outcome}; mlaprop's "
            f"deterministic_resolves_first is {caps.deterministic_resolves_first}: update it in "
            "mlaprop/capabilities.py _rules()"
        )
        if outcome.ok:
            assert outcome.backend == "fa3"  # passes argument checks; has no kernels on ROCm

    def test_rocm_fused_decode_rule(self, sglang: SGLang) -> None:
        """SGLANG_ROCM_FUSED_DECODE_MLA applies to every backend exactly when mlaprop's
        ``rocm_fused_decode_mla_any_backend`` says so (the plan then sets it to 0 for triton on ROCm)."""
        gated = sglang.rocm_fused_decode_gated_to_aiter()
        caps = capabilities_for(sglang.version)
        assert gated is not caps.rocm_fused_decode_mla_any_backend, (
            f"SGLang {sglang.version} {'gates' if gated else 'does not gate'} the ROCm fused MLA decode path on "
            f"aiter; update rocm_fused_decode_mla_any_backend in mlaprop/capabilities.py _rules()"
            + (
                "; the SGLANG_ROCM_FUSED_DECODE_MLA=0 workaround in compose.py step 6 can be retired"
                if gated
                else ""
            )
        )


# ---------------------------------------------------------------------------------------------------------
# A deliberately wrong rule is caught
# ---------------------------------------------------------------------------------------------------------


def _with(caps: Capabilities, **changes: object) -> Capabilities:
    return replace(caps, **changes)  # type: ignore[arg-type]


class TestWrongRulesAreCaught:
    """Tests that the contract suite fails when mlaprop's rules are wrong (rules passed in, never edited)."""

    def test_aiter_in_the_allowlist(self, sglang: SGLang) -> None:
        """Adding aiter to the deterministic allow-list is reported as drift, naming the rule to update and
        the AMD workaround that would become retirable."""
        caps = capabilities_for(sglang.version)
        wrong = _with(caps, deterministic_backends=caps.deterministic_backends | {AttentionBackend.AITER})
        drift = allowlist_drift(sglang.version, sglang.deterministic_allowlist(), wrong)
        assert drift is not None
        assert "removed ['aiter']" in drift and "mlaprop/capabilities.py _rules()" in drift
        # ... and when SGLang itself adds aiter, the message says which workaround can go.
        future = allowlist_drift(sglang.version, sglang.deterministic_allowlist() | {"aiter"}, caps)
        assert future is not None and "added ['aiter']" in future and "can be retired" in future

    def test_triton_missing_from_the_allowlist(self, sglang: SGLang) -> None:
        """Dropping triton from the allow-list makes compose refuse the upstream request with triton asked
        for on H200, which SGLang accepts: a mismatch."""
        caps = capabilities_for(sglang.version)
        wrong = _with(caps, deterministic_backends=caps.deterministic_backends - {AttentionBackend.TRITON})
        verdict = check(sglang, H200, replace(UPSTREAM, attention_backend=AttentionBackend.TRITON), wrong)
        assert verdict.kind is Kind.MISMATCH, str(verdict)
        assert verdict.sglang_backend == "triton"

    def test_wrong_ordering(self, sglang: SGLang) -> None:
        """Flipping deterministic_resolves_first makes the prediction differ from SGLang on an H200 with CUDA
        12.1 and auto KV (SGLang's default there is triton, its deterministic fallback fa3)."""
        caps = capabilities_for(sglang.version)
        wrong = _with(caps, deterministic_resolves_first=not caps.deterministic_resolves_first)
        env = replace(H200, cuda_version="12.1")
        request = replace(UPSTREAM, kv_cache_dtype=KVCacheDtype.AUTO)
        assert check(sglang, env, request).kind is Kind.PLAN_AGREES
        verdict = check(sglang, env, request, wrong)
        assert verdict.kind is Kind.MISMATCH, str(verdict)


# ---------------------------------------------------------------------------------------------------------
# The harness itself
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        naive_argv(UPSTREAM),
        (
            "--trust-remote-code",
            "--kv-cache-dtype",
            "fp8_e4m3",
            "--tp-size",
            "2",
            "--attention-backend",
            "flashinfer",
        ),
        ("--kv-cache-dtype", "auto", "--tp-size", "8"),
    ],
)
def test_prebuilt_parser_resolves_like_a_fresh_one(sglang: SGLang, argv: tuple[str, ...]) -> None:
    """Handing prepare_server_args the prebuilt parser changes nothing: same backend or same error."""
    platform = platform_for(on_version(H200, sglang.version))
    fast = sglang._resolve(list(argv), platform, {})
    sglang.reuse_parser = False
    try:
        slow = sglang._resolve(list(argv), platform, {})
    finally:
        sglang.reuse_parser = True
    assert fast == slow


def test_platform_simulation_is_seen_by_sglang(sglang: SGLang) -> None:
    """The simulated platform reaches SGLang: the same argv resolves differently on Hopper, ROCm and Blackwell
    (CPU-machine probes would give the same answer for all three)."""
    argv = ["--trust-remote-code", "--kv-cache-dtype", "auto"]
    got = {
        name: sglang.resolve(argv, platform_for(on_version(env, sglang.version))).backend
        for name, env in (("hopper", H200), ("rocm", MI300X), ("blackwell", B200), ("ampere", A100))
    }
    assert got == {"hopper": "fa3", "rocm": "aiter", "blackwell": "flashinfer", "ampere": "triton"}


def test_resolution_leaves_the_process_environment_alone(sglang: SGLang) -> None:
    """SGLang writes NCCL_ALGO and friends while resolving tp > 1 with determinism; they are restored."""
    import os

    before = dict(os.environ)
    outcome = sglang._resolve(
        ["--kv-cache-dtype", "auto", "--tp-size", "2", DETERMINISTIC_FLAG],
        platform_for(on_version(H200, sglang.version)),
        {"SGLANG_ROCM_FUSED_DECODE_MLA": "0"},
    )
    assert outcome.ok, outcome
    assert dict(os.environ) == before
