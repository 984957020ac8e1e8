"""builder/extract.py: every rule is exercised with a real, hand-crafted zip."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import pytest

from opbox.builder import extract
from opbox.builder.extract import ExtractLimits, ExtractReport, extract_to_content_dir, safe_extract
from opbox.errors import Conflict, UnsafeArchiveError, ValidationError

MIB = 1024**2


# -- crafting helpers -------------------------------------------------------------------


def info(name: str, mode: int | None = None, compress: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = compress
    zi.create_system = 3
    if mode is not None:
        zi.external_attr = mode << 16
    return zi


def make_zip(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" when we mean it
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def patch_entry(data: bytes, name: str, *, file_size: int | None = None, flag_bits: int | None = None,
                header_offset: int | None = None) -> bytes:
    """Rewrite fields of ``name`` in both the central directory and its local header."""
    buf = bytearray(data)
    eocd = buf.rfind(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<HLL", buf, eocd + 10)
    pos = cd_offset
    for _ in range(count):
        assert buf[pos:pos + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", buf, pos + 28)
        local = struct.unpack_from("<L", buf, pos + 42)[0]
        if buf[pos + 46:pos + 46 + name_len] == name.encode():
            assert buf[local:local + 4] == b"PK\x03\x04"
            if file_size is not None:
                struct.pack_into("<L", buf, pos + 24, file_size)
                struct.pack_into("<L", buf, local + 22, file_size)
            if flag_bits is not None:
                struct.pack_into("<H", buf, pos + 8, flag_bits)
                struct.pack_into("<H", buf, local + 6, flag_bits)
            if header_offset is not None:
                struct.pack_into("<L", buf, pos + 42, header_offset)
            return bytes(buf)
        pos += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"{name} not in archive")


def leftovers(parent: Path) -> list[str]:
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*"))


def reject(tmp_path: Path, data: bytes, rule: str, *words: str, limits: ExtractLimits = ExtractLimits()):
    """Extraction must fail with ``rule``, name the words, and leave the parent empty."""
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(data, parent / "code", limits=limits)
    assert err.value.details["rule"] == rule, str(err.value)
    for word in words:
        assert word in str(err.value)
    assert leftovers(parent) == []
    return err.value


# -- the good path ----------------------------------------------------------------------


def test_extracts_files_dirs_and_modes(tmp_path: Path):
    data = make_zip(
        (info("empty/", stat.S_IFDIR | 0o777), b""),
        (info("pkg/__init__.py", stat.S_IFREG | 0o600), b""),
        (info("pkg/mod.py", stat.S_IFREG | 0o664), b"x = 1\n"),
        (info("run.sh", stat.S_IFREG | 0o4755), b"#!/bin/sh\n"),  # setuid must go
        (info("odd", stat.S_IFREG | 0o100), b"only owner x"),
        ("dos.txt", b"no unix mode"),
        (info("./dot/slash//x.py", stat.S_IFREG | 0o644), b"normalized"),
    )
    dest = tmp_path / "out" / "code"
    report = safe_extract(data, dest)

    assert report == ExtractReport(files=6, bytes=len(b"x = 1\n#!/bin/sh\nonly owner xno unix modenormalized"))
    mode = lambda rel: stat.S_IMODE((dest / rel).stat().st_mode)  # noqa: E731
    assert mode(".") == 0o755
    assert mode("empty") == mode("pkg") == mode("dot/slash") == 0o755
    assert mode("pkg/__init__.py") == mode("pkg/mod.py") == mode("dos.txt") == 0o644
    assert mode("run.sh") == mode("odd") == 0o755
    assert (dest / "pkg/mod.py").read_bytes() == b"x = 1\n"
    assert (dest / "dot/slash/x.py").read_bytes() == b"normalized"
    assert os.listdir(tmp_path / "out") == ["code"]  # no temp folder left


def test_accepts_a_path_and_an_empty_archive(tmp_path: Path):
    archive = tmp_path / "code.zip"
    archive.write_bytes(make_zip(("a.py", b"a")))
    assert safe_extract(archive, tmp_path / "a") == ExtractReport(1, 1)
    assert safe_extract(str(archive), tmp_path / "b") == ExtractReport(1, 1)
    assert safe_extract(make_zip(), tmp_path / "c") == ExtractReport(0, 0)
    assert os.listdir(tmp_path / "c") == []


def test_case_variants_are_not_duplicates(tmp_path: Path):
    safe_extract(make_zip(("a.py", b"lower"), ("A.py", b"upper")), tmp_path / "code")
    assert (tmp_path / "code/A.py").read_bytes() == b"upper"


def test_explicit_directory_after_its_files_is_fine(tmp_path: Path):
    safe_extract(make_zip(("d/x.py", b"x"), ("d/", b"")), tmp_path / "code")
    assert (tmp_path / "code/d/x.py").read_bytes() == b"x"


def test_dest_must_not_exist(tmp_path: Path):
    (tmp_path / "code").mkdir()
    with pytest.raises(Conflict, match="already exists"):
        safe_extract(make_zip(("a.py", b"a")), tmp_path / "code")
    assert leftovers(tmp_path) == ["code"]


# -- not a zip / corrupt ----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", os.urandom(4096), b"PK\x03\x04" + b"\0" * 60])
def test_rejects_data_that_is_not_a_zip(tmp_path: Path, data: bytes):
    reject(tmp_path, data, "corrupt", "not a valid zip")


def test_rejects_a_truncated_zip(tmp_path: Path):
    data = make_zip(("a.py", os.urandom(5000)))
    reject(tmp_path, data[: len(data) // 2], "corrupt")


def test_rejects_a_bad_crc_and_removes_what_was_written(tmp_path: Path):
    payload = b"A" * 1000
    data = bytearray(make_zip(("good.py", b"fine"), (info("bad.py", compress=zipfile.ZIP_STORED), payload)))
    at = data.find(payload)
    data[at + 500] = ord("B")  # stored data: the CRC no longer matches
    reject(tmp_path, bytes(data), "corrupt", "CRC")


def test_rejects_corrupt_deflate_data(tmp_path: Path):
    data = bytearray(make_zip(("a.py", os.urandom(3000))))
    for i in range(40, 200):  # scramble the compressed stream, keep the headers
        data[i] ^= 0xFF
    reject(tmp_path, bytes(data), "corrupt")


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rule", "words"), [
    ("../evil.py", "parent_reference", ["'../evil.py'", ".."]),
    ("a/../../evil.py", "parent_reference", ["'a/../../evil.py'"]),
    ("a/..", "parent_reference", []),
    ("/etc/cron.d/evil", "absolute_path", ["'/etc/cron.d/evil'", "absolute"]),
    ("//server/share/x", "absolute_path", []),
    ("C:\\Windows\\evil.py", "backslash", ["backslash"]),
    ("C:/evil.py", "drive_letter", ["drive letter"]),
    ("c:evil.py", "drive_letter", []),
    ("a\\..\\..\\evil.py", "backslash", []),
    ("a\x01b.py", "control_character", ["control character"]),
    ("new\nline.py", "control_character", []),
    ("del\x7f.py", "control_character", []),
    ("./", "empty_name", ["empty"]),
    ("a" * 1025, "name_too_long", ["1025", "1024"]),
    ("d/" * 64 + "x.py", "too_deep", ["65", "64"]),
])
def test_rejects_bad_names(tmp_path: Path, name: str, rule: str, words: list[str]):
    data = make_zip(("ok.py", b"ok"), (info(name, stat.S_IFREG | 0o644), b"x"))
    reject(tmp_path, data, rule, "unsafe archive", *words)


def test_rejects_an_empty_name(tmp_path: Path):
    data = make_zip(("ok.py", b"ok"), (info("", stat.S_IFREG | 0o644), b"x"))
    reject(tmp_path, data, "empty_name", "empty file name")


def test_rejects_a_nul_in_a_name(tmp_path: Path):
    # zipfile cuts names at a NUL when writing, so forge it in the raw bytes.
    data = make_zip(("ok.py", b"ok"), ("evil.pyZ.txt", b"x"))
    data = data.replace(b"evil.pyZ.txt", b"evil.py\x00.txt")
    err = reject(tmp_path, data, "control_character", "NUL")
    assert err.details["entry"] == "evil.py\x00.txt"


def test_limits_for_names_are_configurable(tmp_path: Path):
    reject(tmp_path, make_zip(("abcdef.py", b"")), "name_too_long", limits=ExtractLimits(max_name_length=5))


# -- entry types ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "rule", "word"), [
    (stat.S_IFLNK, "symlink", "symbolic link"),
    (stat.S_IFCHR, "special_file", "character device"),
    (stat.S_IFBLK, "special_file", "block device"),
    (stat.S_IFIFO, "special_file", "fifo"),
    (stat.S_IFSOCK, "special_file", "socket"),
    (0o160000, "special_file", "unknown file type"),
])
def test_rejects_links_and_special_files(tmp_path: Path, kind: int, rule: str, word: str):
    target = b"/etc/passwd" if kind == stat.S_IFLNK else b""
    data = make_zip(("ok.py", b"ok"), (info("thing", kind | 0o777), target))
    reject(tmp_path, data, rule, "'thing'", word, "only regular files and directories")


def test_rejects_a_directory_entry_with_data(tmp_path: Path):
    data = make_zip((info("d", stat.S_IFDIR | 0o755), b"payload"))
    reject(tmp_path, data, "special_file", "directory entry")


def test_rejects_encrypted_entries(tmp_path: Path):
    data = patch_entry(make_zip(("ok.py", b"ok"), ("secret.py", b"x")), "secret.py", flag_bits=0x1)
    reject(tmp_path, data, "encrypted", "'secret.py'", "encrypted")


# -- duplicates and clashes -------------------------------------------------------------


@pytest.mark.parametrize("names", [
    ("a.py", "a.py"),
    ("a.py", "./a.py"),
    ("pkg/a.py", "pkg//a.py"),
    ("pkg/a.py", "./pkg/./a.py"),
    ("d/", "d/"),
])
def test_rejects_duplicates(tmp_path: Path, names: tuple[str, str]):
    data = make_zip(*((n, b"" if n.endswith("/") else b"x") for n in names))
    reject(tmp_path, data, "duplicate", "more than once")


@pytest.mark.parametrize("names", [
    ("lib", "lib/x.py"),   # file, then a file under it
    ("lib/x.py", "lib"),   # implied directory, then a file
    ("lib/", "lib"),       # explicit directory, then a file
    ("lib", "lib/"),       # file, then a directory
    ("a/b", "a/b/c/d.py"),
])
def test_rejects_file_directory_clashes(tmp_path: Path, names: tuple[str, str]):
    data = make_zip(*((n, b"" if n.endswith("/") else b"x") for n in names))
    err = reject(tmp_path, data, "file_dir_clash", f"entry {names[1]!r}")
    assert "is also a file" in str(err) or "both a file and a directory" in str(err)


# -- size limits and bombs --------------------------------------------------------------


def test_rejects_too_many_entries(tmp_path: Path):
    data = make_zip(*((f"f{i}.py", b"") for i in range(11)))
    reject(tmp_path, data, "too_many_files", "11 entries", "10", limits=ExtractLimits(max_files=10))


def test_rejects_a_declared_total_above_the_limit(tmp_path: Path):
    data = make_zip(("a.bin", os.urandom(600)), ("b.bin", os.urandom(600)))
    reject(tmp_path, data, "total_too_large", "'b.bin'", "1000 bytes",
           limits=ExtractLimits(max_total_bytes=1000))


def test_rejects_a_file_above_the_limit(tmp_path: Path):
    data = make_zip(("big.bin", os.urandom(2000)))
    reject(tmp_path, data, "file_too_large", "'big.bin'", "2000", "1000",
           limits=ExtractLimits(max_file_bytes=1000))


def test_rejects_a_high_compression_ratio(tmp_path: Path):
    data = make_zip(("ok.py", b"ok"), ("zeros.bin", bytes(5 * MIB)))
    reject(tmp_path, data, "ratio", "'zeros.bin'", "compression ratio", "200:1")


def test_ratio_rule_ignores_small_entries(tmp_path: Path):
    safe_extract(make_zip(("zeros.bin", bytes(MIB))), tmp_path / "code")  # ratio ~1000:1 but 1 MiB
    assert (tmp_path / "code/zeros.bin").stat().st_size == MIB


def test_catches_a_bomb_with_a_forged_declared_size_while_streaming(tmp_path: Path):
    # 8 MiB of zeros deflate to ~8 KiB; declaring 1000 bytes dodges every declared-size rule
    # (ratio < 1, tiny total), so only counting the bytes actually inflated can catch it.
    bomb = bytes(8 * MIB)
    data = make_zip(("first.py", b"written before the bomb"), ("bomb.bin", bomb))
    data = patch_entry(data, "bomb.bin", file_size=1000)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        forged = zf.getinfo("bomb.bin")
        assert forged.file_size == 1000 and forged.compress_size < 20_000
    err = reject(tmp_path, data, "size_mismatch", "'bomb.bin'", "declared size of 1000 bytes", "zip bomb")
    assert err.details["entry"] == "bomb.bin"


def test_catches_an_entry_shorter_than_declared(tmp_path: Path):
    data = patch_entry(make_zip(("a.py", b"short")), "a.py", file_size=50)
    reject(tmp_path, data, "size_mismatch", "'a.py'", "holds 5 bytes but declares 50")


def test_catches_a_stored_entry_longer_than_declared(tmp_path: Path):
    data = make_zip((info("a.bin", compress=zipfile.ZIP_STORED), b"x" * 4000))
    reject(tmp_path, patch_entry(data, "a.bin", file_size=10), "size_mismatch", "declared size of 10")


def test_rejects_overlapping_entries(tmp_path: Path):
    # Two central-directory entries pointing at the same data (non-recursive bomb).
    data = make_zip(("a.bin", b"a" * 100), ("b.bin", b"b" * 100))
    reject(tmp_path, patch_entry(data, "b.bin", header_offset=0), "overlap", "overlaps")


# -- content-addressed folders ----------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_content_dir_layout_and_idempotence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = make_zip(("main.py", b"print(1)"))
    h = sha(data)
    path = extract_to_content_dir(data, tmp_path, h)
    assert path == tmp_path / h[:2] / h
    assert (path / "main.py").read_bytes() == b"print(1)"
    assert os.listdir(tmp_path / h[:2]) == [h]

    monkeypatch.setattr(extract, "_extract_into", lambda *a: pytest.fail("extracted twice"))
    assert extract_to_content_dir(data, tmp_path, h) == path


def test_content_dir_accepts_a_path(tmp_path: Path):
    archive = tmp_path / "code.zip"
    archive.write_bytes(data := make_zip(("main.py", b"x")))
    path = extract_to_content_dir(archive, tmp_path / "root", sha(data))
    assert (path / "main.py").read_bytes() == b"x"


def test_content_dir_verifies_the_hash(tmp_path: Path):
    data = make_zip(("main.py", b"x"))
    with pytest.raises(UnsafeArchiveError, match="does not match"):
        extract_to_content_dir(data, tmp_path, "ab" * 32)
    assert leftovers(tmp_path) == []
    path = extract_to_content_dir(data, tmp_path, "ab" * 32, verify=False)
    assert (path / "main.py").exists()


@pytest.mark.parametrize("bad", ["", "../../etc", "ABCDEF0123", "ab/cdef012", "a" * 7])
def test_content_dir_rejects_bad_hashes(tmp_path: Path, bad: str):
    with pytest.raises(ValidationError, match="content hash"):
        extract_to_content_dir(make_zip(), tmp_path, bad, verify=False)
    assert leftovers(tmp_path) == []


def test_content_dir_leaves_nothing_on_a_bad_archive(tmp_path: Path):
    data = make_zip(("ok.py", b"ok"), ("../evil.py", b"x"))
    with pytest.raises(UnsafeArchiveError, match="'..'"):
        extract_to_content_dir(data, tmp_path, sha(data))
    assert leftovers(tmp_path) == []  # not even the shard folder


def test_content_dir_concurrent_callers_share_one_folder(tmp_path: Path):
    data = make_zip(*((f"pkg/m{i}.py", os.urandom(2000)) for i in range(50)))
    h = sha(data)
    barrier = threading.Barrier(8)
    results: list[Path] = []
    errors: list[BaseException] = []

    def work():
        barrier.wait()
        try:
            results.append(extract_to_content_dir(data, tmp_path, h))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {tmp_path / h[:2] / h}
    assert os.listdir(tmp_path / h[:2]) == [h]  # losers discarded their temp folders
    assert len(os.listdir(tmp_path / h[:2] / h / "pkg")) == 50


def test_content_dir_loser_of_a_race_discards_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = make_zip(("main.py", b"mine"))
    h = sha(data)
    final = tmp_path / h[:2] / h
    real = extract._extract_into

    def racing(src, tmp, limits):  # another extractor finishes while we work
        report = real(src, tmp, limits)
        final.mkdir()
        (final / "main.py").write_bytes(b"theirs")
        return report

    monkeypatch.setattr(extract, "_extract_into", racing)
    assert extract_to_content_dir(data, tmp_path, h) == final
    assert (final / "main.py").read_bytes() == b"theirs"
    assert os.listdir(final.parent) == [h]
