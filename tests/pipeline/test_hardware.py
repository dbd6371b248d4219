"""Which CPUs get bfloat16 by default: those whose flags name bf16 matrix units."""

import pytest

from pipeline import hardware


@pytest.mark.parametrize(
    ("flags", "unit"),
    [
        ({"avx2", "avx512f", "amx_bf16", "avx512_bf16"}, "amx_bf16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
        ({"avx2", "fma"}, None),  # an AVX2-only CPU emulates bf16
        (set(), None),  # flags unreadable: float32
    ],
)
def test_bf16_units_come_from_the_cpu_flags(monkeypatch, flags, unit):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.bf16_units() == unit
    assert hardware.cpu_bf16_is_fast() is (unit is not None)


def test_this_machines_flags_are_read():
    flags = hardware.cpu_flags()
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        line = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    assert flags == frozenset(line.split(":", 1)[1].split()) and flags
