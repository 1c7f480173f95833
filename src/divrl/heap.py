"""Keep the memory a CPU training process frees in its heap, for the next step's tensors (glibc).

glibc serves an allocation above its mmap threshold (128 KiB, raised as large blocks are freed, to
32 MiB at most) with fresh pages from the kernel and unmaps them at free, so every step's large
tensors (the 49152 × 576 float32 gradients of SmolLM2-135M's embedding and output head, 113 MB
each, the bf16 casts of its weights, activations) fault their pages in again, one kernel trap and
page clear a 4 KiB page. Measured on a 2-core AVX512-BF16 EPYC (the GRPO benchmark's divrl side,
bf16 autocast, steps 3-8 of 8): 125k-166k page faults a step by default, 0.3k-24k with freed memory
kept; in four interleaved pairs of runs, faster in each pair by 1.2-3.6% (medians 5.88, 5.86, 4.94
and 4.86 s a step against 6.05, 6.08, 5.03 and 4.92; the VM's speed drifted between the pairs), peak
RSS within 0.1 GB either way. An earlier session's runs, with `mallopt` at start, found no
consistent gain (README, Performance notes); these four pairs did.

`keep_freed_memory` sets glibc's M_MMAP_MAX to 0 (no allocation gets pages of its own: all come
from the heap) and M_TRIM_THRESHOLD to 2 GiB (the heap's free top is not handed back until it
exceeds that): what PyTorch's CPU performance guide gets by preloading jemalloc or tcmalloc, here
without a preloaded library. A freed block then serves the next tensor that fits in it.

The cost: the heap grows faster as a run goes on. PyTorch asks for 64-byte-aligned memory, and
glibc 2.36's aligned allocation asks its heap for about 100 bytes more than the block it hands
out, so a tensor of the same size as one just freed does not fit in the hole that one left once a
small allocation sits behind it, and the heap grows instead. Measured (the GRPO benchmark's divrl
side, 30 steps, the same trajectory both ways): RSS 4.26 → 6.44 GB with freed memory kept, 4.16
→ 5.67 GB without; glibc's free heap memory 1.64 → 3.36 GB against 1.54 → 2.58 GB. The gain, an
hour later on the same VM (seed 2, 20 steps): 6.81 s a step without against 5.74 with, where
TRL's step had slowed 5%. `malloc_trim` after every step held the RSS at 2.6–3.1 GB between
steps (peak 5.64 GB) but cost 9% of the step (6.32 against 5.81 s). On by default, for speed;
config key `keep_freed_memory: false` for long runs where memory binds.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap from now on (see the module docstring); False,
    changing nothing, where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
