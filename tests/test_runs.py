import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The fewest page faults taken by one of several 64 MB CPU tensors (16,384 pages each), made and freed one
# after another: by default glibc maps every block this large afresh; kept, the heap settles after a few.
PROBE = """
import resource, sys, torch
from runs import keep_freed_host_memory
took = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults[5:]))
"""


def faults_on_reuse(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def huge_pages_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
@pytest.mark.skipif(huge_pages_always(), reason="2 MB pages: a fresh block takes too few faults to tell apart")
def test_keep_freed_host_memory_reuses_large_blocks_without_page_faults():
    took, kept = faults_on_reuse("keep")
    assert took == "True"
    _, default = faults_on_reuse("default")
    assert default > 4000, "the default allocator should fault on every page of a fresh 64 MB block"
    assert kept < 1000
