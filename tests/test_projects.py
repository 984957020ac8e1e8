"""Whole projects deploy (issue 13, item 5): package layouts, the deploy root, the entry imported at build
time, what is refused before any code is sent (lambdas, an interactive __main__, GPUs the machine has not),
and Image() on the local backend. Against a real platform on loopback; the GPU tests put a fake nvidia-smi
on the platform's PATH (this machine has no GPU)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

from opbox import BuildError, Image, Jobs, Resource, ValidationError, operator
from opbox.project import find_root, source_of
from platform_fixture import OPBOX, running_platform


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def make_wheel(dest: Path, name: str, version: str, body: str) -> Path:
    """A pure-Python wheel written by hand (no build backend, no network)."""
    files = {
        f"{name}/__init__.py": body,
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: opbox-tests\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


TRAIN = """
    import json

    from opbox import operator
    from myproj.utils import double


    @operator()
    def train(x):
        import {dep}
        return double(x) + {dep}.ANSWER


    if __name__ == "__main__":
        remote = train.deploy(quiet=True)
        print(json.dumps({{"result": remote(4), "job": remote.name}}))
"""


def package_project(root: Path, dep: str, wheel: Path, *, via: str) -> Path:
    """myproj/jobs/train.py importing myproj.utils; its requirement in requirements.txt or pyproject.toml."""
    files = {
        "myproj/__init__.py": "",
        "myproj/utils.py": "def double(x):\n    return 2 * x\n",
        "myproj/jobs/__init__.py": "",
        "myproj/jobs/train.py": TRAIN.format(dep=dep),
        "README.md": "a project\n",
    }
    if via == "requirements.txt":
        files["requirements.txt"] = f"{dep} @ {wheel.as_uri()}\n"
    else:
        files["pyproject.toml"] = f"""
            [project]
            name = "myproj"
            version = "0.1"
            dependencies = ["{dep} @ {wheel.as_uri()}"]
        """
    return write_tree(root, files)


def client_env(plat) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPBOX_")}
    return {**env, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}


@pytest.mark.parametrize("via", ["pyproject.toml", "requirements.txt"])
def test_a_package_project_run_as_a_module_deploys_and_its_calls_work(plat, tmp_path, via):
    dep = f"obxproj_{via.split('.')[0]}"
    wheel = make_wheel(tmp_path / "wheels", dep, "1.0", "ANSWER = 100\n")
    root = package_project(tmp_path / "proj", dep, wheel, via=via)
    done = subprocess.run([sys.executable, "-m", "myproj.jobs.train"], cwd=root, env=client_env(plat),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"result": 108, "job": "train"}
    version = plat.client().get("/job/train/versions").json()["versions"][0]
    assert version["entry"] == "myproj.jobs.train:train"
    log = plat.client().get(f"/job/train/build-log?version={version['version']}").text
    expected = "requirements.txt" if via == "requirements.txt" else "pyproject.toml [project] dependencies"
    assert f"installing {expected}" in log and "importing myproj.jobs.train:train" in log


def test_a_class_of_a_package_is_served_with_its_project(client, tmp_path):
    root = write_tree(tmp_path / "svcproj", {
        ".git/HEAD": "ref: refs/heads/main\n",  # a repository's root is a project root too
        "svcpkg/__init__.py": "", "svcpkg/utils.py": "def double(x):\n    return 2 * x\n",
        "svcpkg/models/__init__.py": "",
        "svcpkg/models/scaler.py": """
            from opbox import operator
            from svcpkg.utils import double

            @operator()
            class Scaler:
                def scale(self, x):
                    return double(x)
        """,
    })
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("svcpkg.models.scaler")
        service = mod.Scaler.deploy(client=client, quiet=True)
        assert service.scale(21) == 42
        versions = client.get("/job/Scaler/versions").json()["versions"]
        assert versions[0]["entry"] == "svcpkg.models.scaler:Scaler"
        service.delete()
    finally:
        sys.path.remove(str(root))
        for name in ("svcpkg", "svcpkg.utils", "svcpkg.models", "svcpkg.models.scaler"):
            sys.modules.pop(name, None)


def test_root_finding_and_entries(tmp_path):
    root = write_tree(tmp_path / "proj", {"setup.cfg": "", "pkg/__init__.py": "", "pkg/sub/__init__.py": "",
                                          "pkg/sub/mod.py": "def f():\n    return 1\n", "single/main.py": "def g(): pass\n",
                                          "src/lib/__init__.py": "", "src/lib/mod.py": "def h(): pass\n"})
    assert find_root(root / "pkg" / "sub") == root
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "single"))
    sys.path.insert(0, str(root / "src"))
    try:
        mod = importlib.import_module("pkg.sub.mod")
        assert source_of(mod.f) == (root, "pkg.sub.mod:f")
        with pytest.raises(ValidationError, match="give the folder pkg is imported from as the root"):
            source_of(mod.f, root=root / "pkg")  # imported as pkg.sub.mod: from pkg/ it would be sub.mod
        main = importlib.import_module("main")
        assert source_of(main.g) == (root / "single", "main:g")  # a single file: its own folder, as always
        assert source_of(main.g, root=root) == (root, "single.main:g")
        lib = importlib.import_module("lib.mod")
        with pytest.raises(ValidationError, match=r"deploy with root=.*src"):  # src layout: said, not guessed
            source_of(lib.h)
        assert source_of(lib.h, root=root / "src") == (root / "src", "lib.mod:h")
    finally:
        for name in ("pkg", "pkg.sub", "pkg.sub.mod", "main", "lib", "lib.mod"):
            sys.modules.pop(name, None)
        for folder in (root, root / "single", root / "src"):
            sys.path.remove(str(folder))


def test_cli_deploys_a_package_module_by_path_with_and_without_root(plat, tmp_path):
    wheel = make_wheel(tmp_path / "wheels", "obxclidep", "1.0", "ANSWER = 1\n")
    root = package_project(tmp_path / "proj", "obxclidep", wheel, via="requirements.txt")
    env = client_env(plat)
    done = subprocess.run([*OPBOX, "deploy", "myproj/jobs/train.py:train", "--name", "clitrain", "--json"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert plat.client().get("/job/clitrain/versions").json()["versions"][0]["entry"] == "myproj.jobs.train:train"
    # a namespace package (no __init__.py): --root says where the project is
    (root / "myproj" / "__init__.py").unlink()
    (root / "myproj" / "jobs" / "__init__.py").unlink()
    done = subprocess.run([*OPBOX, "deploy", str(root / "myproj/jobs/train.py") + ":train", "--name", "clins",
                           "--root", str(root), "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    from opbox import Operator

    assert Operator.from_job("clins", client=plat.client())(5) == 11


def test_deploy_help_shows_root():
    done = subprocess.run([*OPBOX, "deploy", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--root DIRECTORY" in done.stdout and "pyproject.toml" in done.stdout


def test_an_entry_that_cannot_be_imported_fails_the_deploy_with_the_error(client, user_code):
    mod = user_code("""
        from opbox import operator
        from local_only_helpers import scale  # here, but left out of the upload by .opboxignore


        @operator()
        def scaled(x):
            return scale(x)
    """, files={"local_only_helpers.py": "def scale(x):\n    return 3 * x\n",
                ".opboxignore": "local_only_helpers.py\n"})
    with pytest.raises(BuildError) as failed:
        mod.scaled.deploy(client=client, quiet=True)
    assert f"the entry {mod.__name__}:scaled cannot be imported" in str(failed.value)
    assert "No module named 'local_only_helpers'" in failed.value.log
    assert f'File "{mod.__name__}.py"' in failed.value.log  # the user's file, as in their project
    version = Jobs("scaled", client).versions()[0]
    assert version["status"] == "failed"
    with pytest.raises(Exception, match="no ready version"):
        Jobs("scaled", client).trigger()


def test_lambdas_and_interactive_main_functions_are_refused_before_upload(client, tmp_path, monkeypatch):
    uploads_before = client.get("/jobs").json()["jobs"]
    with pytest.raises(ValidationError, match="use def") as refused:
        operator()(lambda x: x).deploy(client=client, quiet=True)
    assert "lambda" in str(refused.value)
    # a notebook's cell: a function of __main__ compiled from a file, in a session whose __main__ has no file
    cell = tmp_path / "ipykernel_1" / "cell.py"
    cell.parent.mkdir()
    cell.write_text("def predict(x):\n    return x\n")
    namespace = {"__name__": "__main__"}
    exec(compile(cell.read_text(), str(cell), "exec"), namespace)
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    with pytest.raises(ValidationError, match=r'interactive session.*opbox\.deploy\("mymodule:predict"\)'):
        operator()(namespace["predict"]).deploy(client=client, quiet=True)
    assert client.get("/jobs").json()["jobs"] == uploads_before


def test_gpu_without_a_gpu_is_refused_or_falls_back_with_a_warning(client, user_code, capsys):
    assert not any(Path(p, "nvidia-smi").exists() for p in os.environ["PATH"].split(os.pathsep))
    mod = user_code("""
        import os
        from opbox import Resource, operator

        @operator(resource=Resource(gpu_count=1))
        def on_gpu():
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        @operator(resource=Resource(gpu="nvidia-tesla-t4", allow_cpu_fallback=True))
        def maybe_gpu():
            return os.environ.get("CUDA_VISIBLE_DEVICES")
    """)
    with pytest.raises(ValidationError, match="allow_cpu_fallback=True") as refused:
        mod.on_gpu.deploy(client=client, quiet=True)
    assert "asks for 1 GPU" in str(refused.value) and "GPUs here: none" in str(refused.value)
    with pytest.raises(Exception, match="no job"):
        client.get("/job/on_gpu")  # refused before any version was made
    # refused at the upload slot already: no code is sent
    with pytest.raises(ValidationError, match="asks for 1 GPU"):
        client.post("/uploads", json={"sha256": "0" * 64, "size": 10, "resource": {"gpu_count": 1}})
    remote = mod.maybe_gpu.deploy(client=client)
    err = capsys.readouterr().err
    assert "warning: the job asks for 1 GPU of type 'nvidia-tesla-t4'" in err and "runs on the CPU" in err
    assert remote() == ""  # no GPU to see


FAKE_NVIDIA_SMI = """#!/bin/sh
# what `nvidia-smi --query-gpu=index,uuid,name --format=csv,noheader` prints on a machine with three GPUs
[ "$1" = "--query-gpu=index,uuid,name" ] && [ "$2" = "--format=csv,noheader" ] || exit 9
echo "0, GPU-11111111-aaaa, Tesla T4"
echo "1, GPU-22222222-bbbb, NVIDIA A100-SXM4-40GB"
echo "2, GPU-33333333-cccc, Tesla T4"
"""


def test_gpus_found_by_nvidia_smi_are_granted_as_cuda_visible_devices(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    for isolation in ("worker", "run"):
        with running_platform(tmp_path / f"home-{isolation}", extra_env={**env, "OPBOX_ISOLATION": isolation}) as plat:
            client = plat.client()
            folder = write_tree(tmp_path / f"gpujobs_{isolation}", {f"gpujobs_{isolation}.py": """
                import os
                from opbox import Resource, operator

                def devices():
                    return os.environ.get("CUDA_VISIBLE_DEVICES")

                two_t4 = operator(name="two_t4", resource=Resource(gpu="nvidia-tesla-t4", gpu_count=2))(devices)
                one_a100 = operator(name="one_a100", resource=Resource(gpu="nvidia-a100", gpu_count=1))(devices)
                any_one = operator(name="any_one", resource=Resource(gpu_count=1))(devices)
                three_t4 = operator(name="three_t4", resource=Resource(gpu="Tesla-T4", gpu_count=3))(devices)
            """})
            sys.path.insert(0, str(folder))
            try:
                mod = importlib.import_module(f"gpujobs_{isolation}")
                assert mod.two_t4.deploy(client=client, quiet=True)() == "0,2"
                assert mod.one_a100.deploy(client=client, quiet=True)() == "1"
                assert mod.any_one.deploy(client=client, quiet=True)() == "0"
                with pytest.raises(ValidationError, match=r"asks for 3 GPUs of type 'Tesla-T4'.* has 2 that fit"):
                    mod.three_t4.deploy(client=client, quiet=True)
            finally:
                sys.path.remove(str(folder))
                sys.modules.pop(f"gpujobs_{isolation}", None)
                client.close()


def test_image_on_the_local_backend_takes_pip_and_refuses_the_rest(client, user_code, tmp_path):
    wheel = make_wheel(tmp_path / "wheels", "obxlocalpip", "2.0", "ANSWER = 7\n")
    mod = user_code(f"""
        from opbox import Image, operator

        @operator(image=Image(pip=["obxlocalpip @ {wheel.as_uri()}"]))
        def with_pip():
            import obxlocalpip
            return obxlocalpip.ANSWER

        @operator(image=Image(apt=["ffmpeg"]))
        def with_apt():
            return 1

        @operator(image=Image(base="nvidia/cuda:12.4.1-runtime-ubuntu22.04", run=["echo hi"]))
        def with_base():
            return 1
    """)
    assert mod.with_pip.deploy(client=client, quiet=True)() == 7
    with pytest.raises(ValidationError, match=r"local backend .* cannot honour Image\(apt=\('ffmpeg',\)\)"):
        mod.with_apt.deploy(client=client, quiet=True)
    with pytest.raises(ValidationError, match=r"cannot honour Image\(base='nvidia/cuda:12.4.1-runtime-ubuntu22.04', "
                                              r"run=\('echo hi',\)\).*container or kubernetes backend"):
        mod.with_base.deploy(client=client, quiet=True)
    with pytest.raises(ValidationError, match="cannot honour"):  # the upload slot refuses it too
        client.post("/uploads", json={"sha256": "0" * 64, "size": 10, "image": {"apt": ["ffmpeg"]}})
    names = {j["name"] for j in client.get("/jobs").json()["jobs"]}
    assert "with_apt" not in names and "with_base" not in names


@pytest.mark.parametrize("bad, message", [
    (dict(apt=["ffmpeg; rm -rf /"]), "not a package name"),
    (dict(run=["echo a\nFROM scratch"]), "newline"),
    (dict(run=["echo a \\"]), "backslash"),
    (dict(pip=["--index-url http://evil"]), "pip options"),
    (dict(base="Not An Image"), "not an image reference"),
    (dict(apt="ffmpeg", pip=[1]), "list of strings"),
])
def test_image_is_validated_when_made(bad, message):
    with pytest.raises(ValidationError, match=message):
        Image(**bad)


def test_image_round_trips_and_is_frozen():
    image = Image(base="python:3.11-slim", apt=["ffmpeg", "ffmpeg", "libgl1=1.4.0-1"], pip=["numpy==2.1.0"],
                  run=["echo ok"])
    assert image.apt == ("ffmpeg", "libgl1=1.4.0-1")
    assert Image.from_dict(image.to_dict()) == image
    with pytest.raises(Exception):
        image.base = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="unknown field"):
        Image.from_dict({"apt": [], "conda": ["x"]})
    with pytest.raises(ValidationError, match="must be an opbox.Image"):
        operator(image={"apt": ["ffmpeg"]})
    assert Resource(allow_cpu_fallback=True).to_dict()["allow_cpu_fallback"] is True
