"""Push an image from an OCI layout to a registry (the distribution spec's push API).

For each blob: HEAD (skip what the registry has), else POST an upload and PUT the whole
blob in one request (monolithic upload); then PUT the manifest under its OCI media type.
Authentication follows the registry's 401 challenge: Basic with the given credentials,
or the token flow (GET the realm with Basic credentials, then Bearer). HTTPS unless
`plain_http` is asked for; every socket operation has a timeout.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urljoin, urlsplit

from kiln.core.errors import KilnError
from kiln.core.progress import Progress, human_size
from kiln.oci.layout import MEDIA_MANIFEST, NAME_RE, TAG_RE, Descriptor, Layout

DEFAULT_TIMEOUT = 30.0
USER_AGENT = "kiln-oci-push"
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class RegistryRefused(KilnError):
    """The registry answered, but said no (authentication, permission, bad content)."""


class RegistryUnreachable(KilnError):
    """No answer from the registry: nothing listening, no route, TLS failure or timeout."""


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]
    repository: str  # kiln/admin
    tag: str | None

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")


def parse_reference(ref: str) -> Reference:
    """HOST[:PORT]/NAME[:TAG]. The registry is required: Kiln never guesses docker.io."""
    if "@" in ref:
        raise KilnError(f"reference '{ref}': push to a tag, not a digest")
    host, slash, rest = ref.partition("/")
    if not slash or not rest or not _HOST_RE.match(host) or not ("." in host or ":" in host or host == "localhost"):
        raise KilnError(
            f"reference '{ref}' does not start with a registry",
            hint="write HOST[:PORT]/NAME[:TAG], e.g. 127.0.0.1:5000/kiln/admin:1",
        )
    name, colon, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    if not NAME_RE.match(name):
        raise KilnError(f"reference '{ref}': invalid repository name '{name}' (lower-case path components)")
    if colon and not TAG_RE.match(tag):
        raise KilnError(f"reference '{ref}': invalid tag '{tag}'")
    return Reference(host, name, tag or None)


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


@dataclass
class PushResult:
    reference: Reference
    digest: str
    size: int
    pushed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"reference": str(self.reference), "digest": self.digest, "size": self.size,
                "pushed": self.pushed, "skipped": self.skipped}


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


Body = Callable[[], "bytes | IO[bytes] | None"]


class _Client:
    """HTTP(S) to one registry, answering its authentication challenges as they come."""

    def __init__(self, registry: str, plain_http: bool, credentials: Credentials | None, timeout: float) -> None:
        self.registry = registry
        self.scheme = "http" if plain_http else "https"
        self.credentials = credentials
        self.timeout = timeout
        self.authorization: str | None = None
        self._tls = None if plain_http else ssl.create_default_context()  # honours SSL_CERT_FILE

    def _send(self, method: str, url: str, body: Body, headers: Mapping[str, str]) -> _Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryRefused(f"registry {self.registry} sent an unusable URL: {url!r}")
        if parts.scheme == "http" and self._tls is not None:
            raise RegistryRefused(f"registry {self.registry} sent us to plain HTTP ({url}) without --plain-http")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout,
                                               context=self._tls or ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path or "/", body=body(), headers={"User-Agent": USER_AGENT, **headers})
            resp = conn.getresponse()
            data = resp.read(1 << 20) if method != "HEAD" else b""
            return _Response(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, data)
        except ssl.SSLError as e:
            raise RegistryUnreachable(
                f"registry {parts.netloc}: TLS failed: {e.reason or e}",
                hint="for a registry that serves plain HTTP, pass --plain-http",
            ) from None
        except TimeoutError:
            raise RegistryUnreachable(
                f"registry {parts.netloc} is unreachable: no answer within {self.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise RegistryUnreachable(
                f"registry {parts.netloc} is unreachable: {detail}", hint="is it running, and is the address right?"
            ) from None
        finally:
            conn.close()

    def request(self, method: str, url: str, scope: str, body: Body = lambda: None,
                headers: Mapping[str, str] | None = None) -> _Response:
        """One request; on a 401 challenge, authenticate once and send it again."""
        url = urljoin(f"{self.scheme}://{self.registry}/", url)
        hdrs = dict(headers or {})
        for attempt in range(2):
            auth = {"Authorization": self.authorization} if self.authorization else {}
            resp = self._send(method, url, body, {**hdrs, **auth})
            if resp.status != 401 or attempt == 1:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            if not self._authenticate(challenge, scope, resp):
                return resp
        raise AssertionError("unreachable")

    def refused(self, what: str, resp: _Response, detail: str = "") -> RegistryRefused:
        error = refused(self.registry, what, resp, detail, with_credentials=self.credentials is not None)
        if self.scheme == "http" and resp.status == 400 and b"HTTPS" in resp.body:
            error.hint = "the registry serves HTTPS: leave out --plain-http"
        return error

    def _authenticate(self, challenge: str, scope: str, resp: _Response) -> bool:
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE_RE.findall(challenge))
        if scheme == "basic":
            if self.credentials is None or self.authorization == self.credentials.basic():
                return False
            self.authorization = self.credentials.basic()
            return True
        if scheme == "bearer" and "realm" in params:
            self.authorization = "Bearer " + self._token(params, scope)
            return True
        raise self.refused("authentication", resp, f"unsupported challenge {challenge!r}")

    def _token(self, params: Mapping[str, str], scope: str) -> str:
        scopes = [scope] + ([params["scope"]] if params.get("scope") and params["scope"] != scope else [])
        query = urlencode([("service", params.get("service", "")), *(("scope", s) for s in scopes)])
        realm = params["realm"]
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        resp = self._send("GET", f"{realm}{'&' if '?' in realm else '?'}{query}", lambda: None, headers)
        if resp.status != 200:
            raise self.refused(f"a token from {urlsplit(realm).netloc}", resp)
        try:
            doc = json.loads(resp.body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryRefused(f"token server {urlsplit(realm).netloc} sent no token for registry {self.registry}")
        return token


def _registry_message(body: bytes) -> str:
    """The distribution spec's error body ({"errors": [{"code", "message"}]}), as one line."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError, TypeError):
        return body.decode(errors="replace").strip()[:200]


def refused(
    registry: str, what: str, resp: _Response, detail: str = "", with_credentials: bool = False
) -> RegistryRefused:
    message = detail or _registry_message(resp.body)
    hint = {
        401: "check the user name and password" if with_credentials
        else "pass --user USER (and --password-stdin) with credentials this registry accepts",
        403: "these credentials may not push to this repository",
    }.get(resp.status)
    return RegistryRefused(
        f"registry {registry} refused {what}: {resp.status} {resp.reason}" + (f" ({message})" if message else ""),
        hint=hint,
    )


def _push_blob(client: _Client, ref: Reference, scope: str, desc: Descriptor, path: Path) -> bool:
    """Upload one blob unless the registry has it; returns whether it was sent."""
    name = ref.repository
    head = client.request("HEAD", f"/v2/{name}/blobs/{desc.digest}", scope)
    if head.status in (200, 301, 302, 307):
        return False
    if head.status != 404:
        raise client.refused(f"checking blob {desc.digest[:19]}", head)
    start = client.request("POST", f"/v2/{name}/blobs/uploads/", scope, headers={"Content-Length": "0"})
    location = start.headers.get("location")
    if start.status != 202 or not location:
        raise client.refused(f"starting the upload of {desc.digest[:19]} to {name}", start)
    location += ("&" if "?" in location else "?") + urlencode({"digest": desc.digest})
    with path.open("rb") as f:
        def body() -> IO[bytes]:
            f.seek(0)
            return f

        put = client.request("PUT", location, scope, body,
                             {"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
    if put.status != 201:
        raise client.refused(f"blob {desc.digest[:19]}", put)
    return True


def push(
    layout_dir: Path, reference: str, *, plain_http: bool = False, credentials: Credentials | None = None,
    timeout: float = DEFAULT_TIMEOUT, progress: Progress | None = None,
) -> PushResult:
    """Push the layout's image (the only one, or the one tagged like `reference`) to
    `reference`; a reference without a tag takes the image's own tag."""
    progress = progress or Progress(quiet=True)
    ref = parse_reference(reference)
    layout = Layout(layout_dir)
    image = layout.select(None if len(layout.manifests) == 1 else ref.tag)
    tag = ref.tag or image.tag or "latest"
    if not TAG_RE.match(tag):
        raise KilnError(f"{layout_dir}: image tag '{tag}' cannot be a registry tag; give one in the reference")
    ref = Reference(ref.registry, ref.repository, tag)
    manifest = layout.read_blob(image.descriptor)
    client = _Client(ref.registry, plain_http, credentials, timeout)
    scope = f"repository:{ref.repository}:pull,push"
    ping = client.request("GET", "/v2/", scope)  # authenticates once, up front, like docker does
    if ping.status != 200:
        raise client.refused("access to its v2 API", ping)
    result = PushResult(ref, image.descriptor.digest, image.descriptor.size)
    for desc in (*image.layers, image.config_descriptor):
        layout.verify_blob(desc)
        if _push_blob(client, ref, scope, desc, layout.blob_path(desc.digest)):
            result.pushed.append(desc.digest)
            progress.say(f"pushed {desc.digest[:19]} ({human_size(desc.size)})")
        else:
            result.skipped.append(desc.digest)
            progress.say(f"exists {desc.digest[:19]}")
    resp = client.request("PUT", f"/v2/{ref.repository}/manifests/{tag}", scope, lambda: manifest,
                          {"Content-Type": MEDIA_MANIFEST, "Content-Length": str(len(manifest))})
    if resp.status != 201:
        raise client.refused(f"the manifest for {ref}", resp)
    echoed = resp.headers.get("docker-content-digest")
    if echoed and echoed != image.descriptor.digest:
        raise RegistryRefused(f"registry {ref.registry} stored the manifest as {echoed}, not {image.descriptor.digest}")
    progress.say(f"pushed {ref}@{image.descriptor.digest}")
    return result
