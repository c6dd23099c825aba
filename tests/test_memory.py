"""dvlp_common.memory: freed host memory stays with the process for reuse (no per-step page faults on CPU)."""
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import os, sys
import torch
from dvlp_common.memory import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

applied = keep_freed_memory() if sys.argv[1] == "reuse" else False
x = torch.ones(64 * 2 ** 20)  # 256 MB, touched
peak = rss_mb()
del x
print(applied, peak - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_large_blocks_stay_resident_only_when_reuse_is_on(tmp_path):
    def run(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        applied, released = out.stdout.split()
        return applied == "True", float(released)

    applied, released = run("reuse")
    assert applied
    assert released < 16  # the 256 MB block stays in the heap, ready for the next step
    applied, released = run("system")
    assert not applied
    assert released > 200  # glibc's default: a block this large is unmapped on free


def test_system_setting_leaves_malloc_alone(monkeypatch):
    from dvlp_common import memory

    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("DVLP_MALLOC", "system")
    assert memory.keep_freed_memory() is False
    monkeypatch.setattr(memory, "_applied", None)  # the next process-level call decides again
