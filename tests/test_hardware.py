"""Hardware profiles: built-ins load with datasheet numbers; malformed files fail clearly."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware_profiles import PROFILE_DIR
from sim.core.errors import ConfigError, UnknownNameError
from sim.timing.hardware import (
    DEFAULT_HARDWARE,
    EFFICIENCY_KEYS,
    HardwareProfile,
    Link,
    list_profiles,
    load_profile,
    summary_row,
)

CONTRACT_NAMES = {
    "a100-sxm4-40gb", "a100-sxm4-80gb", "a100-pcie-80gb", "h100-sxm", "h100-pcie", "h200-sxm",
    "l40s", "l4", "rtx-4090", "mi300x", "a40", "b200", "l40", "t4", "v100-sxm2-32gb", "gaudi3",
}  # fmt: skip
FP8_DEVICES = {"h100-sxm", "h100-pcie", "h200-sxm", "l40s", "l4", "rtx-4090", "mi300x", "b200",
               "l40", "gaudi3"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a TOML basic string for the plain text used here


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer (tables, strings, numbers, booleans): enough for profile files."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and (scalars or not data) else []) + scalars
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(_to_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out) + "\n"


def _base() -> dict[str, Any]:
    with (PROFILE_DIR / "h100-sxm.toml").open("rb") as f:
        return tomllib.load(f)


def _write(tmp_path: Path, data: dict[str, Any], name: str = "h100-sxm.toml") -> Path:
    path = tmp_path / name
    path.write_text(_to_toml(data))
    return path


# ------------------------------------------------------------------ built-ins


def test_builtin_names_are_the_contract() -> None:
    assert set(list_profiles()) == CONTRACT_NAMES
    assert list_profiles() == sorted(list_profiles())
    assert DEFAULT_HARDWARE in list_profiles()


@pytest.mark.parametrize("name", sorted(CONTRACT_NAMES))
def test_every_builtin_loads_with_sources(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.vendor in ("nvidia", "amd", "intel")
    assert set(profile.efficiency) == set(EFFICIENCY_KEYS)
    expected_tables = {"memory", "compute", "efficiency", "overhead", "collectives"}
    expected_tables |= {f"links.{link}" for link in profile.links}
    assert set(profile.sources) == expected_tables
    assert all(text.strip() for text in profile.sources.values())
    assert profile.gpu_link in profile.links.values()
    assert profile.host_link in profile.links.values()
    assert profile.host_link.name == "pcie"
    assert all(link.source for link in profile.links.values())
    # fp8 exactly where the silicon has it; tensor fp8 ~ 2 x bf16 (L40S datasheet: 733 vs
    # 362.05, hence 2%), int8 >= bf16
    has_fp8 = "fp8_e4m3" in profile.peak_flops
    assert has_fp8 == (name in FP8_DEVICES)
    # 16-bit tensor rate: bf16, or fp16 on parts without bf16 (T4, V100)
    bf16 = profile.peak_flops_for("bf16" if "bfloat16" in profile.peak_flops else "fp16")
    if has_fp8 and profile.vendor != "intel":  # Gaudi 3's MME runs fp8 at the bf16 rate
        assert profile.peak_flops_for("fp8") == pytest.approx(2 * bf16, rel=0.02)
    if "int8" in profile.peak_flops:
        assert profile.peak_flops_for("int8") >= bf16
    if "float32" in profile.peak_flops:
        assert profile.peak_flops_for("fp32") < bf16
    assert 1e-6 <= profile.kernel_launch_s <= 2e-5


@pytest.mark.parametrize(
    ("name", "bf16_tflops", "hbm_tb_per_s", "mem_gib", "gpu_link_gb_per_s"),
    [
        ("a100-sxm4-80gb", 312, 2.039, 80, 300),
        ("a100-sxm4-40gb", 312, 1.555, 40, 300),
        ("a100-pcie-80gb", 312, 1.935, 80, 31.5),
        ("h100-sxm", 989.4, 3.35, 80, 450),
        ("h100-pcie", 756.5, 2.0, 80, 63),
        ("h200-sxm", 989.4, 4.8, 141, 450),
        ("l40s", 362.05, 0.864, 48, 31.5),
        ("l4", 121, 0.300, 24, 31.5),
        ("rtx-4090", 165.2, 1.008, 24, 31.5),
        ("mi300x", 1307.4, 5.3, 192, 64),  # one 64 GB/s Infinity Fabric link per peer
        ("a40", 149.7, 0.696, 48, 31.5),
    ],
)
def test_datasheet_numbers(
    name: str, bf16_tflops: float, hbm_tb_per_s: float, mem_gib: int, gpu_link_gb_per_s: float
) -> None:
    profile = load_profile(name)
    assert profile.peak_flops["bfloat16"] == pytest.approx(bf16_tflops * 1e12)
    assert profile.peak_flops["float16"] == pytest.approx(bf16_tflops * 1e12)
    assert profile.hbm_bytes_per_s == pytest.approx(hbm_tb_per_s * 1e12)
    assert profile.mem_bytes == mem_gib * 2**30
    assert profile.gpu_link.bandwidth_bytes_per_s == pytest.approx(gpu_link_gb_per_s * 1e9)


def test_ridge_points_are_plausible() -> None:
    """Ridge point = bf16 FLOP/s / memory bytes/s: where decode turns compute-bound."""

    def ridge(name: str) -> float:
        profile = load_profile(name)
        half = "bf16" if "bfloat16" in profile.peak_flops else "fp16"
        return profile.peak_flops_for(half) / profile.hbm_bytes_per_s

    for name in list_profiles():
        assert 50 < ridge(name) < 1000, name
    # same compute, more bandwidth: lower ridge
    assert ridge("h200-sxm") < ridge("h100-sxm")
    assert ridge("a100-sxm4-80gb") < ridge("a100-pcie-80gb") < ridge("a100-sxm4-40gb")
    # GDDR inference cards are far more compute-rich per byte than HBM parts
    assert ridge("l40s") > ridge("h100-sxm") > ridge("a100-sxm4-80gb")
    assert ridge("l4") > ridge("mi300x")


def test_nvlink_beats_pcie_and_host_link() -> None:
    for name in ("a100-sxm4-80gb", "h100-sxm", "h200-sxm"):
        profile = load_profile(name)
        assert profile.gpu_link.bandwidth_bytes_per_s > 5 * profile.host_link.bandwidth_bytes_per_s
    assert (load_profile("h100-sxm").gpu_link.bandwidth_bytes_per_s
            > load_profile("a100-sxm4-80gb").gpu_link.bandwidth_bytes_per_s)  # fmt: skip


def test_mi300x_link_is_one_infinity_fabric_link_per_peer() -> None:
    """The collectives price each step as one GPU sending to one peer; on MI300X's fully
    connected mesh that is one of the 7 links (64 GB/s per direction), not all 7 (448)."""
    profile = load_profile("mi300x")
    assert profile.gpu_link.bandwidth_bytes_per_s == 64e9
    assert 7 * profile.gpu_link.bandwidth_bytes_per_s == 448e9  # the data sheet's aggregate
    # One peer link is about one PCIe 5.0 x16 direction, far below one GPU's NVLink 4 share.
    nvlink_bytes_per_s = load_profile("h200-sxm").gpu_link.bandwidth_bytes_per_s
    assert profile.gpu_link.bandwidth_bytes_per_s < nvlink_bytes_per_s / 5


def test_h200_capacity_is_what_the_gpu_reports() -> None:
    """NVIDIA's "141 GB" is binary: nvidia-smi on an H200 SXM reports 143771 MiB. The profile
    must sit within 1% of that, not 7% below it as 141e9 decimal bytes would."""
    reported_bytes = 143_771 * 2**20
    capacity_bytes = load_profile("h200-sxm").mem_bytes
    assert abs(capacity_bytes / reported_bytes - 1) < 0.01


# ------------------------------------------------------------------ names, aliases, errors


def test_names_are_case_insensitive_and_cached() -> None:
    assert load_profile("H100-SXM") is load_profile("h100-sxm")
    assert load_profile("A100_SXM4_80GB") is load_profile("a100-sxm4-80gb")


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_profile("h100")
    message = str(err.value)
    assert "h100-sxm" in message and "h100-pcie" in message
    assert "built-in profiles" in message and "mi300x" in message
    with pytest.raises(UnknownNameError, match="a100-sxm4-80gb"):
        load_profile("a100-sxm-80gb")


def test_aliases() -> None:
    profile = load_profile("h100-sxm")
    assert profile.peak_flops_for("fp16") == profile.peak_flops["float16"]
    assert profile.peak_flops_for("half") == profile.peak_flops["float16"]
    assert profile.peak_flops_for("BF16") == profile.peak_flops["bfloat16"]
    assert profile.peak_flops_for("torch.bfloat16") == profile.peak_flops["bfloat16"]
    assert profile.peak_flops_for("fp8") == profile.peak_flops["fp8_e4m3"]
    assert profile.peak_flops_for("float8_e5m2") == profile.peak_flops["fp8_e5m2"]
    assert profile.peak_flops_for("TF32") == profile.peak_flops["tf32"]
    assert profile.peak_flops_for("fp32") == profile.peak_flops["float32"]
    with pytest.raises(UnknownNameError, match="dtype"):
        profile.peak_flops_for("fp17")


def test_fp8_on_a100_raises_with_guidance() -> None:
    with pytest.raises(ConfigError) as err:
        load_profile("a100-sxm4-80gb").peak_flops_for("fp8")
    message = str(err.value)
    assert message.startswith("a100-sxm4-80gb has no fp8_e4m3 tensor cores")
    assert "bfloat16" in message and "float16" in message
    for name in FP8_DEVICES:
        assert name in message
    assert "a40" not in message.split("(")[1]
    with pytest.raises(ConfigError, match="a40 has no fp8_e5m2"):
        load_profile("a40").peak_flops_for("fp8_e5m2")
    with pytest.raises(ConfigError, match="float64"):
        load_profile("h100-sxm").peak_flops_for("float64")


def test_efficiency_for() -> None:
    profile = load_profile("a100-sxm4-80gb")
    for key in EFFICIENCY_KEYS:
        assert 0 < profile.efficiency_for(key) <= 1
        assert profile.efficiency_for(key) == profile.efficiency[key]
    with pytest.raises(UnknownNameError, match="matmul_flops"):
        profile.efficiency_for("matmul")


def test_summary_row() -> None:
    row = summary_row(load_profile("h100-sxm"))
    assert row["name"] == "h100-sxm"
    assert row["memory_gib"] == 80.0
    assert row["hbm_tb_per_s"] == 3.35
    assert row["bf16_tflops"] == 989.4
    assert row["fp8_tflops"] == 1978.9
    assert row["gpu_link_gb_per_s"] == 450.0
    assert summary_row(load_profile("a100-sxm4-80gb"))["fp8_tflops"] == "-"


def test_link_alpha_beta() -> None:
    link = Link("nvlink", bandwidth_bytes_per_s=100e9, latency_s=2e-6)
    assert link.transfer_s(0) == 0.0
    assert link.transfer_s(1e9) == pytest.approx(2e-6 + 0.01)
    assert link.transfer_s(1e9, efficiency=0.5) == pytest.approx(2e-6 + 0.02)
    with pytest.raises(ConfigError, match="latency_s"):
        Link("bad", bandwidth_bytes_per_s=1e9, latency_s=-1.0)


def test_profiles_are_hashable_and_comparable() -> None:
    a, b = load_profile("h100-sxm"), load_profile("h200-sxm")
    assert len({a, b, load_profile("h100-sxm")}) == 2
    assert a != b


def test_direct_construction_validates() -> None:
    good = load_profile("l4")
    fields = {f: getattr(good, f) for f in HardwareProfile.__dataclass_fields__}
    with pytest.raises(ConfigError, match="hbm_bytes_per_s"):
        HardwareProfile(**{**fields, "hbm_bytes_per_s": 0.0})
    with pytest.raises(ConfigError, match="efficiency"):
        HardwareProfile(**{**fields, "efficiency": {**good.efficiency, "matmul_flops": 1.5}})
    with pytest.raises(ConfigError, match="bf16"):
        HardwareProfile(**{**fields, "peak_flops": {"bf16": 1e12}})


# ------------------------------------------------------------------ malformed files


def test_file_path_round_trip(tmp_path: Path) -> None:
    data = _base()
    data["name"] = "my-gpu"
    data["memory"]["bandwidth_bytes_per_s"] = 1.0e12
    profile = load_profile(_write(tmp_path, data, "my-gpu.toml"))
    assert profile.name == "my-gpu"
    assert profile.hbm_bytes_per_s == 1.0e12
    assert profile.peak_flops == load_profile("h100-sxm").peak_flops
    assert load_profile(str(tmp_path / "my-gpu.toml")) == profile


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_syntax_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[memory\ncapacity_bytes = 1\n')
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_profile(path)


def _mutated(mutate: Any) -> dict[str, Any]:
    data = copy.deepcopy(_base())
    mutate(data)
    return data


MALFORMED = [
    ("missing field", lambda d: d["memory"].pop("bandwidth_bytes_per_s"),
     r"h100-sxm\.toml: \[memory\] bandwidth_bytes_per_s is missing"),
    ("negative bandwidth", lambda d: d["memory"].update(bandwidth_bytes_per_s=-1),
     r"h100-sxm\.toml: \[memory\] bandwidth_bytes_per_s must be a positive number, got -1"),
    ("zero latency", lambda d: d["links"]["nvlink"].update(latency_s=0.0),
     r"h100-sxm\.toml: \[links\.nvlink\] latency_s must be a positive number"),
    ("efficiency 1.5", lambda d: d["efficiency"].update(matmul_flops=1.5),
     r"h100-sxm\.toml: \[efficiency\] matmul_flops must be a fraction of peak in "
     r"\(0, 1\], got 1\.5"),
    ("unknown dtype key", lambda d: d["compute"]["peak_flops"].update(fp17=1e12),
     r"h100-sxm\.toml: \[compute\.peak_flops\] fp17 is not a known dtype key"),
    ("alias dtype key", lambda d: d["compute"]["peak_flops"].update(bf16=1e12),
     r"\[compute\.peak_flops\] bf16 is not a known dtype key; write it as 'bfloat16'"),
    ("wrong type", lambda d: d["memory"].update(capacity_bytes="80GB"),
     r"h100-sxm\.toml: \[memory\] capacity_bytes must be a positive integer, got '80GB'"),
    ("bool is not a number", lambda d: d["overhead"].update(kernel_launch_s=True),
     r"\[overhead\] kernel_launch_s must be a positive number"),
    ("nan", lambda d: d["compute"]["peak_flops"].update(float16=math.nan),
     r"\[compute\.peak_flops\] float16 must be a positive number"),
    ("empty source", lambda d: d["compute"].update(source=" "),
     r"h100-sxm\.toml: \[compute\] source must be a non-empty string"),
    ("missing source", lambda d: d["links"]["pcie"].pop("source"),
     r"\[links\.pcie\] source is missing"),
    ("typo field", lambda d: d["memory"].update(bandwith_bytes_per_s=1e12),
     r"\[memory\] bandwith_bytes_per_s is not a known field; did you mean bandwidth_bytes_per_s"),
    ("missing efficiency", lambda d: d["efficiency"].pop("attention_flops"),
     r"\[efficiency\] attention_flops is missing"),
    ("dangling gpu_link", lambda d: d.update(gpu_link="nvswitch"),
     r"h100-sxm\.toml: gpu_link names 'nvswitch', which is not a \[links\.\*\] table"),
    ("missing table", lambda d: d.pop("overhead"),
     r"h100-sxm\.toml: overhead is missing"),
    ("empty peak_flops", lambda d: d["compute"].update(peak_flops={}),
     r"\[compute\.peak_flops\] is empty"),
]


@pytest.mark.parametrize(("case", "mutate", "pattern"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, case: str, mutate: Any, pattern: str
) -> None:
    path = _write(tmp_path, _mutated(mutate))
    with pytest.raises(ConfigError, match=pattern):
        load_profile(path)


@settings(max_examples=40, deadline=None)
@given(
    bandwidth=st.floats(allow_nan=False, allow_infinity=False, max_value=0.0),
    efficiency=st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 0 < x <= 1),
)
def test_nonpositive_bandwidth_and_bad_efficiency_always_rejected(
    tmp_path_factory: pytest.TempPathFactory, bandwidth: float, efficiency: float
) -> None:
    tmp_path = tmp_path_factory.mktemp("hw")
    bad_bw = _mutated(lambda d: d["links"]["pcie"].update(bandwidth_bytes_per_s=bandwidth))
    with pytest.raises(ConfigError, match=r"\[links\.pcie\] bandwidth_bytes_per_s"):
        load_profile(_write(tmp_path, bad_bw))
    bad_eff = _mutated(lambda d: d["efficiency"].update(memory_bandwidth=efficiency))
    with pytest.raises(ConfigError, match=r"\[efficiency\] memory_bandwidth"):
        load_profile(_write(tmp_path, bad_eff))


@settings(max_examples=40, deadline=None)
@given(
    bandwidth=st.floats(min_value=1e10, max_value=1e14),
    efficiency=st.floats(min_value=1e-3, max_value=1.0),
)
def test_valid_numbers_round_trip(
    tmp_path_factory: pytest.TempPathFactory, bandwidth: float, efficiency: float
) -> None:
    tmp_path = tmp_path_factory.mktemp("hw")
    data = _mutated(lambda d: d["memory"].update(bandwidth_bytes_per_s=bandwidth))
    data["efficiency"]["gpu_link_bandwidth"] = efficiency
    profile = load_profile(_write(tmp_path, data))
    assert profile.hbm_bytes_per_s == bandwidth
    assert profile.efficiency_for("gpu_link_bandwidth") == efficiency
