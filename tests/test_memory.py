"""keep_freed_memory: glibc serves and keeps big blocks from the heap instead of mmap/munmap per allocation."""
import json
import subprocess
import sys

import pytest

from nnunet_topomae.utils.memory import _libc

PROBE = r"""
import ctypes, json, sys
from nnunet_topomae.utils.memory import _libc, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _libc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20
out = {"set": keep_freed_memory() if sys.argv[1] == "keep" else None}
p = libc.malloc(size)
out["mmapped_while_held"] = libc.mallinfo2().hblkhd
libc.free(p)
out["free_in_heap_after_free"] = libc.mallinfo2().fordblks
print(json.dumps(out))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    libc = _libc()
    return libc is not None and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2); elsewhere keep_freed_memory is a no-op")
def test_big_blocks_come_from_the_heap_and_stay_there():
    size = 64 * 2 ** 20
    default = _probe("default")
    kept = _probe("keep")
    assert default["mmapped_while_held"] >= size          # glibc's default: a block this big is its own mmap
    assert default["free_in_heap_after_free"] < size      # ... and goes back to the kernel on free
    assert kept["set"] is True
    assert kept["mmapped_while_held"] < size              # now served from the heap
    assert kept["free_in_heap_after_free"] >= size        # and kept for the next step's allocation


def test_no_mallopt_is_a_no_op(monkeypatch):
    import nnunet_topomae.utils.memory as memory
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert memory.keep_freed_memory() is False
