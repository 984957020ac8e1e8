"""Job images: Dockerfile rendering, tags, build contexts, and real podman builds.

The podman tests build and run real images from the base image that
scripts/setup-podman.sh makes (the session fixture runs the script when the image is
missing). Without podman they are skipped, except under CI=true, where they fail.

The job's requirement is a throwaway package whose wheel the test writes itself (a random
name per session, so the first build is a cold one), fetched with ``--no-index``; only
opbox's own dependencies (starlette, uvicorn, ...) come from the package index, once.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import uuid
import zipfile
from pathlib import Path

import pytest

from opbox.builder.image import (
    DEFAULT_BASE_IMAGE,
    DockerContextSpec,
    ImageBuilder,
    PodmanBuilder,
    build_job_image,
    image_tag,
    prepare_context,
    render_dockerfile,
    repository_name,
)
from opbox.builder.wheelhouse import (
    Wheelhouse,
    build_opbox_wheel,
    find_opbox_source,
    manylinux_platforms,
    requirements_hash,
    tree_hash,
)
from opbox.errors import BuildError, ValidationError
from podman_env import podman  # noqa: F401 (fixture: podman that works, the base image made)

H1, H2 = "a" * 64, "b" * 64


# --- helpers ---------------------------------------------------------------------------------


def make_wheel(dest: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """Write a pure-python wheel by hand (a zip with METADATA, WHEEL and RECORD): no build
    backend, no network, and the same bytes every time for the same input."""
    dist = f"{name}-{version}.dist-info"
    entries = dict(files)
    entries[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    entries[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: opbox-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in entries.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    entries[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in entries.items():
            zf.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return out


def spec(**overrides) -> DockerContextSpec:
    values = dict(base_image=DEFAULT_BASE_IMAGE, python_version="3.11", requirements_hash=H1, code_hash=H2,
                  opbox_version="0.1.0+src.0123456789ab")
    values.update(overrides)
    return DockerContextSpec(**values)


def stage_lines(dockerfile: str) -> list[str]:
    return [line for line in dockerfile.splitlines() if line and not line.startswith("#")]


# --- rendering, tags, contexts (no podman needed) ----------------------------------------------


def test_render_dockerfile_layers_in_order():
    text = render_dockerfile(spec(labels={"team": "ml"}))
    lines = stage_lines(text)
    assert lines[0] == f"FROM {DEFAULT_BASE_IMAGE} AS deps"
    order = [
        "RUN python3 -m venv /opt/venv",
        "COPY requirements.txt",
        "COPY wheels/requirements/",
        "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/requirements -r",
        "COPY wheels/runtime/",
        "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/runtime \"opbox[serve]\"",
        f"FROM {DEFAULT_BASE_IMAGE}",
        "COPY --from=deps /opt/venv /opt/venv",
        "WORKDIR /app",
        "COPY code/ /app/",
        "LABEL ",
        'ENTRYPOINT ["/opt/venv/bin/python", "-m", "opbox.runtime"]',
    ]
    final_from = f"FROM {DEFAULT_BASE_IMAGE}"  # the second stage: exactly this, no "AS deps"
    positions = [next(i for i, line in enumerate(lines)
                      if (line == prefix if prefix == final_from else line.startswith(prefix))) for prefix in order]
    assert positions == sorted(positions), text
    assert "PYTHONUNBUFFERED=1" in text and "PYTHONPATH=/app" in text
    assert f'"opbox.requirements-hash"="{H1}"' in text and f'"opbox.code-hash"="{H2}"' in text
    assert '"opbox.version"="0.1.0+src.0123456789ab"' in text and '"team"="ml"' in text
    assert "sys.exit(None if v == '3.11'" in text


def test_render_without_requirements_skips_the_layer():
    text = render_dockerfile(spec(has_requirements=False))
    assert "wheels/requirements" not in text and "wheels/runtime" in text


def test_render_is_deterministic_and_code_only_changes_the_tail():
    a, b = render_dockerfile(spec()), render_dockerfile(spec(code_hash="c" * 64))
    assert a == render_dockerfile(spec())
    a_lines, b_lines = stage_lines(a), stage_lines(b)
    cut = next(i for i, line in enumerate(a_lines) if line.startswith("COPY code/"))
    assert a_lines[:cut + 1] == b_lines[:cut + 1]  # every instruction up to the code is the same


def test_labels_are_quoted_literally():
    text = render_dockerfile(spec(labels={"note": 'say "hi" $HOME \\ ok'}))
    assert r'"note"="say \"hi\" \$HOME \\ ok"' in text


@pytest.mark.parametrize("bad", [
    dict(base_image="debian:12\nRUN rm -rf /"),
    dict(base_image="Bad Image"),
    dict(python_version="3.11; rm"),
    dict(requirements_hash="not-hex"),
    dict(code_hash=""),
    dict(opbox_version="1.0\nRUN x"),
    dict(labels={"bad key": "x"}),
    dict(labels={"k": "line\nbreak"}),
])
def test_spec_rejects_injection(bad):
    with pytest.raises(ValidationError):
        spec(**bad)


def test_strict_undefined(monkeypatch, tmp_path):
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "x.j2").write_text("FROM {{ base_image }}\n{{ missing }}\n")
    monkeypatch.setattr("opbox.builder.image.TEMPLATES_DIR", tmp_path)
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render_dockerfile(spec(), template="docker/x.j2")


def test_image_tag_is_a_content_hash():
    tag = image_tag("localhost", "My Job_1", H1, H2, "0.1.0")
    assert re.fullmatch(r"localhost/opbox-my-job-1:[0-9a-f]{12}", tag)
    assert tag == image_tag("localhost/", "My Job_1", H1, H2, "0.1.0")
    others = {
        image_tag("localhost", "My Job_1", H2, H2, "0.1.0"),
        image_tag("localhost", "My Job_1", H1, H1, "0.1.0"),
        image_tag("localhost", "My Job_1", H1, H2, "0.1.1"),
        image_tag("localhost", "My Job_1", H1, H2, "0.1.0", dockerfile="FROM x"),
        image_tag("localhost", "other", H1, H2, "0.1.0").replace("opbox-other", "opbox-my-job-1"),
    }
    assert tag not in others and len(others) == 5
    assert image_tag("registry.example.com:5000/team", "j", H1, H2, "1").startswith(
        "registry.example.com:5000/team/opbox-j:")
    with pytest.raises(ValidationError):
        image_tag("bad prefix", "j", H1, H2, "1")
    with pytest.raises(ValidationError):
        repository_name("---")


def test_requirements_and_tree_hashes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("six==1.16\n")
    b.write_text("six==1.16   \r\n\r\n")
    assert requirements_hash(a) == requirements_hash(b) != requirements_hash(None)
    code = tmp_path / "code"
    (code / "pkg" / "__pycache__").mkdir(parents=True)
    (code / "pkg" / "m.py").write_text("x = 1\n")
    before = tree_hash(code)
    (code / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"junk")
    assert tree_hash(code) == before
    (code / "pkg" / "m.py").write_text("x = 2\n")
    assert tree_hash(code) != before


def test_prepare_context_layout(tmp_path):
    code = tmp_path / "code"
    (code / "pkg" / "__pycache__").mkdir(parents=True)
    (code / "main.py").write_text("print('hi')\n")
    (code / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"x")
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "alpha", "1.0", {"alpha/__init__.py": ""})
    runtime = tmp_path / "runtime"
    make_wheel(runtime, "opbox", "0.1.0", {"opbox/__init__.py": ""})
    req = tmp_path / "requirements.txt"
    req.write_text("alpha==1.0\n")
    ctx = prepare_context(code, req, wheels, tmp_path / "ctx", runtime_wheels=runtime)
    files = sorted(p.relative_to(ctx.path).as_posix() for p in ctx.path.rglob("*") if p.is_file())
    assert files == ["code/main.py", "requirements.txt", "wheels/requirements/alpha-1.0-py3-none-any.whl",
                     "wheels/runtime/opbox-0.1.0-py3-none-any.whl"]
    assert ctx.has_requirements and ctx.requirements_hash == requirements_hash(req)
    assert ctx.code_hash == tree_hash(code)
    with pytest.raises(ValidationError):
        prepare_context(code, req, wheels, ctx.path, runtime_wheels=runtime)  # not empty


def test_manylinux_platforms_cover_older_glibc():
    tags = manylinux_platforms((2, 36))
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)


def test_podman_builder_is_an_image_builder():
    assert isinstance(PodmanBuilder(), ImageBuilder)


FAKE_PODMAN = """#!/bin/sh
# podman as buildah's cache race leaves it (containers/buildah#5615): the first build fails so, later ones work
case "$1" in
  image) exit 1 ;;
  build)
    echo build >> "$(dirname "$0")/calls"
    if [ "$(wc -l < "$(dirname "$0")/calls")" -eq 1 ]; then
      echo "Error: checking if cached image exists from a previous build: getting top layer info: layer not known"
      exit 125
    fi
    echo "Successfully tagged $4"; exit 0 ;;
esac
"""


def test_a_build_that_lost_a_cached_layer_while_looking_it_up_is_run_again(tmp_path):
    fake = tmp_path / "bin" / "podman"
    fake.parent.mkdir()
    fake.write_text(FAKE_PODMAN)
    fake.chmod(0o755)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    lines: list[str] = []
    builder = PodmanBuilder(str(fake), lock_dir=tmp_path / "locks")
    assert builder.build(tmp_path / "ctx", "localhost/x:1", lines.append) == "localhost/x:1"
    assert (tmp_path / "bin" / "calls").read_text().count("build") == 2
    assert any("building again" in line for line in lines)
    (tmp_path / "bin" / "calls").write_text("")  # any other failure is not retried
    fake.write_text("#!/bin/sh\ncase \"$1\" in image) exit 1;; build) echo build >> \"$(dirname \"$0\")/calls\"; "
                    "echo 'Error: no space left'; exit 125;; esac\n")
    with pytest.raises(BuildError, match="exit 125"):
        builder.build(tmp_path / "ctx", "localhost/x:2", lines.append)
    assert (tmp_path / "bin" / "calls").read_text().count("build") == 1


# --- real builds -----------------------------------------------------------------------------


class Session:
    """What the podman tests share: a wheelhouse, a throwaway package, images to clean up."""

    def __init__(self, root: Path):
        self.root = root
        self.run = uuid.uuid4().hex[:8]
        self.job = f"test-{self.run}"
        self.pkg = f"opboxtestpkg_{self.run}"
        self.local = root / "local-wheels"
        make_wheel(self.local, self.pkg, "1.0", {f"{self.pkg}/__init__.py": "VALUE = 42\n"})
        self.code = root / "code"
        self.code.mkdir()
        (self.code / "usermod.py").write_text(f"import {self.pkg}\n\n\ndef answer():\n    return {self.pkg}.VALUE\n")
        self.requirements = root / "requirements.txt"
        self.requirements.write_text(f"{self.pkg}==1.0\n")
        # opbox's wheel once for the session, so edits to opbox's source meanwhile do not move it
        self.opbox_wheel = build_opbox_wheel(find_opbox_source(), root / "opbox-wheel")
        cache = root / "wheelhouse"
        # opbox's dependencies come from the package index (once); the job's requirement
        # from the local folder only (--no-index): the same cache folder serves both
        Wheelhouse(cache, opbox_wheel=self.opbox_wheel).runtime_wheels()
        self.wheelhouse = Wheelhouse(cache, find_links=[self.local], no_index=True, opbox_wheel=self.opbox_wheel)
        self.builder = PodmanBuilder(timeout=600)
        self.tags: list[str] = []
        self.created: list[str] = []  # intermediate images our builds made

    def build(self, log: list[str] | None = None):
        lines = [] if log is None else log
        result = build_job_image(self.code, self.requirements, job_name=self.job, wheelhouse=self.wheelhouse,
                                 builder=self.builder, work_dir=self.root, log=lines.append)
        self.remember(lines)
        self.tags.append(result.tag)
        return result

    def remember(self, lines: list[str]) -> None:
        previous = ""
        for line in lines:
            m = re.fullmatch(r"--> ([0-9a-f]{11,64})", line.strip())
            if m and "Using cache" not in previous:
                self.created.append(m.group(1))
            previous = line

    def cleanup(self, podman: str) -> None:
        for ref in list(dict.fromkeys(self.tags)) + self.created[::-1]:
            subprocess.run([podman, "rmi", ref], stdin=subprocess.DEVNULL, capture_output=True)


@pytest.fixture(scope="module")
def session(podman, tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("image-build"))
    yield s
    s.cleanup(podman)


def run_in(podman: str, tag: str, code: str) -> str:
    done = subprocess.run([podman, "run", "--rm", "--network=none", "--entrypoint", "/opt/venv/bin/python", tag,
                           "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def step_cached(log: list[str], step_prefix: str) -> bool:
    """Whether the build step whose instruction starts with ``step_prefix`` was a cache hit."""
    for i, line in enumerate(log):
        if re.search(r"STEP \d+/\d+: " + re.escape(step_prefix), line):
            for following in log[i + 1:]:
                if "STEP " in following:
                    return False
                if following.startswith("--> Using cache"):
                    return True
            return False
    raise AssertionError(f"no step {step_prefix!r} in the build log")


def test_build_run_rebuild_and_noop(podman, session):
    # 1. first build: every layer is new (a fresh requirement name)
    first_log: list[str] = []
    first = session.build(first_log)
    print(f"first build: {first.seconds:.1f}s -> {first.tag}")
    assert first.built and first.tag.startswith(f"localhost/opbox-{session.job}:")
    assert not step_cached(first_log, "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/requirements")
    out = run_in(podman, first.tag,
                 f"import {session.pkg}, usermod, opbox, opbox.runtime, os, sys; "
                 "print(usermod.answer(), os.getcwd(), sys.prefix, os.environ['PYTHONUNBUFFERED'])")
    assert out == "42 /app /opt/venv 1"
    inspect = subprocess.run([podman, "image", "inspect", "--format",
                              "{{json .Config.Entrypoint}}|{{index .Config.Labels \"opbox.code-hash\"}}|"
                              "{{index .Config.Labels \"opbox.requirements-hash\"}}|"
                              "{{index .Config.Labels \"opbox.version\"}}", first.tag],
                             capture_output=True, text=True, check=True).stdout.strip()
    entrypoint, code_label, req_label, version_label = inspect.split("|")
    assert entrypoint == '["/opt/venv/bin/python","-m","opbox.runtime"]'
    assert code_label == tree_hash(session.code) and req_label == requirements_hash(session.requirements)
    assert version_label.startswith("0.1.0+whl.")

    # 2. code-only change: a new tag, the dependency layers come from the cache
    (session.code / "usermod.py").write_text(
        (session.code / "usermod.py").read_text().replace("return ", "return 1 + "))
    second_log: list[str] = []
    second = session.build(second_log)
    print(f"code-only rebuild: {second.seconds:.1f}s -> {second.tag}")
    assert second.built and second.tag != first.tag
    for step in ("RUN python3 -m venv", "COPY wheels/requirements/",
                 "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/requirements",
                 "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/runtime",
                 "COPY --from=deps /opt/venv /opt/venv"):
        assert step_cached(second_log, step), step
    assert not step_cached(second_log, "COPY code/ /app/")
    assert second.seconds < first.seconds
    assert run_in(podman, second.tag, "import usermod; print(usermod.answer())") == "43"

    # 3. unchanged version: the tag exists, nothing is built or fetched
    third_log: list[str] = []
    third = session.build(third_log)
    print(f"no-op: {third.seconds:.2f}s")
    assert not third.built and third.tag == second.tag
    assert not any("STEP" in line or "wheelhouse:" in line for line in third_log), third_log
    assert third.seconds < 5
    assert session.builder.build(session.root, second.tag, log=third_log.append) == second.tag  # exists: no-op


def test_failing_build_raises_with_pips_error(podman, session, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{session.pkg}==1.0\nno-such-package-{session.run}==9.9\n")
    runtime = session.wheelhouse.runtime_wheels()
    ctx = prepare_context(session.code, requirements, session.local, tmp_path / "ctx", runtime_wheels=runtime.path)
    dockerfile = render_dockerfile(spec(requirements_hash=ctx.requirements_hash, code_hash=ctx.code_hash,
                                        opbox_version=runtime.version))
    (ctx.path / "Dockerfile").write_text(dockerfile)
    tag = image_tag("localhost", session.job, ctx.requirements_hash, ctx.code_hash, runtime.version,
                    dockerfile=dockerfile)
    streamed: list[str] = []
    with pytest.raises(BuildError) as info:
        session.builder.build(ctx.path, tag, log=streamed.append)
    session.remember(streamed)
    err = info.value
    assert f"no-such-package-{session.run}" in err.log
    assert "No matching distribution found" in err.log
    assert err.log.splitlines() == streamed[1:]  # every line was streamed as it came (after the command)
    assert "build log" in str(err) and err.code == "build_failed"
    assert not session.builder.exists(tag)


def test_wheel_fetch_failure_is_a_build_error(tmp_path):
    local = tmp_path / "local"
    make_wheel(local, "alpha", "1.0", {"alpha/__init__.py": ""})
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("alpha==1.0\nno-such-package-opbox-test==9.9\n")
    wheelhouse = Wheelhouse(tmp_path / "cache", find_links=[local], no_index=True,
                            opbox_wheel=local / "alpha-1.0-py3-none-any.whl")
    lines: list[str] = []
    with pytest.raises(BuildError) as info:
        wheelhouse.requirement_wheels(requirements, log=lines.append)
    assert "No matching distribution found for no-such-package-opbox-test" in info.value.log
    assert not list((tmp_path / "cache" / "requirements").iterdir())  # no half-filled cache entry
    requirements.write_text("alpha==1.0\n")
    got = wheelhouse.requirement_wheels(requirements)
    assert sorted(p.name for p in got.glob("*.whl")) == ["alpha-1.0-py3-none-any.whl"]
    assert wheelhouse.requirement_wheels(requirements) == got  # cached
