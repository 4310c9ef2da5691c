# Handing memory back to the system while weights are loaded: dropping the resident pages of a
# memory-mapped checkpoint once copied, and the heap's freed chunks once a tensor is quantized.
# Both only lower resident memory; a failure costs memory, never correctness.
import ctypes
import sys
from typing import Optional

MADV_DONTNEED = 4  # Linux
_LIBC: Optional[ctypes.CDLL] = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC


def madvise_dontneed(addr: int, length: int) -> None:
    """madvise(MADV_DONTNEED) on [addr, addr + length): on a private file mapping the pages are
    forgotten (the data stays in the file); on ordinary memory it would destroy data."""
    _libc().madvise(addr, length, MADV_DONTNEED)


def release_freed_memory() -> None:
    """Hand the memory freed since the last call back to the system (glibc's malloc_trim; a no-op
    elsewhere).

    glibc keeps freed chunks below its mmap threshold (which rises to 32 MB, the size of the
    quantizing temporaries, once such a chunk is freed) in its heap, where they stay resident
    until reused; quantizing or packing a model tensor by tensor frees such chunks for every one,
    so without this the peak grows by their debris (0.4 GB over the 1B's int4 packing)."""
    if sys.platform.startswith("linux"):
        trim = getattr(_libc(), "malloc_trim", None)  # glibc only (not musl)
        if trim is not None:
            trim(0)
