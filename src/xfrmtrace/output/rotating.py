"""``--output-file``: events go to a file that is rotated by size, for runs of days.

``PATH`` is the file being written; when the next line would take it past the size limit,
``PATH.1`` becomes ``PATH.2`` and so on, the oldest beyond ``keep`` is deleted, and ``PATH``
becomes ``PATH.1``.  Lines are never split between files (a single line longer than the
limit gets a file of its own).  A restarted tool appends to ``PATH``.  Nothing is kept in
memory between writes, so a day of events costs disk, bounded by ``(keep + 1) * limit``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from xfrmtrace.errors import InputError


class RotatingFile:
    """A minimal text stream (write/flush/close) over a size-rotated file."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        if max_bytes <= 0:
            raise InputError("--output-file-size must be positive")
        self.path = path
        self._max_bytes = max_bytes
        self._keep = keep
        self.rotations = 0
        self._stream = self._open()
        self._size = self._stream.tell()

    def _open(self) -> TextIO:
        try:
            return open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise InputError(f"cannot write {self.path}: {err.strerror}") from None

    def write(self, text: str) -> int:
        size = len(text.encode("utf-8"))
        if self._size and self._size + size > self._max_bytes:
            self._rotate()
        self._stream.write(text)
        self._size += size
        return len(text)

    def _rotate(self) -> None:
        self._stream.close()
        older = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self._keep + 1)]
        try:
            if self._keep == 0:
                os.unlink(self.path)
            else:
                older[self._keep].unlink(missing_ok=True)
                for n in range(self._keep - 1, 0, -1):
                    if older[n].exists():
                        os.replace(older[n], older[n + 1])
                os.replace(self.path, older[1])
        except OSError as err:
            raise InputError(f"cannot rotate {self.path}: {err.strerror}") from None
        self._stream = self._open()
        self._size = 0
        self.rotations += 1

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()
