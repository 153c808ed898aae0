"""Tests for `mlaprop.detect`, `mlaprop.ci` and `mlaprop.args`: detection from environment dicts with an
injected hardware probe (no GPU needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlaprop.args import read_server_args
from mlaprop.ci import envbool, is_in_amd_ci_test_utils, read_amd_marker
from mlaprop.compose import DETERMINISTIC_FLAG, UnsupportedCombination, compose
from mlaprop.detect import (
    AmdEvidence,
    HardwareConflict,
    HardwareProbe,
    apply_device_masks,
    detect_environment,
    parse_device_mask,
    probe_amd_evidence,
    simulation_platform,
)
from mlaprop.environment import CIMarkers, Environment, InvalidEnvironment, Vendor
from tests import strategies as S

NV8 = HardwareProbe(Vendor.NVIDIA, "sm90", 8, False, False, None, "nvidia-smi")
NONE = HardwareProbe()


class TestCIMarkerParsers:
    """Tests for SGLang's two readings of ``SGLANG_IS_IN_CI_AMD``."""

    @pytest.mark.parametrize(
        ("raw", "test_utils", "env_bool"),
        [
            (None, False, False),
            ("1", True, True),
            ("true", True, True),
            ("TRUE", True, True),
            ("yes", False, True),
            ("y", False, True),
            ("0", False, False),
            ("false", False, False),
            ("", False, False),
            ("on", False, False),
            (" 1", False, False),
            (" true ", False, False),
            ("Y", False, True),
        ],
    )
    def test_both_parsers_match_sglang(self, raw, test_utils, env_bool):  # type: ignore[no-untyped-def]
        """``is_in_amd_ci`` accepts only true/1; ``EnvBool`` accepts true/1/yes/y (lower-cased, not
        stripped, as ``sglang/srt/environ.py`` does)."""
        assert is_in_amd_ci_test_utils(raw) is test_utils
        assert envbool(raw) is env_bool
        reading = read_amd_marker(CIMarkers(None, raw))
        assert reading.is_amd_signal is (test_utils or env_bool)
        assert reading.parsers_disagree is (test_utils != env_bool)


class TestDeviceMasks:
    """Tests for ``*_VISIBLE_DEVICES`` handling."""

    @pytest.mark.parametrize(
        ("value", "kept"),
        [
            (None, None),
            ("", ()),
            ("0", ("0",)),
            ("10,11", ("10", "11")),
            ("0,-1,1", ("0",)),
            ("-1", ()),
            ("GPU-6f1a2b3c-aaaa,1", ("GPU-6f1a2b3c-aaaa", "1")),
            ("a,b", ()),
            ("--0", ()),
            ("²", ()),
            ("0,²,1", ("0",)),
        ],
    )
    def test_parse_device_mask_follows_the_cuda_runtime(self, value, kept):  # type: ignore[no-untyped-def]
        """Entries up to the first invalid one are kept; an empty value hides every device."""
        assert parse_device_mask(value) == kept

    @pytest.mark.parametrize(
        ("environ", "count"),
        [
            ({}, 8),
            ({"CUDA_VISIBLE_DEVICES": ""}, 0),
            ({"CUDA_VISIBLE_DEVICES": "10,11"}, 0),
            ({"CUDA_VISIBLE_DEVICES": "0,3"}, 2),
            ({"CUDA_VISIBLE_DEVICES": "GPU-abc"}, 1),
        ],
    )
    def test_nvidia_mask_counts(self, environ, count):  # type: ignore[no-untyped-def]
        """Visible NVIDIA GPUs follow ``CUDA_VISIBLE_DEVICES`` (indices past the last device are ignored)."""
        assert detect_environment(environ, probe=lambda: NV8).gpu_count == count

    def test_hip_honours_cuda_visible_devices(self):
        """On ROCm, ``CUDA_VISIBLE_DEVICES`` also masks devices."""
        count, _ = apply_device_masks(8, Vendor.AMD, {"CUDA_VISIBLE_DEVICES": "0,1,2"})
        assert count == 3

    @given(
        mask=S.hostile_masks,
        name=st.sampled_from(["CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"]),
    )
    def test_odd_masks_never_raise_and_never_exceed_the_hardware(self, mask, name):  # type: ignore[no-untyped-def]
        """Any mask string gives a count between 0 and the physical count; a zero count makes compose refuse
        with a message naming the mask variables."""
        for probe in (NV8, HardwareProbe(Vendor.AMD, "gfx942", 8, False, True, None, "rocminfo")):
            env = detect_environment({name: mask}, probe=lambda p=probe: p)
            assert 0 <= env.gpu_count <= 8
            if env.gpu_count == 0:
                with pytest.raises(UnsupportedCombination, match="VISIBLE_DEVICES"):
                    compose(env)


class TestOverrides:
    """Tests for ``MLAPROP_VENDOR`` / ``MLAPROP_ARCH`` / ``MLAPROP_SGLANG_VERSION``."""

    def test_arch_override_implies_vendor_and_skips_probe(self):
        """``MLAPROP_ARCH=gfx942`` alone means AMD; with vendor and arch both set no probe runs."""

        def boom() -> HardwareProbe:
            raise AssertionError("probe must not run")

        env = detect_environment({"MLAPROP_ARCH": "gfx942", "MLAPROP_VENDOR": "amd"}, probe=boom)
        assert (env.vendor, env.arch, env.gpu_count) == (Vendor.AMD, "gfx942", 1)
        env2 = detect_environment({"MLAPROP_ARCH": "sm100"}, probe=lambda: NONE)
        assert env2.vendor is Vendor.NVIDIA and env2.arch == "sm100"

    @pytest.mark.parametrize(
        ("environ", "match"),
        [
            ({"MLAPROP_VENDOR": "intel"}, "expected one of nvidia, amd, none"),
            ({"MLAPROP_ARCH": "hopper"}, "sm90"),
            ({"MLAPROP_SGLANG_VERSION": "latest"}, "not a version number"),
            ({"MLAPROP_SGLANG_VERSION": "0.4.0"}, "older than the oldest"),
        ],
    )
    def test_bad_overrides_list_valid_values(self, environ, match):  # type: ignore[no-untyped-def]
        """A bad override raises ``InvalidEnvironment`` with the valid values."""
        with pytest.raises(InvalidEnvironment, match=match):
            detect_environment(environ, probe=lambda: NONE)

    def test_no_gpu_detects_vendor_none(self):
        """No probe answer: vendor ``none``, zero GPUs, and compose refuses saying how to preview."""
        env = detect_environment({}, probe=lambda: NONE)
        assert env.vendor is Vendor.NONE and env.gpu_count == 0
        # regression: `mlaprop env` noted "hardware probe none: none - x0"
        assert "hardware probe: no GPU found by torch, nvidia-smi or rocminfo" in env.notes
        with pytest.raises(UnsupportedCombination, match="--vendor amd --arch gfx942"):
            compose(env)

    @given(
        environ=st.dictionaries(
            st.sampled_from(
                [
                    "SGLANG_IS_IN_CI",
                    "SGLANG_IS_IN_CI_AMD",
                    "CUDA_VISIBLE_DEVICES",
                    "HIP_VISIBLE_DEVICES",
                    "ROCR_VISIBLE_DEVICES",
                    "MLAPROP_VENDOR",
                    "MLAPROP_ARCH",
                    "MLAPROP_SGLANG_VERSION",
                ]
            ),
            st.text(max_size=10),
        )
    )
    def test_hostile_environments_detect_or_fail_with_a_listed_fix(self, environ):  # type: ignore[no-untyped-def]
        """Arbitrary variable values either detect an environment (and compose gives a full plan or a
        ``ValueError``), or raise ``InvalidEnvironment`` whose message gives an expected form."""
        try:
            env = detect_environment(environ, probe=lambda: NV8)
        except InvalidEnvironment as exc:
            assert "expected" in str(exc) or "known" in str(exc)
            return
        assert isinstance(env, Environment)
        try:
            plan = compose(env)
        except ValueError as exc:
            assert str(exc)
            return
        assert plan.option("--kv-cache-dtype") == "fp8_e5m2"


class TestParseArgs:
    """Tests for SGLang argument reading (argparse semantics with the version's option table)."""

    def test_forms(self):
        """``--x v``, ``--x=v``, switches, negative numbers as values, prefixes and aliases are read as
        argparse reads them; the last repeat wins."""
        read = read_server_args(
            ["--tp", "2", "--random-seed", "-1", "--disable-cuda-graph", "--tensor-parallel-size=4"], "0.5.23"
        )
        assert [(o.name, o.values) for o in read.options] == [
            ("--random-seed", ("-1",)),
            ("--disable-cuda-graph", ()),
            ("--tp-size", ("4",)),
        ]
        assert read.tp_size == "4" and read.repeated == ("--tp-size",)

    @pytest.mark.parametrize(
        ("tokens", "match"),
        [
            (["triton"], "unrecognized arguments: triton"),
            (["--attention-backend"], "expected one argument"),
            (["--trust-remote-code=1"], "ignored explicit argument"),
            (["--mod", "x"], "ambiguous option: --mod"),
            (["--no-such-option", "1"], "unrecognized arguments"),
        ],
    )
    def test_errors_say_how_to_write_it(self, tokens, match):  # type: ignore[no-untyped-def]
        """Extra arguments SGLang's parser refuses raise ``InvalidEnvironment`` with argparse's reason."""
        with pytest.raises(InvalidEnvironment, match=match):
            read_server_args(tokens, "0.5.23")


class TestHardwareSpeaks:
    """Tests that an override previews for ``compose`` but never hides the machine from ``run``."""

    ROCM_MACHINE = staticmethod(lambda: HardwareProbe(Vendor.AMD, "gfx942", 8, True, True, None, "torch"))
    H200_MACHINE = staticmethod(lambda: HardwareProbe(Vendor.NVIDIA, "sm90", 8, True, False, "12.8", "torch"))
    NO_GPU = staticmethod(lambda: HardwareProbe())

    @staticmethod
    def _evidence(**kw):  # type: ignore[no-untyped-def]
        return lambda environ: AmdEvidence(**kw)

    def test_nvidia_override_on_a_rocm_torch_is_a_conflict_naming_both(self):
        """``MLAPROP_VENDOR=nvidia MLAPROP_ARCH=sm90`` where torch reports ROCm: run refuses, naming the
        override and ``torch.version.hip``."""
        environ = {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"}
        with pytest.raises(HardwareConflict, match=r"MLAPROP_VENDOR/--vendor=nvidia.*torch.version.hip=6.2"):
            detect_environment(
                environ,
                self.NO_GPU,
                hardware_speaks=True,
                amd_probe=self._evidence(torch_hip="6.2"),
            )

    @pytest.mark.parametrize(
        "evidence",
        [{"kfd": True}, {"tools": ("rocminfo lists gfx942",)}, {"torch_hip": "6.3"}],
        ids=["kfd", "rocminfo", "torch-hip"],
    )
    def test_every_amd_signal_conflicts_with_an_nvidia_override(self, evidence):  # type: ignore[no-untyped-def]
        """Each AMD signal alone (``/dev/kfd``, ``rocminfo``, a HIP torch) contradicts an NVIDIA override."""
        with pytest.raises(HardwareConflict, match="shows AMD/ROCm"):
            detect_environment(
                {"MLAPROP_ARCH": "sm90"},
                self.NO_GPU,
                hardware_speaks=True,
                amd_probe=self._evidence(**evidence),
            )

    def test_amd_override_on_nvidia_and_arch_mismatch_are_conflicts(self):
        """An AMD override on an NVIDIA machine, and another arch of the same vendor, are refused."""
        quiet = self._evidence()
        with pytest.raises(HardwareConflict, match=r"says AMD, but this machine has NVIDIA sm90"):
            detect_environment(
                {"MLAPROP_VENDOR": "amd", "MLAPROP_ARCH": "gfx942"},
                self.H200_MACHINE,
                hardware_speaks=True,
                amd_probe=quiet,
            )
        with pytest.raises(HardwareConflict, match=r"names sm100, but this machine's GPU is sm90"):
            detect_environment(
                {"MLAPROP_ARCH": "sm100"}, self.H200_MACHINE, hardware_speaks=True, amd_probe=quiet
            )

    def test_override_that_matches_the_machine_is_fine(self):
        """An override naming the machine's own platform passes, with the probed GPU count."""
        env = detect_environment(
            {"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"},
            self.H200_MACHINE,
            hardware_speaks=True,
            amd_probe=self._evidence(),
        )
        assert (env.vendor, env.arch, env.gpu_count, env.amd_evidence) == (Vendor.NVIDIA, "sm90", 8, ())

    def test_preview_still_previews(self):
        """For ``compose`` (the default) the override previews: no probe is needed, no conflict raised."""

        def boom() -> HardwareProbe:
            raise AssertionError("a preview must not need the probe")

        env = detect_environment({"MLAPROP_VENDOR": "nvidia", "MLAPROP_ARCH": "sm90"}, boom)
        assert (env.vendor, env.arch) == (Vendor.NVIDIA, "sm90")

    def test_amd_evidence_without_override_keeps_the_flag_out(self):
        """An NVIDIA probe on a machine with ``/dev/kfd`` and rocminfo: the evidence reaches compose, which
        leaves the deterministic flag out and says why."""
        env = detect_environment(
            {}, self.H200_MACHINE, hardware_speaks=True, amd_probe=self._evidence(kfd=True)
        )
        assert env.amd_evidence == ("/dev/kfd exists",)
        plan = compose(env)
        assert not plan.deterministic
        assert any("/dev/kfd" in d.reason for d in plan.decisions if d.subject == DETERMINISTIC_FLAG)

    def test_probe_amd_evidence_reads_each_source(self):
        """The probe reads torch, rocminfo, amd-smi, /dev/kfd and the HIP variables through its injectables."""
        outputs = {"rocminfo": "  Name:                    gfx942  \n", "amd-smi": "GPU: 0\n  BDF: ..."}
        ev = probe_amd_evidence(
            {"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0"},
            torch_hip=lambda: "6.2",
            run=lambda cmd: outputs.get(cmd[0]),
            exists=lambda path: path == "/dev/kfd",
        )
        assert ev.signals() == (
            "torch.version.hip=6.2",
            "rocminfo lists gfx942",
            "amd-smi lists a GPU",
            "/dev/kfd exists",
            "HIP_VISIBLE_DEVICES=0",
        )
        none = probe_amd_evidence({}, torch_hip=lambda: None, run=lambda cmd: None, exists=lambda p: False)
        assert none.signals() == () and not none.hardware()

    @pytest.mark.parametrize(
        ("vendor", "arch", "environ", "expected"),
        [
            (None, None, {}, ("nvidia", "sm90")),
            (None, None, {"MLAPROP_VENDOR": "amd", "MLAPROP_ARCH": "gfx942"}, (None, None)),
            (None, None, {"MLAPROP_ARCH": "sm100"}, (None, None)),
            ("amd", "gfx950", {}, ("amd", "gfx950")),
        ],
    )
    def test_simulation_platform_honours_the_variables(self, vendor, arch, environ, expected):  # type: ignore[no-untyped-def]
        """``run --simulate`` defaults to the H200 runner only when neither option nor variable names one."""
        assert simulation_platform(vendor, arch, environ) == expected
