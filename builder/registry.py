"""Ask a container registry whether an image exists (OCI Distribution / Docker Registry HTTP API v2).

    with RegistryClient(insecure_hosts={"127.0.0.1:5000"}, auth_file="~/.docker/config.json") as reg:
        reg.exists("127.0.0.1:5000/opbox-ws-job:abc123def456")   # True or False

Authentication follows the registry's ``WWW-Authenticate`` challenge: ``Basic`` with the
credentials a docker-style auth file (docker's ``config.json``, podman's ``auth.json``) holds
for the host, or ``Bearer`` tokens from the challenge's realm, cached per (host, scope) until
they expire. Credential helpers (``credsStore``, ``credHelpers``) are not consulted.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Iterable

import httpx

from opbox.errors import ConfigError, RegistryError, ValidationError

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
DOCKER_HUB = "docker.io"
_API_HOST = {DOCKER_HUB: "registry-1.docker.io"}
_AUTH_KEYS = {DOCKER_HUB: (DOCKER_HUB, "index.docker.io", "registry-1.docker.io")}

# the docker/distribution reference grammar: [host[:port]/]component(/component)*[:tag][@digest]
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REMAINDER = re.compile(
    rf"(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)(?::(?P<tag>\w[\w.-]{{0,127}}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?")
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]*))')


def parse_reference(ref: str) -> tuple[str, str, str]:
    """``(registry_host, repository, tag)`` of an image reference, by docker's rules.

    The first component is the host when it has a ``.`` or a ``:``, is ``localhost`` or has
    capitals; else the host is ``docker.io`` (one-component names get ``library/``). No tag
    means ``latest``; with a digest, the digest stands in for the tag.
    """
    if not isinstance(ref, str) or not ref or ref != ref.strip():
        raise ValidationError(f"bad image reference {ref!r}")
    first, slash, rest = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        host = first
        if not _HOST.fullmatch(host):
            raise ValidationError(f"bad image reference {ref!r}: {host!r} is not a registry host[:port]")
    else:
        host, rest = DOCKER_HUB, ref
    m = _REMAINDER.fullmatch(rest)
    if m is None:
        raise ValidationError(f"bad image reference {ref!r}: expected [host[:port]/]name[:tag][@digest] "
                              "with a lowercase name")
    path = m["path"]
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(host) + 1 + len(path) > 255:
        raise ValidationError(f"bad image reference {ref!r}: the name is longer than 255 characters")
    return host, path, m["digest"] or m["tag"] or "latest"


class RegistryClient:
    """A small synchronous registry API client. ``insecure_hosts`` (``host[:port]``) are reached
    over plain http (like podman's ``--tls-verify=false``, kaniko's ``--insecure``), all others
    over https; ``auth_file`` is a docker-style ``config.json`` (None: anonymous)."""

    def __init__(self, insecure_hosts: Iterable[str] = (), auth_file: str | Path | None = None,
                 timeout: float = 30.0):
        self.insecure_hosts = frozenset(insecure_hosts)
        self.auth_file = Path(auth_file).expanduser() if auth_file is not None else None
        self._http = httpx.Client(timeout=timeout)
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def exists(self, ref: str) -> bool:
        """Whether the registry has a manifest for ``ref`` (HEAD ``/v2/<repo>/manifests/<tag>``).
        Raises ``RegistryError`` when it cannot tell (unreachable, unauthorized, any other answer)."""
        host, repo, tag = parse_reference(ref)
        scheme = "http" if host in self.insecure_hosts else "https"
        url = f"{scheme}://{_API_HOST.get(host, host)}/v2/{repo}/manifests/{tag}"
        scope = f"repository:{repo}:pull"
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}
        cached = self._tokens.get((host, scope))
        if cached and cached[1] > time.monotonic():
            headers["Authorization"] = f"Bearer {cached[0]}"
        answer = self._request("HEAD", url, host, headers=headers)
        if answer.status_code == 401:
            headers["Authorization"] = self._authorization(host, answer.headers.get("www-authenticate", ""), scope)
            answer = self._request("HEAD", url, host, headers=headers)
            if answer.status_code == 401:
                raise self._unauthorized(host)
        if answer.status_code == 200:
            return True
        if answer.status_code == 404:
            return False
        why = "denied access to" if answer.status_code == 403 else "gave an unexpected answer for"
        raise RegistryError(f"registry {host} {why} {repo}:{tag} (HTTP {answer.status_code})",
                            registry=host, status=answer.status_code)

    def push_token(self, host: str, repositories: Iterable[str]) -> tuple[str, float] | None:
        """A bearer token that may pull and push ``repositories`` of ``host`` and nothing else, asked of
        the registry's token server with this client's credentials, and its lifetime in seconds (the
        token server's choice); None when the registry hands out no tokens (Basic authentication or
        none). ``RegistryError`` when the token server refuses."""
        scheme = "http" if host in self.insecure_hosts else "https"
        answer = self._request("GET", f"{scheme}://{_API_HOST.get(host, host)}/v2/", host)
        challenge = answer.headers.get("www-authenticate", "") if answer.status_code == 401 else ""
        kind, _, rest = challenge.strip().partition(" ")
        params = {k.lower(): quoted if quoted is not None else bare for k, quoted, bare in _PARAM.findall(rest)}
        if kind.lower() != "bearer" or not params.get("realm"):
            return None
        query = [("scope", f"repository:{repo}:pull,push") for repo in dict.fromkeys(repositories)]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        answer = self._request("GET", params["realm"], host, params=query, auth=self.credentials(host),
                               follow_redirects=True)
        try:
            body = answer.json() if answer.status_code == 200 else {}
            token, expires_in = body.get("token") or body.get("access_token"), float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise RegistryError(f"the token server {params['realm']} of registry {host} gave no push token "
                                f"(HTTP {answer.status_code})", registry=host, status=answer.status_code)
        return token, expires_in

    def _authorization(self, host: str, challenge: str, scope: str) -> str:
        """The ``Authorization`` header that answers a ``WWW-Authenticate`` challenge."""
        scheme, _, rest = challenge.strip().partition(" ")
        params = {k.lower(): quoted if quoted is not None else bare for k, quoted, bare in _PARAM.findall(rest)}
        creds = self.credentials(host)
        if scheme.lower() == "basic":
            if creds is None:
                raise self._unauthorized(host)
            return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise RegistryError(f"registry {host} asks for an unsupported authentication: {challenge!r}",
                                registry=host, status=401)
        scope = params.get("scope") or scope
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        answer = self._request("GET", params["realm"], host, params=query, auth=creds, follow_redirects=True)
        if answer.status_code in (401, 403):
            raise self._unauthorized(host)
        try:
            body = answer.json() if answer.status_code == 200 else {}
            token, expires_in = body.get("token") or body.get("access_token"), float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise RegistryError(f"the token server {params['realm']} of registry {host} gave no token "
                                f"(HTTP {answer.status_code})", registry=host, status=answer.status_code)
        self._tokens[(host, scope)] = (token, time.monotonic() + max(expires_in - 5, 1))
        return f"Bearer {token}"

    def credentials(self, host: str) -> tuple[str, str] | None:
        """``(username, password)`` for ``host`` from the auth file's ``auths``, or None."""
        if self.auth_file is None:
            return None
        try:
            auths = json.loads(self.auth_file.read_text()).get("auths") or {}
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read the registry auth file {self.auth_file}: {exc}") from exc
        wanted = _AUTH_KEYS.get(host, (host,))
        # keys may be "host", "https://host", "https://index.docker.io/v1/" or podman's "host/namespace"
        keys = [k for k in auths if k.split("://", 1)[-1].split("/", 1)[0] in wanted]
        keys.sort(key=lambda k: "/" in k.split("://", 1)[-1].rstrip("/"))  # plain host keys first
        for key in keys:
            entry = auths[key] or {}
            if entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError as exc:
                    raise ConfigError(f"bad `auth` for {key} in {self.auth_file}: {exc}") from exc
                if sep:
                    return user, password
            if entry.get("username") and entry.get("password") is not None:
                return entry["username"], entry["password"]
        return None

    def _unauthorized(self, host: str) -> RegistryError:
        if self.credentials(host) is None:
            where = self.auth_file or "an auth file (RegistryClient(auth_file=...))"
            message = f"registry {host} needs credentials: add an `auths` entry for {host} to {where}"
        else:
            message = f"registry {host} rejected the credentials for it in {self.auth_file}"
        return RegistryError(message, registry=host, status=401)

    def _request(self, method: str, url: str, host: str, **kwargs) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry {host} is unreachable at {url}: {exc or type(exc).__name__}",
                                registry=host) from exc
