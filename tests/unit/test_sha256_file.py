"""``sha256_file``: the one file-hashing loop (bundle cache, boot's baked config, benches)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from agent.host.files import sha256_file


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_hash_size_and_copy_are_those_of_the_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    out = io.BytesIO()
    assert sha256_file(p, chunk=4096) == (hashlib.sha256(data).hexdigest(), size)
    assert sha256_file(p, chunk=4096, copy_to=out) == (hashlib.sha256(data).hexdigest(), size)
    assert out.getvalue() == data
