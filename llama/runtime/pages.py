# Huge pages for weights: decode reads every weight once per token as one long stream, and with
# 4 KB pages the stream crosses a page (a TLB miss, and a boundary the hardware prefetchers stop
# at) every 4 KB; 2 MB pages remove both. Linux backs anonymous memory with them where madvise
# asks (transparent_hugepage "madvise", the common default) when the pages are first written, so
# a weight is advised right after it is allocated and before it is filled.
import ctypes
import functools
import logging
import mmap
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20
DISABLE_ENV = "LLAMA_NO_HUGE_PAGES"  # set: weights keep the default pages


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for huge pages under the whole 2 MB pages inside CPU tensor `t`'s memory (before it is
    written: pages already present stay as they are). Whether it was asked (False: not Linux, a
    tensor under 2 MB or not on the CPU, or DISABLE_ENV set); never raises."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or os.environ.get(DISABLE_ENV):
        return False
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    if madvise(start, end - start, mmap.MADV_HUGEPAGE) != 0:  # e.g. a kernel without transparent huge pages
        logger.debug("madvise(MADV_HUGEPAGE) refused (errno %d): default pages", ctypes.get_errno())
        return False
    return True


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """`t` moved into memory advised for huge pages (a copy), where advise_huge_pages would ask for
    them; else `t` itself. For tensors made by computation, whose pages were written before any
    advice could come (weights quantized on load: torch's own allocations)."""
    if not t.is_contiguous():
        return t
    out = torch.empty_like(t)
    return out.copy_(t) if advise_huge_pages(out) else t


@functools.lru_cache(maxsize=None)
def _madvise() -> Optional[object]:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
