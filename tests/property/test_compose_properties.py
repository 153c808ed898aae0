"""Property tests of :func:`mlaprop.compose.compose`: each test's name and docstring state one property."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import replace

import pytest
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from mlaprop.args import option_table, read_plan, read_server_args
from mlaprop.capabilities import KNOWN_VERSIONS, backend_runs_on, capabilities_for, is_blackwell, is_sm100
from mlaprop.compose import (
    DETERMINISTIC_FLAG,
    FP4_KV_CACHE_DTYPES,
    UnsupportedCombination,
    amd_signals,
    compose,
)
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
from tests import strategies as S


def _compose_or_refuse(env: Environment, req: LaunchRequest):  # type: ignore[no-untyped-def]
    """The plan, or reject the example (``assume``) when compose refuses it; each outcome is an ``event`` so
    Hypothesis' statistics (``--hypothesis-show-statistics``) show the share of examples actually checked."""
    try:
        plan = compose(env, req)
    except UnsupportedCombination as exc:
        event("refused: " + re.sub(r"\b(sm|gfx)?[0-9][0-9a-z.]*", "N", str(exc).split(":")[0])[:48])
        assume(False)
        raise AssertionError("unreachable") from exc
    event("plan checked")
    return plan


class TestDeterministicFlag:
    """Tests for where ``--enable-deterministic-inference`` may appear."""

    @given(env=S.environments(), req=S.requests())
    @example(
        env=Environment(vendor=Vendor.AMD, arch="gfx942", torch_hip=True, sglang_version="0.5.11"),
        req=LaunchRequest(),
    )
    @example(env=Environment(ci=CIMarkers(None, "1")), req=LaunchRequest())
    @example(env=Environment(ci=CIMarkers(None, "yes")), req=LaunchRequest())
    def test_flag_never_reaches_an_environment_with_any_amd_signal(self, env, req):
        """With ROCm hardware, ``torch.version.hip`` or a truthy ``SGLANG_IS_IN_CI_AMD``, no plan carries the
        deterministic flag, for every known SGLang version and every request."""
        if not amd_signals(env):
            env = replace(env, ci=CIMarkers(None, "1"))
        plan = _compose_or_refuse(env, req)
        assert DETERMINISTIC_FLAG not in plan.argv
        assert plan.deterministic is False
        assert "SGLANG_ENABLE_DETERMINISTIC_INFERENCE" not in plan.env

    @given(env=S.environments(Vendor.AMD), version=S.versions)
    def test_flag_is_dropped_on_amd_with_a_reason_for_every_version(self, env, version):
        """On AMD the upstream request (deterministic wanted) composes for every known version, and the drop
        is recorded as a DROPPED decision citing the allow-list."""
        plan = compose(replace(env, sglang_version=version), LaunchRequest())
        dropped = [
            d for d in plan.decisions if d.action is Action.DROPPED and d.subject == DETERMINISTIC_FLAG
        ]
        assert len(dropped) == 1
        assert "allow-list" in dropped[0].reason and dropped[0].source

    @given(env=S.nvidia_without_amd_signal(), req=S.default_requests())
    def test_flag_always_reaches_nvidia_without_amd_signal(self, env, req):
        """On NVIDIA with no AMD signal, a request that wants deterministic inference, forces no backend and
        asks for a KV dtype every GPU accepts (on enough GPUs for its tp) always gets the flag."""
        plan = compose(replace(env, gpu_count=max(env.gpu_count, req.tp_size)), req)
        assert DETERMINISTIC_FLAG in plan.argv
        assert plan.deterministic

    @given(
        env=S.nvidia_without_amd_signal(),
        backend=st.sampled_from(list(AttentionBackend)),
    )
    @example(env=Environment(sglang_version="0.5.11"), backend=AttentionBackend.AITER)
    @example(env=Environment(sglang_version="0.5.15"), backend=AttentionBackend.FA4)
    def test_forced_backend_outside_allowlist_is_refused_naming_backend_and_allowlist(self, env, backend):
        """On NVIDIA with deterministic wanted, forcing a backend outside the version's allow-list (``aiter``
        is in none) raises ``UnsupportedCombination`` naming the backend and every allowed backend."""
        caps = capabilities_for(env.sglang_version)
        req = LaunchRequest(attention_backend=backend)
        if backend in caps.deterministic_backends or backend not in caps.attention_backends:
            return  # allowed, or not even a choice of this version (refused for that, tested elsewhere)
        with pytest.raises(UnsupportedCombination) as err:
            compose(env, req)
        msg = str(err.value)
        assert f"attention backend {backend.value}" in msg
        for allowed in caps.deterministic_backends:
            assert allowed.value in msg

    @given(env=S.environments(Vendor.AMD), extra=S.extra_args())
    def test_user_deterministic_flag_on_amd_is_refused(self, env, extra):
        """A user's ``--enable-deterministic-inference`` in the extra arguments on AMD is refused with an error
        that names the flag and says to remove it."""
        req = LaunchRequest(extra_args=(*extra, DETERMINISTIC_FLAG))
        with pytest.raises(UnsupportedCombination, match=r"enable-deterministic-inference.*Remove the flag"):
            compose(env, req)


class TestArgv:
    """Tests for the shape of ``LaunchPlan.argv``."""

    @given(env=S.environments(), req=S.requests())
    def test_no_option_appears_twice_and_every_value_option_has_a_value(self, env, req):
        """Every option appears at most once; every value-taking option is followed by a value; every
        switch stands alone."""
        plan = _compose_or_refuse(env, req)
        options = read_server_args(plan.argv, plan.sglang_version).options
        names = [o.name for o in options]
        assert len(names) == len(set(names)), plan.argv
        # each option written in full, once: the plan's tokens are exactly its options' tokens
        assert tuple(t for o in options for t in o.tokens()) == plan.argv
        table = option_table(plan.sglang_version)
        for o in options:
            spec = table.by_string[o.name]
            if spec.switch:
                assert o.values == (), o
            else:
                assert o.value not in (None, ""), o

    @given(
        env=S.nvidia_without_amd_signal(),
        first=st.sampled_from(["triton", "flashinfer", "fa3"]),
        user=st.sampled_from(["triton", "flashinfer"]),
    )
    def test_user_attention_backend_replaces_never_duplicates(self, env, first, user):
        """A user ``--attention-backend`` in the extra arguments replaces the requested one: the plan has
        exactly one ``--attention-backend`` and it is the user's."""
        req = LaunchRequest(
            attention_backend=AttentionBackend(first), extra_args=("--attention-backend", user)
        )
        plan = _compose_or_refuse(env, req)
        assert plan.argv.count("--attention-backend") == 1
        assert plan.option("--attention-backend") == user

    @given(env=S.environments(), req=S.requests())
    def test_user_extra_arguments_survive_in_the_plan(self, env, req):
        """Every extra option the user gave ends up in the plan with the user's last value (except the
        deterministic flag, which follows the AMD rule)."""
        plan = _compose_or_refuse(env, req)
        last = {o.name: o.value for o in read_server_args(req.extra_args, env.sglang_version).options}
        for name, value in last.items():
            if name == DETERMINISTIC_FLAG:
                continue
            assert plan.has_flag(name), (name, plan.argv)
            if value is not None and name != "--attention-backend":
                assert plan.option(name) == value


class TestPurity:
    """Tests that ``compose`` is a pure function."""

    @given(env=S.environments(), req=S.requests())
    def test_same_input_gives_same_output_and_inputs_are_not_mutated(self, env, req):
        """Composing twice gives equal plans (or the same refusal), and the inputs are unchanged."""
        env_copy, req_copy = copy.deepcopy(env), copy.deepcopy(req)
        results = []
        for _ in range(2):
            try:
                results.append(compose(env, req))
            except (UnsupportedCombination, InvalidEnvironment) as exc:
                results.append(repr(exc))
        assert results[0] == results[1]
        assert env == env_copy and req == req_copy

    def test_default_arguments_are_not_shared_mutable_state(self):
        """Two default requests do not share a mutable ``extra_args``; a plan's env cannot be written to."""
        a, b = LaunchRequest(), LaunchRequest()
        assert isinstance(a.extra_args, tuple) and a.extra_args == b.extra_args == ()
        plan = compose(Environment(), a)
        with pytest.raises(TypeError):
            plan.env["X"] = "1"  # type: ignore[index]


class TestDecisions:
    """Tests that every choice in a plan is explained."""

    @given(env=S.environments(), req=S.requests())
    def test_every_added_or_dropped_flag_has_a_decision_with_reason_and_source(self, env, req):
        """Each option in argv and each environment variable has an ADDED decision; the deterministic flag,
        when wanted and absent, has a DROPPED one; every decision has a reason and an upstream source."""
        plan = _compose_or_refuse(env, req)
        added = {d.subject for d in plan.decisions if d.action is Action.ADDED}
        for o in read_server_args(plan.argv, plan.sglang_version).options:
            assert o.name in added, (o.name, plan.decisions)
        for var in plan.env:
            assert var in added
        wanted = req.deterministic or DETERMINISTIC_FLAG in req.extra_args
        if wanted and not plan.deterministic:
            assert any(d.action is Action.DROPPED and d.subject == DETERMINISTIC_FLAG for d in plan.decisions)
        for d in plan.decisions:
            assert d.reason.strip() and d.source.strip(), d


class TestPrediction:
    """Tests for the predicted attention backend."""

    @given(env=S.environments(), req=S.requests())
    def test_predicted_backend_is_allowed_and_runnable(self, env, req):
        """The predicted backend is in the version's deterministic allow-list whenever the flag is present,
        and always has kernels for the GPU (no plan the server would reject or could not run)."""
        plan = _compose_or_refuse(env, req)
        caps = capabilities_for(env.sglang_version)
        if plan.deterministic:
            assert plan.attention_backend in caps.deterministic_backends
        hw = Vendor.AMD if (env.vendor is Vendor.AMD or env.torch_hip) else Vendor.NVIDIA
        assert backend_runs_on(plan.attention_backend, hw, env.arch, plan.sglang_version)


class TestNoGpu:
    """Tests for environments without a GPU."""

    @given(req=S.requests(), version=S.versions)
    def test_no_gpu_is_refused_with_how_to_preview(self, req, version):
        """Vendor ``none`` raises ``UnsupportedCombination`` saying SGLang needs a GPU and how to preview."""
        env = Environment(vendor=Vendor.NONE, arch="", gpu_count=0, sglang_version=version)
        with pytest.raises(
            UnsupportedCombination, match=r"needs a GPU.*mlaprop compose --vendor amd --arch gfx942"
        ):
            compose(env, req)

    @given(env=S.environments())
    def test_all_devices_masked_is_refused(self, env):
        """A GPU machine whose masks hide every device is refused, naming the mask variables."""
        with pytest.raises(UnsupportedCombination, match="VISIBLE_DEVICES"):
            compose(replace(env, gpu_count=0))


class TestHostileInputs:
    """Tests that bad input fails loudly with the valid values, never as a partial plan."""

    @given(value=st.text(min_size=1, max_size=12))
    def test_unknown_backend_or_dtype_lists_valid_values(self, value):
        """An unknown attention backend or KV dtype raises ``InvalidEnvironment`` listing valid values."""
        assume(value.strip().lower() not in {b.value for b in AttentionBackend})
        with pytest.raises(InvalidEnvironment, match=r"expected one of .*triton"):
            LaunchRequest(attention_backend=value)  # type: ignore[arg-type]
        assume(value.strip().lower() not in {d.value for d in KVCacheDtype})
        with pytest.raises(InvalidEnvironment, match=r"expected one of .*fp8_e5m2"):
            LaunchRequest(kv_cache_dtype=value)  # type: ignore[arg-type]

    @given(tp=st.integers(max_value=0))
    def test_non_positive_tp_is_refused(self, tp):
        """tp < 1 raises ``InvalidEnvironment`` saying it must be >= 1."""
        with pytest.raises(InvalidEnvironment, match=">= 1"):
            LaunchRequest(tp_size=tp)

    @given(arch=st.text(max_size=8), vendor=st.sampled_from([Vendor.NVIDIA, Vendor.AMD]))
    def test_odd_architectures_are_refused_with_examples(self, arch, vendor):
        """An architecture that is not ``smNN`` / ``gfxNNN`` of the right vendor raises ``InvalidEnvironment``
        (a ``ValueError``) with examples of valid ones, or composes a complete plan."""
        try:
            plan = compose(Environment(vendor=vendor, arch=arch))
        except InvalidEnvironment as exc:
            event("invalid architecture")
            assert "sm90" in str(exc) or "gfx942" in str(exc) or "MLAPROP_ARCH" in str(exc)
            return
        except UnsupportedCombination:
            event("refused")
            return
        event("plan")
        assert plan.option("--kv-cache-dtype") == "fp8_e5m2"

    @given(tokens=st.lists(st.text(max_size=10), max_size=5))
    def test_odd_extra_arguments_give_a_clear_error_or_a_full_plan(self, tokens):
        """Arbitrary extra argument tokens either raise a ``ValueError`` that quotes the bad token or yield a
        plan containing every token."""
        try:
            plan = compose(Environment(), LaunchRequest(extra_args=tuple(tokens)))
        except ValueError as exc:
            event("refused")
            assert str(exc)
            return
        event("plan")
        folded = ("--attention-backend", "--kv-cache-dtype", "--tp-size", DETERMINISTIC_FLAG)
        for o in read_server_args(tokens, plan.sglang_version).options:
            if o.name not in folded:
                assert plan.has_flag(o.name), (o, plan.argv)


# The exhaustive sweep of the finite part: vendor x arch x CI marker x backend x KV dtype x tp x version.
SWEEP_PLATFORMS = (
    (Vendor.NVIDIA, "sm80", False),
    (Vendor.NVIDIA, "sm90", False),
    (Vendor.NVIDIA, "sm100", False),
    (Vendor.NVIDIA, "sm120", False),
    (Vendor.AMD, "gfx942", True),
    (Vendor.AMD, "gfx90a", True),
)
SWEEP_MARKERS = (None, "yes")  # unset, and the value SGLang's two parsers disagree on (true to EnvBool)
SWEEP_BACKENDS = (None, *AttentionBackend)
SWEEP_TP = (1, 2)


def _refusal_is_justified(env: Environment, req: LaunchRequest, caps, amd: bool) -> bool:  # type: ignore[no-untyped-def]
    """A refusal is only ever for a KV dtype this version or GPU lacks (or an FP4 KV cache), or an explicit
    backend that cannot work here: not a choice of this version, no kernels (after SGLang's fa3 + fp8_e5m2 ->
    triton switch), outside the deterministic or radix list while deterministic, or its KV restriction."""
    kv, backend = req.kv_cache_dtype, req.attention_backend
    hw = Vendor.AMD if (env.vendor is Vendor.AMD or env.torch_hip) else Vendor.NVIDIA
    if req.tp_size > env.gpu_count or req.kv_heads % req.tp_size:
        return True
    if kv not in caps.kv_cache_dtypes or kv in FP4_KV_CACHE_DTYPES:
        return True
    if kv is KVCacheDtype.MXFP8 and (hw is Vendor.AMD or not is_blackwell(env.arch, env.cuda_version)):
        return True
    if backend is None:
        return False
    runs = (
        AttentionBackend.TRITON if (backend, kv) == (AttentionBackend.FA3, KVCacheDtype.FP8_E5M2) else backend
    )
    deterministic = req.deterministic and not amd
    allowed_kv = caps.kv_allowed_with(backend)
    guarded = (
        (backend is AttentionBackend.TRTLLM_MLA and not is_blackwell(env.arch, env.cuda_version))
        or (backend is AttentionBackend.FA4 and caps.fa4_prefill_only)
        or (
            backend is AttentionBackend.TRTLLM_MLA
            and caps.trtllm_mla_sm100_only
            and not is_sm100(env.arch, env.cuda_version)
        )
        or (
            caps.alias_of(backend) is AttentionBackend.CUTEDSL_MLA
            and not is_sm100(env.arch, env.cuda_version)
        )
        or (
            backend is AttentionBackend.TOKENSPEED_MLA
            and caps.alias_of(backend) is backend
            and not is_blackwell(env.arch, env.cuda_version)
        )
        or (
            backend is AttentionBackend.FA4
            and deterministic
            and not (env.arch in ("sm100", "sm103", "sm110") and is_blackwell(env.arch, env.cuda_version))
        )
    )
    return (
        guarded
        or backend not in caps.attention_backends
        or not backend_runs_on(runs, hw, env.arch, caps.version)
        or (deterministic and backend not in caps.deterministic_backends)
        or (
            deterministic
            and req.deepseek_family
            and caps.deepseek_needs_radix_backend
            and backend not in caps.deepseek_allowed()
        )
        or (allowed_kv is not None and kv not in allowed_kv)
    )


def sweep() -> tuple[int, int, int]:
    """Run the exhaustive sweep, asserting the invariants on every point; returns (points, plans, refusals)."""
    points = plans = refusals = 0
    for (vendor, arch, hip), marker, version in itertools.product(
        SWEEP_PLATFORMS, SWEEP_MARKERS, KNOWN_VERSIONS
    ):
        env = Environment(
            vendor=vendor,
            arch=arch,
            torch_hip=hip,
            ci=CIMarkers(None, marker),
            sglang_version=version,
            gpu_count=2,
        )
        amd = bool(amd_signals(env))
        caps = capabilities_for(version)
        hw = Vendor.AMD if hip else Vendor.NVIDIA
        for backend, kv, tp in itertools.product(SWEEP_BACKENDS, KVCacheDtype, SWEEP_TP):
            points += 1
            req = LaunchRequest(attention_backend=backend, kv_cache_dtype=kv, tp_size=tp)
            try:
                plan = compose(env, req)
            except UnsupportedCombination as exc:
                refusals += 1
                assert _refusal_is_justified(env, req, caps, amd), (env, req, exc)
                assert (backend is not None and backend.value in str(exc)) or kv.value in str(exc), exc
                continue
            plans += 1
            assert (DETERMINISTIC_FLAG in plan.argv) is (not amd), (env, req)
            names = [o.name for o in read_server_args(plan.argv, plan.sglang_version).options]
            assert len(names) == len(set(names))
            assert backend_runs_on(plan.attention_backend, hw, arch, version)
            if plan.deterministic:
                assert plan.attention_backend in caps.deterministic_backends
    return points, plans, refusals


def test_exhaustive_sweep_holds_every_invariant():
    """Over vendor x arch x CI marker x backend x KV dtype x tp x every known SGLang version, the flag
    reaches exactly the environments without an AMD signal, options are unique, the predicted backend runs
    and is allowed, and every refusal is for an explicit backend that cannot work."""
    points, plans, refusals = sweep()
    assert points == len(SWEEP_PLATFORMS) * len(SWEEP_MARKERS) * len(KNOWN_VERSIONS) * len(
        SWEEP_BACKENDS
    ) * len(KVCacheDtype) * len(SWEEP_TP)
    assert plans > 0 and refusals > 0
    # With no explicit backend and a KV dtype every GPU accepts, nothing is refused: every platform gets a plan.
    assert plans >= len(SWEEP_PLATFORMS) * len(SWEEP_MARKERS) * len(KNOWN_VERSIONS) * len(
        S.UNIVERSAL_KV
    ) * len(SWEEP_TP)


#: Options that steer what compose decides, drawn more often next to the whole table.
_STEERING = (
    "--enable-deterministic-inference",
    "--rl-on-policy-target",
    "--attention-backend",
    "--kv-cache-dtype",
    "--tp-size",
    "--disable-custom-all-reduce",
)


class TestSGLangSpellings:
    """Properties over extra arguments drawn from each version's real option table (prefixes, ``=`` forms,
    aliases, repeats)."""

    @settings(deadline=None)  # argparse over ~500 options: slow on a loaded 2-core machine, not a target
    @given(data=st.data(), version=S.versions, env=S.environments(Vendor.AMD))
    def test_no_spelling_brings_deterministic_inference_to_amd(self, data, version, env):
        """On AMD, whatever SGLang spelling of whatever options the user adds, compose refuses or returns a
        plan SGLang reads with deterministic inference off."""
        env = replace(env, sglang_version=version, gpu_count=8)
        names = data.draw(st.sampled_from([_STEERING, None]), label="pool")
        extra = data.draw(S.sglang_argv(version, names), label="extra")
        try:
            plan = compose(env, LaunchRequest(extra_args=extra))
        except (UnsupportedCombination, InvalidEnvironment) as exc:
            amd_rule = "AMD/ROCm" in str(exc)
            event(f"refused: {type(exc).__name__}{' (AMD deterministic rule)' if amd_rule else ''}")
            return
        event("plan checked")
        assert not plan.deterministic and not read_plan(plan).deterministic, (extra, plan.argv)

    @settings(deadline=None)
    @given(data=st.data(), version=S.versions, env=S.nvidia_without_amd_signal())
    def test_plan_reading_matches_the_users_reading(self, data, version, env):
        """On NVIDIA the plan, read as SGLang reads it, keeps the user's last value of every option it does not
        fold, and its backend/KV/tp are the ones compose decided (each written once, in full)."""
        env = replace(env, sglang_version=version, gpu_count=8)
        extra = data.draw(
            S.sglang_argv(version, (*_STEERING, "--mem-fraction-static", "--log-level")), label="extra"
        )
        try:
            plan = compose(env, LaunchRequest(extra_args=extra))
        except (UnsupportedCombination, InvalidEnvironment):
            event("refused")
            assume(False)
            return
        event("plan checked")
        user, read = read_server_args(extra, version), read_plan(plan)
        assert read.deterministic is plan.deterministic
        assert read.kv_cache_dtype == (user.kv_cache_dtype or "fp8_e5m2")
        for o in user.options:
            if o.name not in ("--attention-backend", "--kv-cache-dtype", "--tp-size", DETERMINISTIC_FLAG):
                got = read.get(o.name)
                assert got is not None and got.values == o.values, (o, plan.argv)
        assert all(not o.abbreviated for o in read.options), plan.argv
