"""Hardware profiles: every built-in loads and cites a source for each table; loading refuses
types, NaN/inf and physically implausible numbers, naming the file, the field, the value and the
likely unit mistake (issue 16)."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hardware_profiles import PROFILE_DIR
from sim.core.errors import ConfigError, InfersimError
from sim.timing.hardware import TOPOLOGIES, list_profiles, load_profile

NAMES = list_profiles()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ["\n".join(lines)] if lines else []
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            out.append(f"[{name}]\n" + _to_toml(value, name))
    return "\n\n".join(out)


def _base() -> dict[str, Any]:
    with (PROFILE_DIR / "a100-sxm4-80gb.toml").open("rb") as f:
        return tomllib.load(f)


def _write(tmp_path: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    data = _base()
    mutate(data)
    path = tmp_path / "my-gpu.toml"
    path.write_text(_to_toml(data))
    return path


@pytest.mark.parametrize("name", NAMES)
def test_every_profile_loads_and_every_table_has_a_source(name: str) -> None:
    profile = load_profile(name)
    with (PROFILE_DIR / f"{name}.toml").open("rb") as f:
        raw = tomllib.load(f)
    tables = [k for k, v in raw.items() if isinstance(v, dict) and k != "links"]
    tables += [f"links.{k}" for k in raw["links"]]
    for table in tables:
        assert profile.sources[table].strip(), f"{name}: [{table}] has no source"
    assert profile.collectives is not None and profile.collectives.source
    assert profile.gpu_link.topology in TOPOLOGIES
    # every assumed number says so: an efficiency or collectives source that is not fitted
    # names what it assumed
    for table in ("efficiency", "collectives"):
        text = profile.sources[table]
        assert "fitted" in text or "assumed" in text or "carried over" in text, (name, table)


def test_every_link_numbers_come_the_same_way() -> None:
    """The NVSwitch profiles share the A100 fit (or are it); nothing claims a fit it lacks."""
    a100 = load_profile("a100-sxm4-80gb")
    for name in NAMES:
        p = load_profile(name)
        if p.gpu_link.topology == "switch" and p.vendor == "nvidia":
            assert p.gpu_link.latency_s == a100.gpu_link.latency_s, name
            assert p.efficiency["gpu_link_bandwidth"] == a100.efficiency["gpu_link_bandwidth"]
            assert ("fitted" in p.gpu_link.source or "carried over" in p.gpu_link.source), name


def test_mi300x_and_h200_documented() -> None:
    mi = load_profile("mi300x")
    assert mi.gpu_link.bandwidth_bytes_per_s == 64e9 and mi.gpu_link.topology == "mesh"
    assert "64 GB/s" in mi.gpu_link.source
    h200 = load_profile("h200-sxm")
    assert h200.mem_bytes == 141 * 2**30 and "143771 MiB" in h200.sources["memory"]


@pytest.mark.parametrize(("mutate", "field", "likely"), [
    (lambda d: d["memory"].update(bandwidth_bytes_per_s=2.039e3),
     r"\[memory\] bandwidth_bytes_per_s = 2039.0", "TB/s or GB/s written as bytes/s"),
    (lambda d: d["memory"].update(capacity_bytes=2**63 - 1),
     r"\[memory\] capacity_bytes = 9223372036854775807", "2\\*\\*63-1"),
    (lambda d: d["memory"].update(capacity_bytes=80),
     r"\[memory\] capacity_bytes = 80", "GB or GiB written as bytes"),
    (lambda d: d["compute"]["peak_flops"].update(float16=312.0),
     r"\[compute.peak_flops\] float16 = 312.0", "TFLOP/s written as FLOP/s"),
    (lambda d: d["links"]["nvlink"].update(bandwidth_bytes_per_s=300.0),
     r"\[links.nvlink\] bandwidth_bytes_per_s = 300.0", "GB/s written as bytes/s"),
    (lambda d: d["links"]["nvlink"].update(latency_s=2.0),
     r"\[links.nvlink\] latency_s = 2.0", "microseconds written as seconds"),
    (lambda d: d["overhead"].update(kernel_launch_s=4.0),
     r"\[overhead\] kernel_launch_s = 4.0", "microseconds written as seconds"),
    (lambda d: d["collectives"].update(nccl_eager_call_s=39.5),
     r"\[collectives\] nccl_eager_call_s = 39.5", "microseconds written as seconds"),
    (lambda d: d["compute"].update(tdp_w=400000.0),
     r"\[compute\] tdp_w = 400000.0", "milliwatts"),
])
def test_unit_mistakes_are_named(tmp_path: Path, mutate: Callable[[dict[str, Any]], None],
                                 field: str, likely: str) -> None:
    with pytest.raises(InfersimError, match=rf"my-gpu\.toml: {field}.*{likely}.*fix"):
        load_profile(_write(tmp_path, mutate))


@pytest.mark.parametrize(("mutate", "pattern"), [
    (lambda d: d["memory"].update(bandwidth_bytes_per_s=math.nan),
     r"\[memory\] bandwidth_bytes_per_s must be a positive number, got nan"),
    (lambda d: d["memory"].update(bandwidth_bytes_per_s=math.inf),
     r"\[memory\] bandwidth_bytes_per_s must be a positive number, got inf"),
    (lambda d: d["efficiency"].update(matmul_flops=73.0),
     r"\[efficiency\] matmul_flops must be a fraction of peak in \(0, 1\], got 73.0; "
     r"a percentage\? write 0.73"),
    (lambda d: d["efficiency"].update(matmul_flops=0.0), r"\[efficiency\] matmul_flops must be a fraction"),
    (lambda d: d["efficiency"].update(gpu_link_bandwidth=math.nan),
     r"\[efficiency\] gpu_link_bandwidth must be a fraction"),
    (lambda d: d["collectives"].update(nccl_graph_call_s=-1e-6),
     r"\[collectives\] nccl_graph_call_s must be a finite number of seconds >= 0"),
    (lambda d: d["collectives"].update(custom_all_reduce_call_s="3us"),
     r"\[collectives\] custom_all_reduce_call_s must be a finite number of seconds >= 0, got '3us'"),
    (lambda d: d["links"]["nvlink"].update(topology="nvswitch"),
     r"\[links.nvlink\] topology = 'nvswitch' is not a topology"),
    (lambda d: d["links"]["nvlink"].pop("topology"), r"\[links.nvlink\] topology is missing"),
    (lambda d: d.pop("collectives"), r"collectives is missing"),
    (lambda d: d["collectives"].update(nccl_launch_s=1e-6),
     r"\[collectives\] nccl_launch_s is not a known field"),
])
def test_bad_values_are_refused(tmp_path: Path, mutate: Callable[[dict[str, Any]], None],
                                pattern: str) -> None:
    with pytest.raises(ConfigError, match=rf"my-gpu\.toml: {pattern}"):
        load_profile(_write(tmp_path, mutate))


def test_zero_call_costs_are_allowed(tmp_path: Path) -> None:
    def zero(d: dict[str, Any]) -> None:
        d["collectives"].update(nccl_graph_call_s=0.0, custom_all_reduce_call_s=0.0)
    profile = load_profile(_write(tmp_path, zero))
    assert profile.collectives is not None and profile.collectives.nccl_graph_call_s == 0.0
