"""opbox/packaging.py: what gets packed, determinism, limits, and the round trip to the builder."""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from opbox import packaging
from opbox.builder.extract import safe_extract
from opbox.errors import PackagingError
from opbox.packaging import (
    DEFAULT_IGNORES, PackedCode, iter_included_files, normalize_requirements, pack_folder, requirements_hash,
)

EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def write(root: Path, rel: str, data: str | bytes = "x", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def names(folder: Path, **kw) -> list[str]:
    return [name for name, _ in iter_included_files(folder, **kw)]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A typical code folder: the kitchen sink of things to keep and things to leave out."""
    root = tmp_path / "moonshot"
    write(root, "main.py", "import helpers\n")
    write(root, "helpers/__init__.py", "")
    write(root, "helpers/math.py", "def add(a, b):\n    return a + b\n")
    write(root, "helpers/deep/er/data.json", '{"k": 1}')
    write(root, "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    write(root, "requirements.txt", "numpy==2.0  # pinned\n\nrequests\n")
    write(root, "logs/today.log", "noise")
    write(root, "logs/keep.log", "signal")
    write(root, "notes.log", "noise")
    write(root, "secret.key", "hunter2")
    write(root, ".opboxignore", "# local junk\n*.log\n!keep.log\nsecret.key\n")
    write(root, "__pycache__/main.cpython-311.pyc", b"\0bytecode")
    write(root, "helpers/__pycache__/math.cpython-311.pyc", b"\0bytecode")
    write(root, ".venv/lib/site.py", "venv")
    write(root, ".venv/bin/python", "venv")
    write(root, ".git/HEAD", "ref: refs/heads/main")
    (root / "link_inside.py").symlink_to("helpers/math.py")
    outside = write(tmp_path, "outside/secret.txt", "do not ship")
    (root / "link_outside.txt").symlink_to(outside)
    return root


EXPECTED = {
    ".opboxignore": b"# local junk\n*.log\n!keep.log\nsecret.key\n",
    "helpers/__init__.py": b"",
    "helpers/deep/er/data.json": b'{"k": 1}',
    "helpers/math.py": b"def add(a, b):\n    return a + b\n",
    "link_inside.py": b"def add(a, b):\n    return a + b\n",
    "logs/keep.log": b"signal",
    "main.py": b"import helpers\n",
    "requirements.txt": b"numpy==2.0  # pinned\n\nrequests\n",
    "run.sh": b"#!/bin/sh\necho hi\n",
}


# -- round trip -------------------------------------------------------------------------


def test_round_trip_through_the_builder(project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="opbox.packaging"):
        packed = pack_folder(project)
    assert "link_outside.txt" in caplog.text and "outside" in caplog.text

    assert isinstance(packed, PackedCode)
    assert packed.sha256 == hashlib.sha256(packed.data).hexdigest()
    assert packed.files == len(EXPECTED)
    assert packed.uncompressed_bytes == sum(map(len, EXPECTED.values()))

    dest = tmp_path / "extracted"
    report = safe_extract(packed.data, dest)
    assert tree(dest) == EXPECTED
    assert (report.files, report.bytes) == (packed.files, packed.uncompressed_bytes)
    assert not (dest / "link_inside.py").is_symlink()
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "main.py").stat().st_mode) == 0o644


def test_zip_entries_are_normalized(project: Path):
    with zipfile.ZipFile(io.BytesIO(pack_folder(project).data)) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(EXPECTED)
    for i in infos:
        assert i.date_time == (1980, 1, 1, 0, 0, 0)
        assert i.compress_type == zipfile.ZIP_DEFLATED
        assert i.create_system == 3
        assert i.external_attr >> 16 == stat.S_IFREG | (0o755 if i.filename == "run.sh" else 0o644)


# -- determinism ------------------------------------------------------------------------


def test_same_content_same_bytes(project: Path, tmp_path: Path):
    first = pack_folder(project)
    assert pack_folder(project) == first

    # Timestamps, non-exec permission bits, location and creation order do not matter.
    for path in project.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_700_000_000, 1_700_000_000))
    (project / "main.py").chmod(0o600)
    copy = tmp_path / "elsewhere" / "other-name"
    shutil.copytree(project, copy, symlinks=True)
    assert pack_folder(project).sha256 == first.sha256
    assert pack_folder(copy).sha256 == first.sha256


def test_any_content_change_changes_the_hash(project: Path):
    before = pack_folder(project).sha256
    write(project, "helpers/math.py", "changed")
    after_edit = pack_folder(project).sha256
    (project / "main.py").chmod(0o755)
    after_chmod = pack_folder(project).sha256
    (project / "run.sh").rename(project / "run2.sh")
    after_rename = pack_folder(project).sha256
    assert len({before, after_edit, after_chmod, after_rename}) == 4


# -- what is included -------------------------------------------------------------------


@pytest.mark.parametrize("rel", [
    ".git/config", ".hg/store", ".svn/entries", "__pycache__/m.pyc", "pkg/__pycache__/m.txt", "m.pyc",
    "pkg/m.pyc", ".venv/x", "venv/x", "env/x", ".env/x", "node_modules/x/index.js", "web/node_modules/y",
    ".mypy_cache/x", ".pytest_cache/x", ".ipynb_checkpoints/x", ".DS_Store", "pkg/.DS_Store",
    "opbox_demo.egg-info/PKG-INFO",
])
def test_default_ignores(tmp_path: Path, rel: str):
    write(tmp_path, "keep.py")
    write(tmp_path, rel)
    assert names(tmp_path) == ["keep.py"]


def test_default_dir_patterns_only_match_directories(tmp_path: Path):
    write(tmp_path, "env", "a file named env")
    write(tmp_path, "venv.py")
    assert names(tmp_path) == ["env", "venv.py"]
    assert "__pycache__/" in DEFAULT_IGNORES


def test_opboxignore_can_re_include_defaults(tmp_path: Path):
    write(tmp_path, "env/settings.py")
    write(tmp_path, "vendor.pyc")
    write(tmp_path, "other.pyc")
    write(tmp_path, ".opboxignore", "!env/\n!vendor.pyc\n")
    assert names(tmp_path) == [".opboxignore", "env/settings.py", "vendor.pyc"]


def test_opboxignore_gitignore_syntax(tmp_path: Path):
    for rel in ["data/raw.csv", "data/README.md", "src/data/ok.py", "build/out.bin", "a/b/c.tmp", "top.tmp"]:
        write(tmp_path, rel)
    write(tmp_path, ".opboxignore", "/data/*\n!/data/README.md\nbuild/\n**/*.tmp\n")
    assert names(tmp_path) == [".opboxignore", "data/README.md", "src/data/ok.py"]


def test_extra_ignores(tmp_path: Path):
    write(tmp_path, "main.py")
    write(tmp_path, "out/result.bin")
    write(tmp_path, "main.py.bak")
    assert names(tmp_path, extra_ignores=["out/", "*.bak"]) == ["main.py"]
    assert pack_folder(tmp_path, extra_ignores=["out/", "*.bak"]).files == 1


def test_symlinks(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "code"
    write(root, "real/data.txt", "inside")
    write(tmp_path, "elsewhere/x.txt", "outside")
    (root / "file_link.txt").symlink_to("real/data.txt")
    (root / "abs_link.txt").symlink_to(root / "real/data.txt")  # absolute, but inside
    (root / "sneaky.txt").symlink_to("../elsewhere/x.txt")
    (root / "dir_link").symlink_to("real", target_is_directory=True)
    (root / "outside_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "real/loop").symlink_to("..", target_is_directory=True)  # would loop forever
    (root / "broken.txt").symlink_to("missing.txt")
    with caplog.at_level(logging.WARNING, logger="opbox.packaging"):
        packed = pack_folder(root)
    assert names(root) == ["abs_link.txt", "file_link.txt", "real/data.txt"]
    assert packed.files == 3
    for needle in ["sneaky.txt: symlink points outside", "dir_link: symlink to a directory",
                   "outside_dir: symlink to a directory", "real/loop: symlink to a directory", "broken.txt"]:
        assert needle in caplog.text


def test_special_files_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write(tmp_path, "main.py")
    os.mkfifo(tmp_path / "pipe")
    with caplog.at_level(logging.WARNING, logger="opbox.packaging"):
        assert names(tmp_path) == ["main.py"]
    assert "pipe: not a regular file" in caplog.text


def test_empty_folder(tmp_path: Path):
    packed = pack_folder(tmp_path)
    assert (packed.files, packed.uncompressed_bytes, packed.requirements_sha256) == (0, 0, EMPTY_SHA)
    assert zipfile.ZipFile(io.BytesIO(packed.data)).namelist() == []


# -- requirements -----------------------------------------------------------------------


def test_requirements_hash_ignores_cosmetics(tmp_path: Path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(a, "requirements.txt", "numpy==2.0\nrequests\n")
    write(b, "requirements.txt", "# deps\r\n\r\n  numpy==2.0   # pinned  \r\n\nrequests   \n# end\n")
    write(c, "requirements.txt", "numpy==2.1\nrequests\n")
    ha, hb, hc = (pack_folder(p).requirements_sha256 for p in (a, b, c))
    assert ha == hb == hashlib.sha256(b"numpy==2.0\nrequests").hexdigest()
    assert hc != ha


def test_requirements_hash_when_absent_or_empty(tmp_path: Path):
    write(tmp_path, "main.py")
    assert pack_folder(tmp_path).requirements_sha256 == EMPTY_SHA
    write(tmp_path, "requirements.txt", "# nothing yet\n\n")
    assert pack_folder(tmp_path).requirements_sha256 == EMPTY_SHA
    write(tmp_path, "sub/requirements.txt", "torch\n")  # only the root file counts
    assert pack_folder(tmp_path).requirements_sha256 == EMPTY_SHA


def test_normalize_requirements_keeps_url_fragments():
    text = "git+https://host/repo.git#egg=pkg  # comment\n-r other.txt\n"
    assert normalize_requirements(text) == "git+https://host/repo.git#egg=pkg\n-r other.txt"
    assert requirements_hash("") == EMPTY_SHA


# -- errors -----------------------------------------------------------------------------


def test_size_limit_names_the_largest_files(tmp_path: Path):
    sizes = {"data/huge.bin": 50_000, "data/big.bin": 40_000, "model.pt": 30_000, "b.csv": 20_000,
             "a.csv": 10_000, "small.py": 100, "tiny.py": 10}
    for rel, size in sizes.items():
        write(tmp_path, rel, os.urandom(size))
    with pytest.raises(PackagingError) as err:
        pack_folder(tmp_path, max_bytes=100_000)
    msg = str(err.value)
    assert "146.6 KiB" in msg and "97.7 KiB limit" in msg
    listed = [line.split()[-1] for line in msg.splitlines() if line.startswith("  ")]
    assert listed == ["data/huge.bin", "data/big.bin", "model.pt", "b.csv", "a.csv"]
    assert "48.8 KiB  data/huge.bin" in msg
    assert "small.py" not in msg
    assert str(tmp_path / ".opboxignore") in msg and "'data/'" in msg
    assert err.value.details["size"] == sum(sizes.values())
    assert err.value.details["limit"] == 100_000
    assert err.value.details["largest"][0] == {"name": "data/huge.bin", "size": 50_000}


def test_size_limit_counts_only_included_files(tmp_path: Path):
    write(tmp_path, "main.py", "x")
    write(tmp_path, ".venv/huge.bin", os.urandom(5000))
    assert pack_folder(tmp_path, max_bytes=100).files == 1


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path, "main.py")
    locked = write(tmp_path, "locked.py")

    def fake_open(path, *args, **kwargs):  # chmod 000 does not stop root, so fake it
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(packaging, "open", fake_open, raising=False)
    with pytest.raises(PackagingError, match="cannot read locked.py: Permission denied"):
        pack_folder(tmp_path)


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path, "private/x.py")
    real_scandir = os.scandir

    def fake_scandir(path):
        if Path(path).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(packaging.os, "scandir", fake_scandir)
    with pytest.raises(PackagingError, match="cannot read folder .*private: Permission denied"):
        pack_folder(tmp_path)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(PackagingError, match="does not exist"):
        pack_folder(tmp_path / "nope")
    write(tmp_path, "file.py")
    with pytest.raises(PackagingError, match="not a folder"):
        pack_folder(tmp_path / "file.py")


@pytest.mark.parametrize("name", [b"bad\\name.py", b"tab\there.py", b"latin1-\xe9.py"])
def test_names_the_builder_would_reject(tmp_path: Path, name: bytes):
    write(tmp_path, "main.py")
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
        f.write(b"x")
    with pytest.raises(PackagingError, match="rename it or list it in .opboxignore"):
        pack_folder(tmp_path)
    write(tmp_path, ".opboxignore", "*.py\n!main.py\n")
    assert pack_folder(tmp_path).files == 2  # .opboxignore and main.py
