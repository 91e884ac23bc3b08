"""Keep freed memory in the process, so that a timing does not depend on what the allocator did before it.

glibc's malloc gives memory back to the system: a large block is served by ``mmap`` and unmapped when freed, and
free space at the top of the heap is trimmed once it exceeds ``M_TRIM_THRESHOLD``. The next large tensor then
touches fresh pages, one page fault each (the kernel zeroes the page). Which call pays depends on every allocation
the process made before it, not on the call: on SmolLM2-135M at 512 tokens, one thread, the same dense forward took
about 1.2 thousand minor page faults in one process and 73 thousand in another (1.19 s against 1.31 s), and a
nothing-filtered forward beside the first took 17 thousand. A comparison of two methods in one process then measures
the allocator's history as much as the methods.

``keep_freed_memory`` sets glibc's thresholds so that freed memory stays in the heap for the next tensor
(``M_MMAP_THRESHOLD`` at its ceiling, so blocks up to 32 MiB come from the heap, and ``M_TRIM_THRESHOLD`` out of
reach), what jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends, do by design. It changes how much
memory the process keeps, not what it computes; the timing benchmark applies it to every method alike (``--malloc``),
the memory benchmark never (each of its trials is a process of its own, measured as a user would run it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim in practice
KEPT = (
    f"glibc malloc keeps freed memory (M_MMAP_THRESHOLD {MMAP_THRESHOLD_MAX // 2**20} MiB, M_TRIM_THRESHOLD "
    f"{TRIM_THRESHOLD // 2**30 + 1} GiB), for every method alike"
)
SYSTEM = "the system allocator as configured (glibc: its defaults return freed memory to the system)"


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version, libc.mallopt  # noqa: B018  (glibc's own: absent from musl and others)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str | None:
    """Ask glibc's malloc to keep freed memory for reuse (see the module docstring). Returns None when done, else one
    sentence saying why it could not be (not Linux with glibc, or glibc refused a value)."""
    libc = _glibc()
    if libc is None:
        return "the C library is not glibc, so its allocator was left as it is"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc refused the malloc thresholds, so its allocator was left as it is"
    return None


def apply_setting(setting: str) -> str:
    """``--malloc``: ``keep`` (``keep_freed_memory``) or ``system``; returns what the allocator does, for the report."""
    if setting == "system":
        return SYSTEM
    if setting != "keep":
        raise ValueError(f"--malloc is keep or system, got {setting!r}.")
    why_not = keep_freed_memory()
    return KEPT if why_not is None else f"{SYSTEM}: {why_not}"
