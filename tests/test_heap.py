"""divrl.heap: freed memory kept in the heap, so a large tensor made again reuses its pages."""

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
faults = []
for _ in range(10):  # a 113 MB tensor made and freed; the heap settles within a few rounds
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(49152, 576)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[-3:]))
"""


def faults_of_a_tensor_made_again(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_large_tensor_made_again_reuses_its_pages():
    """By default each 113 MB tensor faults its 27,648 pages in again; with freed memory kept, the
    pages are the heap's already once it has settled (a fresh process each: the setting is
    process-wide)."""
    _, default = faults_of_a_tensor_made_again("default")
    applied, kept = faults_of_a_tensor_made_again("keep")
    assert applied == "True"
    assert default > 20_000 and kept < 1_000, (default, kept)


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
