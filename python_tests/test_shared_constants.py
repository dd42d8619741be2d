"""Constants written both in C++ (csrc/) and in Python have the same value.

The C++ copies exist because device code and the torch bindings cannot import Python;
this test reads the header text, so a change on one side without the other fails here
(no build needed). Each failure names the constant.
"""
import re
from pathlib import Path

import pytest

from tidar_kernels.kernels import roofline
from tidar_kernels.kernels.mask import Layout, TileKind
from tidar_kernels.kernels.validation import MAX_PAGE_SIZE

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# (header, C++ constant) -> the Python value it mirrors
CONSTANTS = {
    ("bindings_common.h", "kMaxPageSize"): MAX_PAGE_SIZE,
    ("bindings_common.h", "kLayoutDecode"): int(Layout.DECODE),
    ("roofline.h", "kWarpsForPeak"): roofline.WARPS_FOR_PEAK,
    ("roofline.h", "kRegistersPerSm"): roofline.REGISTERS_PER_SM,
    ("roofline.h", "kRegistersPerThread"): roofline.REGISTERS_PER_THREAD,
    ("roofline.h", "kSmemReservedPerCta"): roofline.SMEM_RESERVED_PER_CTA,
    ("roofline.h", "kMaxCtasPerSm"): roofline.MAX_CTAS_PER_SM,
    ("roofline.h", "kFp32Bytes"): roofline.FP32_BYTES,
    ("roofline.h", "kPartialSlack"): roofline.PARTIAL_SLACK,
}
# C++ enum -> the Python enum it mirrors (every member, by value)
ENUMS = {("tidar_mask.h", "Layout"): Layout, ("tidar_mask.h", "TileKind"): TileKind}
# roofline.h Device{tensor_flops, hbm_bytes_per_s, sm_count, smem_per_sm} -> roofline.py's Device
DEVICES = {"kH100": roofline.H100, "kH200": roofline.H200, "kA100": roofline.A100}


def _evaluate(expression: str, where: str):
    if not re.fullmatch(r"[0-9eE.+\-*/() ]+", expression):
        pytest.fail(f"{where}: cannot read the value {expression!r}")
    return eval(expression)  # digits and arithmetic only, checked above


def constant(header: str, name: str, root: Path = CSRC):
    text = (root / header).read_text()
    found = re.findall(rf"constexpr\s+[\w:]+\s+{name}\s*=\s*([^;]+);", text)
    assert len(found) == 1, f"{name}: expected one definition in csrc/{header}, found {len(found)}"
    return _evaluate(found[0], f"csrc/{header} {name}")


@pytest.mark.parametrize("header,name", list(CONSTANTS), ids=[name for _, name in CONSTANTS])
def test_cpp_constant_matches_python(header, name):
    assert constant(header, name) == CONSTANTS[header, name], \
        f"{name} in csrc/{header} differs from its Python twin {CONSTANTS[header, name]!r}"


@pytest.mark.parametrize("header,name", list(ENUMS), ids=[name for _, name in ENUMS])
def test_cpp_enum_matches_python(header, name):
    body = re.search(rf"enum class {name}\s*:\s*\w+\s*\{{([^}}]*)\}}", (CSRC / header).read_text())
    assert body, f"enum {name} not found in csrc/{header}"
    members = dict(re.findall(r"k(\w+)\s*=\s*(\d+)", body.group(1)))
    python = ENUMS[header, name]
    want = {member.name.lower(): member.value for member in python}
    got = {key.lower(): int(value) for key, value in members.items()}
    assert got == want, f"enum {name} in csrc/{header} is {got}, {python.__name__} in Python is {want}"


@pytest.mark.parametrize("name", list(DEVICES))
def test_cpp_device_figures_match_python(name):
    found = re.findall(rf"Device\s+{name}\{{([^}}]*)\}};", (CSRC / "roofline.h").read_text())
    assert len(found) == 1, f"{name}: expected one definition in csrc/roofline.h"
    flops, hbm, sms, smem = (_evaluate(part, f"csrc/roofline.h {name}") for part in found[0].split(","))
    device = DEVICES[name]
    assert (flops, hbm, sms, smem) == (device.tensor_flops, device.hbm_bytes_per_s, device.sm_count,
                                       device.smem_per_sm), f"{name} in csrc/roofline.h differs from {device}"


def test_an_edited_constant_is_read(tmp_path):
    """The reader takes the value from the header text: an edited copy reads differently."""
    (tmp_path / "bindings_common.h").write_text("constexpr int64_t kMaxPageSize = 512;  // edited\n")
    assert constant("bindings_common.h", "kMaxPageSize", root=tmp_path) == 512 != MAX_PAGE_SIZE
