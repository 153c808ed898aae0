"""Hypothesis strategies for mlaprop's domain, shared by every property test.

Valid values are built directly (no filtering); ``hostile_*`` strategies draw the odd inputs that
detection and composition must reject with a clear error.
"""

from __future__ import annotations

from hypothesis import strategies as st

from mlaprop.args import OptionSpec, option_table, read_server_args
from mlaprop.capabilities import KNOWN_VERSIONS
from mlaprop.environment import (
    AttentionBackend,
    CIMarkers,
    Environment,
    KVCacheDtype,
    LaunchRequest,
    Vendor,
)

NVIDIA_ARCHS = ("sm70", "sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm103", "sm120")
AMD_ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx1100")
#: Values of SGLANG_IS_IN_CI_AMD worth naming: both parsers' true and false spellings, and the ones they
#: disagree on.
MARKER_VALUES = (None, "1", "true", "TRUE", "True", "0", "false", "", "yes", "y", "no", "on", " 1", "2")
CUDA_VERSIONS = (None, "11.8", "12.1", "12.4", "12.8", "13.0")
#: KV-cache dtypes every known SGLang version accepts on every GPU (the others depend on version and GPU).
UNIVERSAL_KV = (
    KVCacheDtype.AUTO,
    KVCacheDtype.FP8_E5M2,
    KVCacheDtype.FP8_E4M3,
    KVCacheDtype.BF16,
    KVCacheDtype.BFLOAT16,
)
TP_SIZES = (1, 2, 4, 8)

markers = st.builds(
    CIMarkers,
    sglang_is_in_ci=st.sampled_from((None, "1", "true", "0")),
    sglang_is_in_ci_amd=st.one_of(st.sampled_from(MARKER_VALUES), st.text(max_size=6)),
)
versions = st.sampled_from(KNOWN_VERSIONS)


@st.composite
def environments(draw: st.DrawFn, vendor: Vendor | None = None) -> Environment:
    """Environments with a GPU: NVIDIA (``smXY``) or AMD (``gfxNNN``), any CI markers and known version.

    An AMD machine always has ``torch.version.hip`` set; an NVIDIA one sometimes does too (a hostile but
    possible mix the rules must handle: it is an AMD signal)."""
    v = vendor if vendor is not None else draw(st.sampled_from((Vendor.NVIDIA, Vendor.AMD)))
    if v is Vendor.NVIDIA:
        arch = draw(st.sampled_from(NVIDIA_ARCHS))
        hip = draw(st.sampled_from((False, False, False, True)))
        cuda = draw(st.sampled_from(CUDA_VERSIONS))
    else:
        arch = draw(st.sampled_from(AMD_ARCHS))
        hip, cuda = True, None
    return Environment(
        vendor=v,
        arch=arch,
        gpu_count=draw(st.integers(1, 8)),
        torch_hip=hip,
        cuda_version=cuda,
        ci=draw(markers),
        sglang_version=draw(versions),
    )


def nvidia_without_amd_signal() -> st.SearchStrategy[Environment]:
    """NVIDIA machines where no AMD signal is present (marker false to both SGLang parsers)."""
    return environments(Vendor.NVIDIA).map(
        lambda e: Environment(
            vendor=e.vendor,
            arch=e.arch,
            gpu_count=e.gpu_count,
            cuda_version=e.cuda_version,
            ci=CIMarkers(e.ci.sglang_is_in_ci, None),
            sglang_version=e.sglang_version,
        )
    )


#: Extra SGLang arguments users pass, including ones that collide with what mlaprop composes.
EXTRA_FRAGMENTS = (
    ("--mem-fraction-static", "0.8"),
    ("--disable-cuda-graph",),
    ("--skip-server-warmup",),
    ("--trust-remote-code",),
    ("--kv-cache-dtype", "fp8_e4m3"),
    ("--kv-cache-dtype=auto",),
    ("--tp-size", "2"),
    ("--attention-backend", "triton"),
    ("--attention-backend=flashinfer",),
    ("--load-format", "dummy"),
    ("--random-seed", "-1"),
    ("--max-running-requests", "64"),
    ("--api-key", "sk-secret-value"),
)


@st.composite
def extra_args(draw: st.DrawFn) -> tuple[str, ...]:
    """A list of user extra arguments (possibly repeating an option)."""
    parts = draw(st.lists(st.sampled_from(EXTRA_FRAGMENTS), max_size=4))
    return tuple(tok for part in parts for tok in part)


@st.composite
def requests(draw: st.DrawFn, *, extras: bool = True) -> LaunchRequest:
    """Launch requests: any backend or none, any KV dtype, tp 1..8, deterministic wanted or not."""
    return LaunchRequest(
        kv_cache_dtype=draw(st.sampled_from(list(KVCacheDtype))),
        deterministic=draw(st.booleans()),
        attention_backend=draw(st.none() | st.sampled_from(list(AttentionBackend))),
        tp_size=draw(st.sampled_from(TP_SIZES)),
        extra_args=draw(extra_args()) if extras else (),
    )


def default_requests() -> st.SearchStrategy[LaunchRequest]:
    """The upstream test's request with only tp and a KV dtype every GPU accepts varied (no explicit backend)."""
    return st.builds(
        LaunchRequest,
        kv_cache_dtype=st.sampled_from(UNIVERSAL_KV),
        tp_size=st.sampled_from(TP_SIZES),
    )


#: Values for CUDA_VISIBLE_DEVICES-like masks: empty, UUIDs, multi-digit, negative, junk.
hostile_masks = st.one_of(
    st.sampled_from(
        (
            "",
            "0",
            "1",
            "0,1",
            "10,11",
            "-1",
            "0,-1,1",
            "GPU-6f1a2b3c-aaaa",
            "MIG-1/2/3",
            " ,0",
            "a,b",
            "--0",
            "²",
            "0,²",
        )
    ),
    st.text(alphabet="0123456789,-GPU ab", max_size=12),
)


# --- SGLang argv drawn from a version's real option table (mlaprop/data/sglang_options.json) -----------

for _version in KNOWN_VERSIONS:  # build each version's parser once, outside any Hypothesis deadline
    read_server_args((), _version)

#: Options whose values steer the launch in ways these strategies should not draw at random (the launcher's
#: own, files to read, help, and values that need a real path or URL).
_NOT_DRAWN = ("--model-path", "--host", "--port", "--config", "--help")
_VALUES = ("1", "2", "8", "auto", "0.8", "x")


def _spellings(spec: OptionSpec, table_version: str) -> st.SearchStrategy[str]:
    """A spelling argparse reads as ``spec``: one of its strings, or a unique prefix of one."""
    table = option_table(table_version)
    full = [s for s in spec.strings if s.startswith("--")]
    prefixes = [
        s[:n]
        for s in full
        for n in range(4, len(s))
        if table.resolve(s[:n]) is spec and s[:n] not in table.by_string
    ]
    return st.sampled_from(full + prefixes[:12]) if prefixes else st.sampled_from(full)


@st.composite
def sglang_option(draw: st.DrawFn, version: str, names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """One option of SGLang ``version`` as argv tokens, drawn from its real option table: any spelling
    argparse accepts (full, alias, unique prefix), ``--opt value`` or ``--opt=value``, a choice when the
    table keeps them. ``names`` limits the draw to those options."""
    table = option_table(version)
    pool = [
        o
        for o in table.options
        if (names is None or o.name in names) and o.name not in _NOT_DRAWN and o.nargs in (None, 0)
    ]
    spec = draw(st.sampled_from(pool))
    spelling = draw(_spellings(spec, table.version))
    if spec.switch:
        return (spelling,)
    value = draw(st.sampled_from(spec.choices if spec.choices else _VALUES))
    return (f"{spelling}={value}",) if draw(st.booleans()) else (spelling, value)


def sglang_argv(
    version: str, names: tuple[str, ...] | None = None, max_options: int = 4
) -> st.SearchStrategy[tuple[str, ...]]:
    """Several :func:`sglang_option` draws, flattened (repeats allowed: argparse keeps the last)."""
    return st.lists(sglang_option(version, names), max_size=max_options).map(
        lambda xs: tuple(t for x in xs for t in x)
    )
