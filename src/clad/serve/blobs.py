"""Content-addressed files: ``ROOT/ab/<sha256>.<ext>``, named by the sha256 of their bytes.

The same bytes are stored once whatever the number of rows naming them; a file is written under a temporary name
and renamed into place, so a crash never leaves half a file under a final name. Names come from digests only,
never from a request.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{64}$")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Files under ``root`` named by their sha256."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str, ext: str) -> Path:
        if not _SHA.match(digest) or not _EXT.match(ext):
            raise ValueError(f"not a stored file's name: {digest!r}.{ext!r}")
        return self.root / digest[:2] / f"{digest}.{ext}"

    def put(self, data: bytes, ext: str, digest: str | None = None) -> str:
        """Store ``data`` (once); returns its sha256."""
        digest = digest or sha256(data)
        path = self.path(digest, ext)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{digest}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str, ext: str) -> bytes | None:
        try:
            return self.path(digest, ext).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, digest: str, ext: str) -> bool:
        try:
            self.path(digest, ext).unlink()
            return True
        except FileNotFoundError:
            return False
