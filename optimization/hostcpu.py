"""Keep the host's matrix engine (Intel AMX) out of the latency EdgeOpt measures.

Host latency is there to compare techniques for an edge board, and those boards have SIMD
dot-product units (NEON, SDOT) but no matrix engine. On an AMX host XNNPACK (LiteRT) runs
INT8 convolutions on AMX tiles 16 rows by 64 channels: on a thin network most of each tile
is padding, and keras.applications MobileNetV2 (alpha 0.35, 32x32) measured 0.8x FP32's
speed in INT8 on AMX against 1.43x on the AVX-512 VNNI kernels; onnxruntime's INT8 runs were
the same either way. Linux grants AMX only to a process that asks for it (arch_prctl
ARCH_REQ_XCOMP_PERM); XNNPACK and onnxruntime's MLAS fall back to their VNNI kernels when the
request fails. `keep_matrix_engine_out` makes it fail for this process and its children with
a seccomp filter, before either runtime is loaded; nothing else is filtered.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import struct
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ARCH_REQ_XCOMP_PERM = 0x1023
SYS_ARCH_PRCTL = 158  # x86-64
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, EPERM = 0x7FFF0000, 0x00050000, 1

_status: str | None = None


def keep_matrix_engine_out() -> str:
    """Deny AMX to this process (once); returns what happened, for reports:
    "kept out", "none on this host" or "in use (<why it could not be kept out>)"."""
    global _status
    if _status is None:
        _status = _deny_amx()
        if _status.startswith("in use"):
            logger.warning("host latency may use AMX kernels: %s", _status)
    return _status


def _deny_amx() -> str:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "none on this host"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if "amx_tile" not in flags:
        return "none on this host"
    program = b"".join([
        _statement(BPF_LD_W_ABS, 4), _jump_if(AUDIT_ARCH_X86_64, 0, 5),    # arch
        _statement(BPF_LD_W_ABS, 0), _jump_if(SYS_ARCH_PRCTL, 0, 3),       # syscall number
        _statement(BPF_LD_W_ABS, 16), _jump_if(ARCH_REQ_XCOMP_PERM, 0, 1),  # low half of args[0]
        _statement(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM),
        _statement(BPF_RET_K, SECCOMP_RET_ALLOW),
    ])

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(instructions))
    libc = ctypes.CDLL(None, use_errno=True)
    # a filter may only be installed by a process that gives up gaining privileges (setuid)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"in use (seccomp filter refused: errno {ctypes.get_errno()})"
    return "kept out"


def _statement(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k)


def _jump_if(k: int, jump_true: int, jump_false: int) -> bytes:
    return struct.pack("HBBI", BPF_JEQ_K, jump_true, jump_false, k)
