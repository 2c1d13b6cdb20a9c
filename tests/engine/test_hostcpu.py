"""Host latency is measured without Intel AMX, the matrix engine no edge board has: once the
process is prepared (the test session is, as the worker is), a request for AMX fails in this
process (and where the host has no AMX, nothing is filtered)."""
from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import pytest

from optimization.hostcpu import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, keep_matrix_engine_out

XFEATURE_XTILEDATA = 18


def host_has_amx() -> bool:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    return "amx_tile" in Path("/proc/cpuinfo").read_text().split()


@pytest.mark.skipif(not host_has_amx(), reason="this host has no AMX to keep out")
def test_a_request_for_amx_tiles_is_refused_once_the_process_is_prepared():
    assert keep_matrix_engine_out() == "kept out"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == -1
    assert ctypes.get_errno() == 1  # EPERM, which XNNPACK and MLAS answer with their VNNI kernels


@pytest.mark.skipif(host_has_amx(), reason="this host has AMX")
def test_without_amx_nothing_is_filtered():
    assert keep_matrix_engine_out() == "none on this host"
