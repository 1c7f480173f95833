"""divrl.heap: freed memory kept in the heap, where it serves the next tensor that fits in it."""

import platform
import subprocess
import sys

import pytest

from divrl import heap
from divrl.config import build_config

PROBE = """
import resource, sys, torch
from divrl import heap
applied = heap.keep_freed_memory() if sys.argv[1] == "keep" else None
resident = lambda: int(open("/proc/self/statm").read().split()[1])  # pages
released, faults = [], []
for _ in range(3):
    tensor = torch.zeros(49152, 576)  # 113 MB, 27,648 pages
    before = resident()
    del tensor
    released.append(before - resident())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(49152 - 1024, 576)  # the next large tensor, one that fits in the freed block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(released), max(faults))
"""


def freed_memory(mode: str) -> tuple[str, int, int]:
    """(whether the setting applied, pages handed back at a 113 MB tensor's free, page faults of the
    next large tensor), in a fresh process (the setting is process-wide)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, released, faults = out.split()
    return applied, int(released), int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux", reason="glibc on Linux only")
def test_freed_memory_stays_and_serves_the_next_tensor_that_fits():
    """By default a 113 MB tensor's pages go back to the system at its free and the next large tensor
    faults its pages in anew; with freed memory kept, none go back and the next tensor that fits
    faults none."""
    _, released, faults = freed_memory("default")
    assert released > 20_000 and faults > 20_000, (released, faults)
    applied, released, faults = freed_memory("keep")
    assert applied == "True"
    assert released < 100 and faults < 100, (released, faults)


def test_it_is_on_by_default_and_can_be_turned_off():
    assert build_config(None, []).keep_freed_memory is True
    assert build_config(None, ["keep_freed_memory=false"]).keep_freed_memory is False


def test_the_trainer_keeps_freed_memory_on_the_cpu_only_when_asked(tmp_path, monkeypatch):
    from divrl.trainer import Trainer
    from test_trainer import tiny_cfg

    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append(1) or True)
    for keep in (True, False):
        Trainer(tiny_cfg(tmp_path / str(keep), "device=cpu", f"keep_freed_memory={keep}"), log=lambda *_: None)
    assert calls == [1]
