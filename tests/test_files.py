"""flystage.files: whole files or none, no replacing without force, formula-safe CSV, PNG bytes."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from flystage.errors import FlystageError
from flystage.files import (
    CsvWriter,
    OutputExistsError,
    atomic_path,
    atomic_write,
    csv_safe,
    csv_unsafe,
    open_new,
    png_bytes,
    rename_no_replace,
    unwritable_reason,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_writes_text_and_bytes(tmp_path: Path):
    with atomic_write(tmp_path / "sub" / "a.txt") as f:
        f.write("café\n")
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "café\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_atomic_write_refuses_an_existing_file_without_force(tmp_path: Path):
    path = tmp_path / "out.csv"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(FileExistsError, match="out.csv already exists; choose another name or"):
        with atomic_write(path, force=False) as f:
            f.write("new")
    assert path.read_text(encoding="utf-8") == "old"
    # A command lets it reach cli.main, which prints its message: the user's to mend.
    with pytest.raises(OutputExistsError):
        with atomic_write(path, force=False) as f:
            f.write("new")
    assert issubclass(OutputExistsError, FlystageError)
    with atomic_write(path, force=True) as f:
        f.write("new")
    assert path.read_text(encoding="utf-8") == "new"
    assert leftovers(tmp_path) == []


def test_atomic_write_refuses_a_file_that_appears_while_writing(tmp_path: Path):
    path = tmp_path / "out.json"
    with pytest.raises(OutputExistsError, match="it is never replaced"):
        with atomic_write(path, force=False, hint="it is never replaced") as f:
            f.write("mine")
            path.write_text("theirs", encoding="utf-8")  # another writer got there first
    assert path.read_text(encoding="utf-8") == "theirs"
    assert leftovers(tmp_path) == []


def test_a_failure_half_way_leaves_neither_the_file_nor_a_temporary_one(tmp_path: Path):
    path = tmp_path / "report.json"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert not path.exists() and leftovers(tmp_path) == []
    # An old file stays as it was.
    path.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("crash")
    assert path.read_text(encoding="utf-8") == "old" and leftovers(tmp_path) == []


def test_atomic_path_moves_what_a_library_wrote_by_name(tmp_path: Path):
    path = tmp_path / "model.onnx"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.")
        tmp.write_bytes(b"graph")
        assert not path.exists()  # nothing under the real name until the block ends
    assert path.read_bytes() == b"graph" and leftovers(tmp_path) == []


def test_atomic_write_keeps_file_names_that_are_not_utf8(tmp_path: Path):
    name = b"caf\xe9.tif".decode("utf-8", "surrogateescape")
    with atomic_write(tmp_path / "undo.csv", errors="surrogateescape") as f:
        f.write(name)
    assert (tmp_path / "undo.csv").read_bytes() == b"caf\xe9.tif"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_open_new_never_replaces(tmp_path: Path):
    path = tmp_path / "undo.csv"
    with open_new(path) as f:
        f.write("old,new\n")
    with pytest.raises(FileExistsError, match="undo.csv already exists"):
        open_new(path)
    assert path.read_text(encoding="utf-8") == "old,new\n"


def test_rename_no_replace(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a", encoding="utf-8")
    b.write_text("b", encoding="utf-8")
    with pytest.raises(FileExistsError):
        rename_no_replace(a, b)
    assert a.read_text(encoding="utf-8") == "a" and b.read_text(encoding="utf-8") == "b"
    rename_no_replace(a, tmp_path / "c")
    assert not a.exists() and (tmp_path / "c").read_text(encoding="utf-8") == "a"


def test_unwritable_reason(tmp_path: Path):
    assert unwritable_reason(tmp_path / "new" / "out.csv") is None
    assert unwritable_reason(tmp_path / "new") == "it is a folder"
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert unwritable_reason(tmp_path / "file" / "out.csv")  # a file where a folder should be
    assert leftovers(tmp_path / "new") == []


def test_csv_formula_cells_round_trip():
    # (Text that itself starts with "'=" is not round-tripped: csv_unsafe drops its quote.)
    cells = ["=HYPERLINK(1)", "+1", "-2", "@SUM", "\tx", "\ra", "'kept", "plain", "a\rb", 3]
    buffer = io.StringIO(newline="")
    writer = CsvWriter(buffer)
    writer.writerow([csv_safe(c) for c in cells])
    (row,) = list(csv.reader(io.StringIO(buffer.getvalue(), newline="")))
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)
    assert [csv_unsafe(c) for c in row] == [str(c) for c in cells]


def test_a_carriage_return_inside_a_cell_does_not_split_the_row():
    buffer = io.StringIO(newline="")
    CsvWriter(buffer).writerow(["a\rb", "c"])
    assert list(csv.reader(io.StringIO(buffer.getvalue(), newline=""))) == [["a\rb", "c"]]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_bytes_decode_back(dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    grey = rng.integers(0, top, (7, 5), dtype=dtype)
    rgb = rng.integers(0, top, (7, 5, 3), dtype=dtype)
    decoded = cv2.imdecode(np.frombuffer(png_bytes(grey), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == dtype and np.array_equal(decoded, grey)
    decoded = cv2.imdecode(np.frombuffer(png_bytes(rgb), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded[:, :, ::-1], rgb)  # RGB in, OpenCV reads BGR


def test_png_bytes_of_a_float_model_input():
    chw = np.zeros((3, 4, 6), np.float32)
    chw[0] = 1.0  # red
    chw[2, 0, 0] = 0.5
    decoded = cv2.imdecode(np.frombuffer(png_bytes(chw, channels_first=True), np.uint8), -1)
    assert decoded.shape == (4, 6, 3) and decoded.dtype == np.uint8
    assert tuple(decoded[1, 1]) == (0, 0, 255)  # BGR
    assert decoded[0, 0, 0] == 128  # 0.5 rounds to 128
    one = np.full((1, 4, 6), 0.25, np.float32)
    decoded = cv2.imdecode(np.frombuffer(png_bytes(one, channels_first=True), np.uint8), -1)
    assert decoded.shape == (4, 6) and int(decoded[0, 0]) == 64


def test_files_needs_neither_opencv_nor_torch_to_write(tmp_path: Path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from flystage.files import atomic_write\n"
        f"with atomic_write({str(tmp_path / 'x.json')!r}) as f: f.write('{{}}')\n"
        "assert 'cv2' not in sys.modules and 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr


def test_a_block_that_removes_its_file_moves_nothing(tmp_path: Path):
    # An output decided against (an int8 graph that answers worse) leaves the old file alone.
    path = tmp_path / "model-int8.onnx"
    path.write_bytes(b"old")
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"worse")
        tmp.unlink()
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []
