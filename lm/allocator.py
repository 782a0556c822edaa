"""Keep freed memory in the process on Linux, so that CPU training does not page-fault every step."""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Have glibc serve and keep blocks up to `limit_bytes` in its heap instead of mmap/munmap.

    PyTorch's CPU allocator has no cache: the logits, their gradient and the weight gradients
    (megabytes each) are freed and allocated again every step. By default glibc hands such blocks
    back to the kernel, and their pages fault in again on first touch, which cost 10-20% of a
    small-model training step here. The PyTorch CPU tuning guide's cure is jemalloc or tcmalloc
    via LD_PRELOAD; this is the same effect with the C library already loaded. Returns whether
    it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes) and libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes)
        )
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
