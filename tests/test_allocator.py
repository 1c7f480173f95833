"""`keep_freed_memory`: freed blocks stay in the process for reuse (glibc), and the trainer sets
it unless the config says not to."""

import subprocess
import sys
import textwrap

import pytest

from divrl import allocator

FREE_64MB = textwrap.dedent(
    """
    import os, sys
    import torch
    from divrl.allocator import keep_freed_memory

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    block = torch.ones(16 * 2**20)  # 64 MB, touched
    held = rss()
    del block
    print((held - rss()) / 2**20)
    """
)


def returned_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREE_64MB, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_stays_in_the_process_only_when_kept():
    assert returned_mb("system") > 60  # glibc gives a 64 MB block back to the kernel at free
    assert returned_mb("keep") < 4  # kept for the next allocation


def test_the_trainer_keeps_freed_memory_unless_told_not_to(tmp_path, monkeypatch):
    from divrl.config import build_config
    from divrl.trainer import Trainer

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    args = ["model=tiny", "steps=1", "eval_size=2", "train_size=20", "max_new_tokens=4"]
    Trainer(build_config(None, [*args, f"output_dir={tmp_path / 'a'}"]), log=lambda *_: None)
    Trainer(build_config(None, [*args, f"output_dir={tmp_path / 'b'}", "keep_freed_memory=false"]), log=lambda *_: None)
    assert calls == [1]
