"""--output-file: size-based rotation, nothing lost, nothing held in memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from xfrmtrace.errors import InputError
from xfrmtrace.output.rotating import RotatingFile


def _lines(n: int, start: int = 0) -> list[str]:
    return [f'{{"type":"xfrm_error","n":{i}}}\n' for i in range(start, start + n)]


def _files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def test_rotation_keeps_whole_lines_in_order_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    out = RotatingFile(path, max_bytes=1000, keep=3)
    written = _lines(500)
    for line in written:
        out.write(line)
    out.close()
    files = [path.with_name(f"{path.name}.{n}") for n in (3, 2, 1)] + [path]
    assert _files(path) == sorted(files)  # PATH and exactly 3 older files
    assert all(f.stat().st_size <= 1000 for f in files)
    kept = "".join(f.read_text() for f in files).splitlines(keepends=True)
    assert kept == written[-len(kept):]  # the newest lines, in order, none split
    assert out.rotations > 3


def test_restart_appends_to_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    first = RotatingFile(path, max_bytes=10_000, keep=2)
    first.write("one\n")
    first.close()
    second = RotatingFile(path, max_bytes=10_000, keep=2)
    second.write("two\n")
    second.close()
    assert path.read_text() == "one\ntwo\n"


def test_keep_zero_and_an_oversized_line(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    out = RotatingFile(path, max_bytes=10, keep=0)
    out.write("x" * 25 + "\n")  # alone in its file
    out.write("short\n")
    out.close()
    assert _files(path) == [path] and path.read_text() == "short\n"


def test_memory_stays_flat_over_many_rotations(tmp_path: Path) -> None:
    """A day of events at a tiny size limit: memory does not grow with what was written."""
    out = RotatingFile(tmp_path / "events.log", max_bytes=4096, keep=2)
    for line in _lines(2000):
        out.write(line)
    more = _lines(50_000, start=2000)  # made before measuring: only the writer is measured
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for line in more:
        out.write(line)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out.close()
    assert out.rotations > 300
    assert current - base < 64 * 1024 and peak - base < 256 * 1024, (base, current, peak)


def test_unwritable_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write .*/missing/events.log"):
        RotatingFile(tmp_path / "missing" / "events.log", max_bytes=100, keep=1)
