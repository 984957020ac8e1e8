"""A real container registry for tests: Debian's `docker-registry` (distribution 2.8).

    exe = require_registry()                     # installs the package as root, else skips (fails under CI)
    with run_registry(auth=True) as reg:         # False: open; True/"htpasswd": basic; "token": bearer
        subprocess.run(["podman", "push", "--tls-verify=false", "--creds", reg.creds, src, f"{reg.host}/x:t"])
        RegistryClient(insecure_hosts={reg.host}, auth_file=reg.write_auth_file(tmp / "auth.json"))

It listens on 127.0.0.1 on a free port, over plain http, keeps its blobs in a temp folder
and stops on exit. With ``auth="token"`` a small token server (a starlette app in a thread)
issues RS256 JWTs signed with a throwaway self-signed certificate the registry trusts: the
test user gets every action it asks for, anyone else none.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import yaml

from conftest import require
from servers import serve_app, stop_process

PACKAGE = "docker-registry"
INSTALL_HINT = f"install Debian's `{PACKAGE}` package (scripts/setup-podman.sh does, as root)"
SERVICE = "opbox-test-registry"
ISSUER = "opbox-test-issuer"


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT, the registry part of image references
    url: str
    username: str | None = None
    password: str | None = None
    token_requests: list[dict] = field(default_factory=list)  # (auth="token") what the token server was asked

    @property
    def creds(self) -> str:
        """``user:password`` for ``podman push --creds``."""
        return f"{self.username}:{self.password}"

    def write_auth_file(self, path: Path, password: str | None = None) -> Path:
        """A docker-style config.json with this registry's credentials (``password`` overrides)."""
        auths = {}
        if self.username is not None:
            secret = f"{self.username}:{password if password is not None else self.password}"
            auths[self.host] = {"auth": base64.b64encode(secret.encode()).decode()}
        path.write_text(json.dumps({"auths": auths}))
        return path


def find_registry() -> str | None:
    """The registry binary: $OPBOX_REGISTRY_BIN or `docker-registry` on PATH."""
    return shutil.which(os.environ.get("OPBOX_REGISTRY_BIN", PACKAGE))


def require_registry() -> str:
    """`find_registry()`, installing the package first when missing and root; else end the test
    (a failure under CI=true, a skip otherwise)."""
    exe = find_registry()
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install(PACKAGE)
        _stop_system_service()
        exe = find_registry()
    require(exe is not None, f"the `{PACKAGE}` binary is missing: {INSTALL_HINT}")
    return exe


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    run = dict(env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if subprocess.run(cmd, **run).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], **run)
        subprocess.run(cmd, **run)


def _stop_system_service() -> None:
    """The package's postinst starts a registry on :5000 under systemd or a sysv runlevel: stop it."""
    quiet = dict(stdin=subprocess.DEVNULL, capture_output=True)
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", f"{PACKAGE}.service"], **quiet)
    elif Path(f"/etc/init.d/{PACKAGE}").exists():
        if subprocess.run([f"/etc/init.d/{PACKAGE}", "status"], **quiet).returncode == 0:
            subprocess.run([f"/etc/init.d/{PACKAGE}", "stop"], **quiet)
        subprocess.run(["update-rc.d", PACKAGE, "disable"], **quiet)


@contextmanager
def run_registry(auth: bool | Literal["htpasswd", "token"] = False, exe: str | None = None,
                 startup_timeout: float = 20.0) -> Iterator[Registry]:
    exe = exe or find_registry()
    if exe is None:
        raise FileNotFoundError(f"the `{PACKAGE}` binary is missing: {INSTALL_HINT}")
    mode = "htpasswd" if auth is True else (auth or None)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opbox-registry-")))
        username, password = ("opbox-test", secrets.token_urlsafe(12)) if mode else (None, None)
        registry = Registry(host="", url="", username=username, password=password)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(tmp / "data")}, "delete": {"enabled": True}},
            "http": {"secret": secrets.token_hex(16)},
        }
        if mode == "htpasswd":
            import bcrypt

            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            (tmp / "htpasswd").write_text(f"{username}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "opbox-test", "path": str(tmp / "htpasswd")}}
        elif mode == "token":
            key, cert_pem, cert_der = _self_signed()
            (tmp / "root.pem").write_bytes(cert_pem)
            app = _token_app(registry, key, cert_der)
            realm = stack.enter_context(serve_app(app)) + "/token"
            config["auth"] = {"token": {"realm": realm, "service": SERVICE, "issuer": ISSUER,
                                        "rootcertbundle": str(tmp / "root.pem")}}
        elif mode is not None:
            raise ValueError(f"auth must be a bool, 'htpasswd' or 'token', not {auth!r}")

        for attempt in range(3):  # a free port can be taken between choosing and binding it
            port = _free_port()
            config["http"]["addr"] = f"127.0.0.1:{port}"
            (tmp / "config.yml").write_text(yaml.safe_dump(config))
            log_path = tmp / f"registry-{attempt}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([exe, "serve", str(tmp / "config.yml")], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
            stack.callback(stop_process, proc)
            registry.host, registry.url = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
            if _wait_until_up(proc, registry.url, startup_timeout, log_path):
                break
        else:
            raise RuntimeError(f"{PACKAGE} did not start:\n{_tail(log_path)}")
        yield registry


def _wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> bool:
    """True once `GET /v2/` answers (200, or 401 with auth); False when it exited on a taken port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "address already in use" in _tail(log_path):
                return False
            raise RuntimeError(f"{PACKAGE} exited with code {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(url + "/v2/", timeout=1.0).status_code in (200, 401):
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{PACKAGE} did not answer on {url} within {timeout:.0f}s:\n{_tail(log_path)}")


def _token_app(registry: Registry, key, cert_der: bytes):
    """The token server of the registry's bearer flow (docker's token spec)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def token(request):
        scopes = request.query_params.getlist("scope")
        registry.token_requests.append({"service": request.query_params.get("service"), "scopes": scopes,
                                        "authorization": request.headers.get("authorization")})
        expected = "Basic " + base64.b64encode(registry.creds.encode()).decode()
        given = request.headers.get("authorization")
        if given is not None and given != expected:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED"}]}, status_code=401)
        access = []
        for scope in scopes if given else ():  # anonymous: a token that grants nothing
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": registry.username if given else "", "aud": SERVICE, "iat": now,
                  "nbf": now - 5, "exp": now + 300, "jti": secrets.token_hex(8), "access": access}
        return JSONResponse({"token": _jwt(key, cert_der, claims), "expires_in": 300})

    return Starlette(routes=[Route("/token", token)])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(key, cert_der: bytes, claims: dict) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def _self_signed():
    """An RSA key and a self-signed certificate for it (PEM for the registry, DER for x5c)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
