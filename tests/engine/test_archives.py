"""safe_extract_zip refuses archives that would write outside the destination or explode."""
from __future__ import annotations

import stat
import zipfile

import pytest

from optimization.base import InvalidInputError, UnsafeModelError
from optimization.safety.archives import safe_extract_zip


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def test_plain_archive_is_extracted(tmp_path):
    archive = make_zip(tmp_path / "ok.zip", [("cats/1.txt", "a"), ("dogs/2.txt", "b")])
    written = safe_extract_zip(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["cats/1.txt", "dogs/2.txt"]
    assert (tmp_path / "out" / "dogs" / "2.txt").read_text() == "b"


@pytest.mark.parametrize("bad_name", ["../escape.txt", "cats/../../escape.txt", "/tmp/escape.txt"])
def test_entry_leaving_the_destination_is_refused_before_anything_is_written(tmp_path, bad_name):
    archive = make_zip(tmp_path / "evil.zip", [("cats/first.txt", "written first?"), (bad_name, "x")])
    with pytest.raises(UnsafeModelError, match="outside"):
        safe_extract_zip(archive, tmp_path / "out" / "inner")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out" / "escape.txt").exists()


def test_symbolic_link_entry_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        info = zipfile.ZipInfo("cats/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeModelError, match="link"):
        safe_extract_zip(archive, tmp_path / "out")


def test_zip_bomb_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", b"\0" * (8 * 2**20))])
    with pytest.raises(InvalidInputError, match="zip bomb"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_files_are_refused(tmp_path):
    archive = make_zip(tmp_path / "many.zip", [(f"f{i}.txt", "x") for i in range(20)])
    with pytest.raises(InvalidInputError, match="at most 10"):
        safe_extract_zip(archive, tmp_path / "out", max_files=10)


def test_archive_larger_than_the_limit_is_refused(tmp_path):
    archive = make_zip(tmp_path / "big.zip", [("a.bin", bytes(range(256)) * 64)])
    with pytest.raises(InvalidInputError, match="unpacks to"):
        safe_extract_zip(archive, tmp_path / "out", max_total_bytes=1000)


def test_non_zip_is_refused(tmp_path):
    (tmp_path / "x.zip").write_text("not a zip")
    with pytest.raises(InvalidInputError, match="not a zip"):
        safe_extract_zip(tmp_path / "x.zip", tmp_path / "out")
