"""What an export holds: its peak so far, and giving freed heap memory back to the system."""

from __future__ import annotations


def trim_heap() -> None:
    """Give freed heap memory back to the system. The vision tower's tensors (tens of MB each) come from
    malloc's heap once its mmap threshold has risen; freed, they would stay resident under what follows
    (benchmarks/RESULTS.md has the figures)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc; elsewhere nothing to do
        libc.malloc_trim(0)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (the figure an export is held to)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
