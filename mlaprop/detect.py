"""Detect the environment the server will run in. The impure edge in front of :func:`mlaprop.compose.compose`.

Order: explicit overrides (``MLAPROP_VENDOR``, ``MLAPROP_ARCH``, ``MLAPROP_SGLANG_VERSION``), then hardware
probes (``torch`` if importable, else ``nvidia-smi`` / ``rocminfo``), then device masks. CI markers are kept
raw and read by :mod:`mlaprop.ci` exactly as SGLang reads them.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlaprop.capabilities import NEWEST, capabilities_for, parse_arch
from mlaprop.environment import CIMarkers, Environment, InvalidEnvironment, Vendor, parse_enum

__all__ = [
    "AMD_ENV_VARS",
    "AmdEvidence",
    "HardwareConflict",
    "HardwareProbe",
    "apply_device_masks",
    "check_override",
    "detect_environment",
    "parse_device_mask",
    "probe_amd_evidence",
    "probe_hardware",
    "simulation_platform",
]

#: Probe commands get this long before they count as absent (seconds).
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class HardwareProbe:
    """What a hardware probe saw.

    Attributes:
        vendor: GPU vendor found, ``Vendor.NONE`` when nothing answered.
        arch: ``smXY`` or ``gfxNNN`` of the first device, ``""`` when unknown.
        count: devices seen by the probe.
        masks_applied: the probe already honoured the device masks (torch does, ``nvidia-smi`` does not).
        torch_hip: ``torch.version.hip`` is set.
        cuda_version: ``torch.version.cuda`` (``"12.8"``) or ``None``.
        source: which probe answered (``"torch"``, ``"nvidia-smi"``, ``"rocminfo"``, ``"none"``).
    """

    vendor: Vendor = Vendor.NONE
    arch: str = ""
    count: int = 0
    masks_applied: bool = False
    torch_hip: bool = False
    cuda_version: str | None = None
    source: str = "none"


def _run(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _probe_torch() -> HardwareProbe | None:
    try:
        import torch  # type: ignore[import-not-found]
    except Exception:  # a broken torch install is "no torch" for detection
        return None
    hip = getattr(torch.version, "hip", None)
    cuda = getattr(torch.version, "cuda", None)
    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    except Exception:
        available, count = False, 0
    if not available or count == 0:
        if hip is None and cuda is None:
            return None  # a CPU build of torch says nothing about GPUs: ask the vendor tools
        return HardwareProbe(torch_hip=hip is not None, cuda_version=cuda, source="torch", masks_applied=True)
    if hip is not None:
        name = str(getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") or "")
        arch = name.split(":")[0]
        return HardwareProbe(Vendor.AMD, arch, count, True, True, cuda, "torch")
    major, minor = torch.cuda.get_device_capability(0)
    return HardwareProbe(Vendor.NVIDIA, f"sm{major}{minor}", count, True, False, cuda, "torch")


def _probe_nvidia_smi() -> HardwareProbe | None:
    out = _run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    if not out:
        return None
    caps = [line.strip() for line in out.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]
    if not caps:
        return None
    return HardwareProbe(Vendor.NVIDIA, "sm" + caps[0].replace(".", ""), len(caps), source="nvidia-smi")


def _probe_rocminfo() -> HardwareProbe | None:
    out = _run(["rocminfo"])
    if not out:
        return None
    archs = re.findall(r"^\s*Name:\s*(gfx[0-9a-f]+)\s*$", out, flags=re.MULTILINE)
    if not archs:
        return None
    return HardwareProbe(Vendor.AMD, archs[0], len(archs), source="rocminfo")


def probe_hardware() -> HardwareProbe:
    """Ask torch, then ``nvidia-smi``, then ``rocminfo``; the first that sees a GPU answers.

    Never raises: a missing or failing probe (timeout :data:`PROBE_TIMEOUT` seconds) counts as no answer.
    """
    torch_probe = _probe_torch()
    if torch_probe is not None and torch_probe.vendor is not Vendor.NONE:
        return torch_probe
    for probe in (_probe_nvidia_smi, _probe_rocminfo):
        found = probe()
        if found is not None:
            if torch_probe is not None:  # keep what torch knew about its build
                return HardwareProbe(
                    found.vendor,
                    found.arch,
                    found.count,
                    False,
                    torch_probe.torch_hip,
                    torch_probe.cuda_version,
                    found.source,
                )
            return found
    return torch_probe if torch_probe is not None else HardwareProbe()


#: Environment variables that only a ROCm/HIP install sets or reads; any of them set is an AMD signal.
AMD_ENV_VARS: tuple[str, ...] = (
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_PLATFORM",
    "ROCM_PATH",
    "HIP_PATH",
)


@dataclass(frozen=True)
class AmdEvidence:
    """Every AMD signal the machine gives, probed whatever the overrides say.

    Attributes:
        torch_hip: ``torch.version.hip`` (``"6.2.41133"``), ``None`` when unset or no torch.
        tools: ROCm tools that listed a GPU (``"rocminfo: gfx942"``, ``"amd-smi"``).
        kfd: ``/dev/kfd`` (the ROCm kernel driver's device) exists.
        env_vars: :data:`AMD_ENV_VARS` that are set, as ``NAME=value``.
    """

    torch_hip: str | None = None
    tools: tuple[str, ...] = ()
    kfd: bool = False
    env_vars: tuple[str, ...] = ()

    def signals(self) -> tuple[str, ...]:
        """The signals in words, for messages; empty when the machine shows nothing of AMD."""
        out = []
        if self.torch_hip:
            out.append(f"torch.version.hip={self.torch_hip}")
        out += list(self.tools)
        if self.kfd:
            out.append("/dev/kfd exists")
        out += list(self.env_vars)
        return tuple(out)

    def hardware(self) -> bool:
        """A ROCm GPU or driver is present (torch HIP build, a ROCm tool listing a GPU, ``/dev/kfd``); the
        variables alone can be left over from a shared image."""
        return bool(self.torch_hip or self.tools or self.kfd)


def _torch_hip_version() -> str | None:
    try:
        import torch
    except Exception:
        return None
    hip = getattr(getattr(torch, "version", None), "hip", None)
    return str(hip) if hip else None


def probe_amd_evidence(
    environ: Mapping[str, str],
    *,
    torch_hip: Callable[[], str | None] = _torch_hip_version,
    run: Callable[[list[str]], str | None] = lambda cmd: _run(cmd),
    exists: Callable[[str], bool] = os.path.exists,
) -> AmdEvidence:
    """Probe every AMD signal: ``torch.version.hip``, ``rocminfo`` / ``amd-smi list``, ``/dev/kfd`` and
    :data:`AMD_ENV_VARS`. Each probe is injectable; none raises (a failing probe is no signal)."""
    tools = []
    out = run(["rocminfo"])
    if out:
        archs = re.findall(r"^\s*Name:\s*(gfx[0-9a-f]+)\s*$", out, flags=re.MULTILINE)
        if archs:
            tools.append(f"rocminfo lists {archs[0]}")
    out = run(["amd-smi", "list"])
    if out and re.search(r"GPU\s*:?\s*\d", out):
        tools.append("amd-smi lists a GPU")
    return AmdEvidence(
        torch_hip=torch_hip(),
        tools=tuple(tools),
        kfd=exists("/dev/kfd"),
        env_vars=tuple(f"{k}={environ[k]}" for k in AMD_ENV_VARS if environ.get(k) not in (None, "")),
    )


class HardwareConflict(InvalidEnvironment):
    """An override (``--vendor``/``--arch``, ``MLAPROP_VENDOR``/``MLAPROP_ARCH``) names another platform than
    the machine's, for a command that runs on the machine (``run``, ``preflight``, the GPU tests)."""


def check_override(
    vendor: Vendor | None,
    arch: str,
    probed: HardwareProbe,
    evidence: AmdEvidence,
    *,
    vendor_given: bool = True,
) -> None:
    """Refuse an override the machine contradicts. Pure.

    Args:
        vendor: the overriding vendor (given, or implied by ``arch``: ``sm*`` NVIDIA, ``gfx*`` AMD).
        arch: the overriding architecture, ``""`` when none.
        probed: what the hardware probe saw.
        evidence: the machine's AMD signals.
        vendor_given: ``vendor`` was given (``False``: implied by ``arch``), for the message.

    Raises:
        HardwareConflict: the override says NVIDIA but the machine shows an AMD signal; says AMD but the
            machine has an NVIDIA GPU and no AMD signal; or names an architecture other than the probed one
            of the same vendor. The message names the override and what the machine shows.
    """
    parts = [f"MLAPROP_VENDOR/--vendor={vendor}" if vendor and vendor_given else ""]
    parts.append(f"MLAPROP_ARCH/--arch={arch}" if arch else "")
    said = ", ".join(x for x in parts if x)
    fix = "; unset the override (it is for previews with `mlaprop compose`) or run on the machine it names"
    amd = evidence.signals() if evidence.hardware() else ()
    if vendor is Vendor.NVIDIA and amd:
        raise HardwareConflict(f"{said} says NVIDIA, but this machine shows AMD/ROCm: {'; '.join(amd)}{fix}")
    if vendor is Vendor.AMD and probed.vendor is Vendor.NVIDIA and not amd:
        raise HardwareConflict(
            f"{said} says AMD, but this machine has NVIDIA {probed.arch or 'GPUs'} ({probed.source}) and no AMD "
            f"signal{fix}"
        )
    same_vendor = probed.vendor is not Vendor.NONE and (vendor is None or probed.vendor is vendor)
    if arch and probed.arch and same_vendor and arch.lower() != probed.arch.lower():
        raise HardwareConflict(
            f"{said} names {arch}, but this machine's GPU is {probed.arch} ({probed.source}){fix}"
        )


def simulation_platform(
    vendor: str | None, arch: str | None, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """The platform ``run --simulate`` plans for: the options, else ``MLAPROP_VENDOR`` / ``MLAPROP_ARCH``,
    else the H200 CI runner (``nvidia``, ``sm90``); returns ``(vendor, arch)`` for the run options."""
    if vendor or arch or environ.get("MLAPROP_VENDOR") or environ.get("MLAPROP_ARCH"):
        return vendor, arch
    return "nvidia", "sm90"


def parse_device_mask(value: str | None) -> tuple[str, ...] | None:
    """Parse a ``*_VISIBLE_DEVICES`` value into the device entries it keeps; ``None`` when unset.

    Follows the CUDA runtime: entries are comma separated (indices, ``GPU-<uuid>``, ``MIG-<uuid>``); the
    list ends at the first invalid entry (e.g. ``-1``); an empty value hides every device.
    """
    if value is None:
        return None
    kept: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            if kept:
                break
            continue
        if re.fullmatch(r"-?[0-9]+", entry):
            if int(entry) < 0:
                break
        elif not re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z/-]+", entry):
            break
        kept.append(entry)
    return tuple(kept)


def _rocm_mask_names(environ: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ROCm masks that apply, in order, and notes on those HIP ignores.

    ROCr (``ROCR_VISIBLE_DEVICES``) filters first whenever the variable is set, even to ``""`` (ROCr's
    ``flag.h``: ``filter_visible_gpus_ = os::IsEnvVarSet("ROCR_VISIBLE_DEVICES")``). HIP then reads one list:
    ``HIP_VISIBLE_DEVICES`` when it is non-empty, else ``CUDA_VISIBLE_DEVICES``, and applies it only when
    that list is non-empty (ROCm clr ``rocclr/device/rocm/rocdevice.cpp``: ``(HIP_VISIBLE_DEVICES[0] !=
    '\\0') ? HIP_VISIBLE_DEVICES : CUDA_VISIBLE_DEVICES``, then ``if (ordinals[0] != '\\0')``). So unlike
    CUDA, an empty ``HIP_VISIBLE_DEVICES`` or ``CUDA_VISIBLE_DEVICES`` hides nothing on ROCm.
    """
    names: list[str] = []
    notes: list[str] = []
    if "ROCR_VISIBLE_DEVICES" in environ:
        names.append("ROCR_VISIBLE_DEVICES")
    hip = environ.get("HIP_VISIBLE_DEVICES")
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if hip:
        names.append("HIP_VISIBLE_DEVICES")
        if cuda is not None:
            notes.append(
                f"CUDA_VISIBLE_DEVICES={cuda!r} is ignored on ROCm: HIP uses HIP_VISIBLE_DEVICES={hip!r} "
                "when it is non-empty"
            )
    elif cuda:
        names.append("CUDA_VISIBLE_DEVICES")
    for name, value in (("HIP_VISIBLE_DEVICES", hip), ("CUDA_VISIBLE_DEVICES", cuda)):
        if value == "":
            notes.append(f"{name}='' is empty: HIP treats it as unset (it hides nothing on ROCm)")
    return tuple(names), tuple(notes)


def apply_device_masks(
    physical: int, vendor: Vendor, environ: Mapping[str, str]
) -> tuple[int, tuple[str, ...]]:
    """Visible device count after the masks, and notes on what the masks did.

    NVIDIA honours ``CUDA_VISIBLE_DEVICES`` (an empty value hides every device). ROCm applies
    ``ROCR_VISIBLE_DEVICES`` first (whenever set), then HIP's one list: ``HIP_VISIBLE_DEVICES`` when
    non-empty, else ``CUDA_VISIBLE_DEVICES`` when non-empty, as indices into what ROCr left (see
    :func:`_rocm_mask_names` for the runtime sources; sglang-rules.md section 5).
    """
    notes: list[str] = []
    if vendor is Vendor.AMD:
        names, rocm_notes = _rocm_mask_names(environ)
        notes += rocm_notes
    else:
        names = ("CUDA_VISIBLE_DEVICES",)
    count = physical
    for name in names:
        mask = parse_device_mask(environ.get(name))
        if mask is None:
            continue
        indices = [int(e) for e in mask if re.fullmatch(r"[0-9]+", e)]
        in_range = [i for i in indices if i < count]
        uuids = [e for e in mask if not re.fullmatch(r"[0-9]+", e)]
        new = min(count, len(in_range) + len(uuids)) if (indices or uuids) else 0
        if len(in_range) < len(indices):
            notes.append(
                f"{name}={environ.get(name)!r} names devices beyond the {count} visible at that point; "
                "they are ignored"
            )
        if new == 0:
            notes.append(f"{name}={environ.get(name)!r} hides every GPU")
        count = new
    if vendor is Vendor.AMD and "ROCR_VISIBLE_DEVICES" in environ and environ.get("HIP_VISIBLE_DEVICES"):
        notes.append(
            "both ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES are set: HIP indexes into the devices ROCR left, "
            "which can hide every GPU; set only one"
        )
    return count, tuple(notes)


def _sglang_version(environ: Mapping[str, str], override: str | None) -> tuple[str, tuple[str, ...]]:
    override = override or environ.get("MLAPROP_SGLANG_VERSION")
    if override:
        capabilities_for(override)  # validate
        return override.strip(), ()
    try:
        return importlib.metadata.version("sglang"), ()
    except importlib.metadata.PackageNotFoundError:
        return NEWEST, (f"SGLang is not installed here; rules of SGLang {NEWEST} assumed",)


def detect_environment(
    environ: Mapping[str, str] | None = None,
    probe: Callable[[], HardwareProbe] = probe_hardware,
    *,
    vendor: Vendor | None = None,
    arch: str | None = None,
    sglang_version: str | None = None,
    hardware_speaks: bool = False,
    amd_probe: Callable[[Mapping[str, str]], AmdEvidence] = probe_amd_evidence,
) -> Environment:
    """Detect the environment from variables and hardware.

    Args:
        environ: environment variables; ``None`` reads ``os.environ``.
        probe: hardware probe (injectable for tests); for a preview not called when both ``MLAPROP_VENDOR``
            and ``MLAPROP_ARCH`` are set.
        hardware_speaks: the command runs on this machine (``run``, ``preflight``, the GPU tests): the probe
            and every AMD signal (:func:`probe_amd_evidence`) are read whatever the overrides say, an
            override the machine contradicts raises :class:`HardwareConflict`, and AMD evidence counts in
            ``Environment.amd_evidence``. ``False`` (``compose``, ``run --simulate``): an override previews.
        amd_probe: the AMD evidence probe (injectable for tests).
        vendor, arch, sglang_version: explicit overrides (the CLI's ``--vendor`` / ``--arch`` /
            ``--sglang-version``), taking precedence over ``MLAPROP_VENDOR`` / ``MLAPROP_ARCH`` /
            ``MLAPROP_SGLANG_VERSION`` and read the same way.

    Returns:
        An :class:`Environment`; ``notes`` says which probe answered and what the masks did.

    Raises:
        InvalidEnvironment: ``MLAPROP_VENDOR`` / ``MLAPROP_ARCH`` / ``MLAPROP_SGLANG_VERSION`` hold an
            unknown value; the message lists valid ones.
        HardwareConflict: with ``hardware_speaks``, the override and the machine disagree (names both).
    """
    env = os.environ if environ is None else environ
    notes: list[str] = []
    vendor_override: str | None = vendor.value if vendor is not None else env.get("MLAPROP_VENDOR")
    arch_override = arch or env.get("MLAPROP_ARCH")
    vendor = None
    if vendor_override:
        vendor = parse_enum(Vendor, vendor_override, "GPU vendor in MLAPROP_VENDOR")
    arch = ""
    if arch_override:
        family, _ = parse_arch(arch_override)
        arch = arch_override.strip().lower()
        if vendor is None:
            vendor = Vendor.NVIDIA if family == "sm" else Vendor.AMD
    hw = HardwareProbe()
    evidence = AmdEvidence()
    if vendor is None or not arch or hardware_speaks:
        hw = probe()
        notes.append(
            f"hardware probe {hw.source}: {hw.vendor} {hw.arch or '-'} x{hw.count}"
            if hw.vendor is not Vendor.NONE
            else "hardware probe: no GPU found by torch, nvidia-smi or rocminfo"  # was "none: none - x0"
        )
    if hardware_speaks:
        evidence = amd_probe(env)
        if vendor_override or arch_override:
            check_override(vendor, arch, hw, evidence, vendor_given=bool(vendor_override))
        if evidence.signals():
            notes.append(f"AMD signals on this machine: {'; '.join(evidence.signals())}")
    if vendor is None:
        vendor = hw.vendor
    elif hw.vendor not in (Vendor.NONE, vendor):
        notes.append(f"MLAPROP_VENDOR={vendor} overrides the probed {hw.vendor}")
    if not arch and hw.vendor is vendor:
        arch = hw.arch
    if vendor_override or arch_override:
        # A preview of another platform: one GPU unless the probe saw the same vendor.
        physical = hw.count if hw.vendor is vendor and hw.count else (1 if vendor is not Vendor.NONE else 0)
        masks_applied = hw.masks_applied and hw.vendor is vendor
    else:
        physical, masks_applied = hw.count, hw.masks_applied
    count = physical
    if vendor is not Vendor.NONE and not masks_applied:
        count, mask_notes = apply_device_masks(physical, vendor, env)
        notes += mask_notes
    if vendor is Vendor.NONE:
        count, arch = 0, ""
    version, version_notes = _sglang_version(env, sglang_version)
    notes += version_notes
    return Environment(
        vendor=vendor,
        arch=arch,
        gpu_count=count,
        torch_hip=hw.torch_hip or bool(evidence.torch_hip),
        amd_evidence=evidence.signals() if evidence.hardware() else (),
        rocm_fused_decode_mla=env.get("SGLANG_ROCM_FUSED_DECODE_MLA"),
        cuda_version=hw.cuda_version if hw.cuda_version else None,
        ci=CIMarkers(env.get("SGLANG_IS_IN_CI"), env.get("SGLANG_IS_IN_CI_AMD")),
        sglang_version=version,
        notes=tuple(notes),
    )
