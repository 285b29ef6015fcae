"""Small file helpers shared by the trainers and the commands."""
from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (images and checkpoints can be larger than memory wants)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
