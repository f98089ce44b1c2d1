"""The API's routes: HTTP-shaped requests in, JSON responses out, no sockets here.

Kept apart from the transport (server.py) so the same routes serve the local Unix socket
and the mutual-TLS listener, and tests can call them directly. Every failure becomes an
ApiError with a status and a JSON body `{"error", "detail", "path"}`; handlers validate
everything before they write, so a rejected request leaves the datastore unchanged.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.host.api import grammar
from kiln.host.api.grammar import BadRequest
from kiln.host.datastore import DEFAULT_TX, Datastore, DatastoreError
from kiln.host.osinfo import os_release
from kiln.host.render.cache import RenderCache
from kiln.host.render.templates import Templates
from kiln.host.secureboot import SecureBootStatus
from kiln.host.secureboot import status as secure_boot_status
from kiln.host.settings.errors import InvalidSettings
from kiln.host.settings.keys import Tree, flatten, format_key, select, set_path, unflatten

if TYPE_CHECKING:
    from kiln.host.update.control import UpdateControl

# The model (msgspec) and the renderer (Jinja2, subprocess) load on the first write: a
# socket-activated server answers its first GET sooner without them.

MAX_BODY = 1 << 20
OPENAPI = Path(__file__).with_name("openapi.json")


class ApiError(Exception):
    def __init__(self, status: int, detail: str, path: str = "", allow: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.path = path
        self.allow = allow  # a 405's Allow header (RFC 9110 15.5.6)

    def body(self) -> dict[str, str]:
        return {"error": HTTPStatus(self.status).phrase, "detail": self.detail, "path": self.path}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    role: str = "admin"  # the local socket is admin; the TLS listener sets the client's role
    upgrade: str = ""  # the Upgrade header (`kiln-exec` for an exec session)

    @classmethod
    def from_target(cls, method: str, target: str, body: bytes = b"", role: str = "admin",
                    upgrade: str = "") -> Request:
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        return cls(method, url.path, query, body, role, upgrade)

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def json(self) -> Any:
        """The body as JSON by the document's rules (kiln.host.api.grammar): `42.0` is an integer."""
        return grammar.body_json(self.body)


@dataclass
class Response:
    status: int = 200
    body: Any = None
    after: Callable[[], None] | None = None  # runs once the response is sent (reboot)
    encoded: bytes | None = None  # the body already as JSON (the transport sends it as is)
    # With status 101: takes over the connection once the transport has switched protocols.
    upgrade: Callable[[socket.socket], None] | None = None
    allow: str | None = None  # the Allow header of a 405


def role_refusal(role: str, method: str, path: str) -> ApiError | None:
    """A reader may only GET (the transport asks before it reads a body, the routes again)."""
    if role != "admin" and method != "GET":
        return ApiError(403, f"role '{role}' may only read (GET); {method} {path} needs admin")
    return None


Handler = Callable[["Api", Request], Response]
ROUTES: dict[tuple[str, str], Handler] = {}


def route(method: str, path: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        ROUTES[(method, path)] = fn
        return fn

    return deco


class Api:
    """The routes' shared state: the datastore, the templates, and the action hooks."""

    def __init__(
        self,
        store: Datastore,
        *,
        templates: Templates | None = None,
        render_root: Path = Path("/"),
        os_release_path: Path = Path("/etc/os-release"),
        reboot: Callable[[], None] | None = None,
        restart: bool = True,
        apply_wait: float = 10.0,
        cache: RenderCache | None = None,
        updates: Callable[[], UpdateControl] | None = None,
        containers_state: Path = Path("/run/kiln/containers"),
        secure_boot: Callable[[], SecureBootStatus] = secure_boot_status,
    ) -> None:
        self.store = store
        self.templates = templates or Templates()
        self.render_root = render_root
        self.os_release_path = os_release_path
        self.reboot = reboot
        self.restart = restart  # off in tests that render the real variant's files
        self.apply_lock = threading.Lock()
        self.cache = cache  # the host's render cache (kiln.host.render.cache); None in tests
        self.apply_wait = apply_wait  # seconds an apply waits for the one running before 423
        self.encoded_live: tuple[Tree, bytes] | None = None  # GET /settings, per live version
        # Made on the first update request (kiln.host.update.control is not needed to serve
        # settings); None where updates are not available.
        self.update_factory = updates
        self.containers_state = containers_state  # the container manager's status files
        self.secure_boot = secure_boot  # this boot's verified chain, read per request (a few sysfs files)
        self._update_control: UpdateControl | None = None

    def handle(self, req: Request) -> Response:
        """Dispatch one request; never raises (a bug becomes a logged 500, not a dead server)."""
        try:
            handler = ROUTES.get((req.method, req.path))
            if handler is None:
                allowed = sorted(m for m, p in ROUTES if p == req.path)
                if allowed:
                    raise ApiError(405, f"{req.method} is not allowed on {req.path}", allow=", ".join(allowed))
                raise ApiError(404, f"no such endpoint: {req.path}")
            refused = role_refusal(req.role, req.method, req.path)
            if refused is not None:
                raise refused
            return handler(self, req)
        except ApiError as e:
            return Response(e.status, e.body(), allow=e.allow)
        except (InvalidSettings, BadRequest) as e:
            return Response(400, ApiError(400, e.detail, e.path).body())
        except DatastoreError as e:
            return Response(e.status, ApiError(e.status, e.detail, e.path).body())
        except Exception as e:
            import logging

            logging.getLogger("kiln.api").exception("internal error on %s %s", req.method, req.path)
            return Response(500, ApiError(500, f"internal error: {type(e).__name__}").body())

    def close(self) -> None:
        """Answer the requests held open (update long polls) now: a stopping server waits
        for every request in flight."""
        if self._update_control is not None:
            self._update_control.stopping.set()

    def updates(self) -> UpdateControl:
        if self.update_factory is None:
            raise ApiError(409, "updates are not available here")
        if self._update_control is None:
            self._update_control = self.update_factory()
        return self._update_control

    def visible(self, tree: Tree, role: str) -> Tree:
        """Settings as `role` may see them: a reader sees only what redact.READER_VISIBLE allows."""
        if role == "admin":
            return tree
        from kiln.host.api.redact import reader_view

        seen: Tree = reader_view(tree)
        return seen


def admin_only(req: Request, what: str) -> None:
    """Refuse a reader a GET whose answer is not the host's configuration but admins' business."""
    if req.role != "admin":
        raise ApiError(403, f"{what}: role '{req.role}' may not read this (admins only)")


def _keys(req: Request, name: str = "keys") -> list[tuple[str, ...]] | None:
    """`?keys=a,b` as key tuples without the leading `settings` (which is optional)."""
    raw = req.arg(name)
    return None if raw is None else grammar.key_list(raw, name)


def _tx(req: Request) -> str:
    """The transaction named by ?tx= (default: `default`); an empty name is refused, never
    taken to mean the default one (DELETE /tx?tx= would discard it)."""
    tx = req.arg("tx")
    if tx is None:
        return DEFAULT_TX
    if not tx:
        raise ApiError(400, "?tx= names no transaction (leave it out for the default one)", "tx")
    return tx


def _filter(tree: Tree, req: Request) -> Tree:
    keys = _keys(req)
    if keys is not None:
        return tree if () in keys else select(tree, keys)  # `settings` alone: everything
    prefix = req.arg("prefix")
    if prefix:
        # A string prefix on the dotted key, as Bottlerocket does: ?prefix=settings.net → network.
        p = "" if prefix == "settings" else prefix.removeprefix("settings.")
        return unflatten((path, v) for path, v in flatten(tree) if format_key(path).startswith(p))
    return tree


# -- settings and transactions ----------------------------------------------------------


@route("GET", "/settings")
def get_settings(api: Api, req: Request) -> Response:
    live = api.store.live_shared()
    if req.role == "admin" and not req.query:  # the common case: encode each version once
        cached = api.encoded_live
        if cached is None or cached[0] is not live:
            cached = api.encoded_live = (live, json.dumps(live).encode() + b"\n")
        return Response(200, live, encoded=cached[1])
    return Response(200, api.visible(_filter(live, req), req.role))


@route("PATCH", "/settings")
def patch_settings(api: Api, req: Request) -> Response:
    body = req.json()
    if isinstance(body, dict) and set(body) == {"settings"}:
        body = body["settings"]  # accept the user-data shape too
    api.store.patch(body, _tx(req))
    return Response(204)


@route("DELETE", "/settings")
def delete_settings(api: Api, req: Request) -> Response:
    """Remove named entries (`?keys=containers.web`) and apply at once: there is no
    transaction for a removal, the way a stopped container has no pending state."""
    keys = _keys(req)
    if not keys:
        raise ApiError(400, "name the entries to remove: ?keys=containers.NAME,...", "keys")
    with _applying(api):
        changed = api.store.remove(list(dict.fromkeys(keys)))  # a key named twice is removed once
        return Response(200, {"changed": [format_key(k) for k in changed], "apply": _apply(api, changed)})


@route("PATCH", "/settings/keypair")
def patch_keypair(api: Api, req: Request) -> Response:
    body = req.json()
    pairs = body.get("request_payload") if isinstance(body, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
        raise ApiError(400, 'expected {"request_payload": ["KEY=VALUE", ...]}', "request_payload")
    api.store.patch(keypairs_to_tree(pairs), _tx(req))
    return Response(204)


def keypairs_to_tree(pairs: list[str]) -> Tree:
    """`KEY=VALUE` strings → a settings tree. VALUE is JSON when that fits the model, else a string.

    `seed=42` gives an int and `hostname=42` the string "42": each value is tried typed first and
    kept as a string when the model refuses the typed form.
    """
    tree: Tree = {}
    for pair in pairs:
        path, raw = grammar.keypair(pair)
        value: Any = raw
        try:
            typed = grammar.loads(raw)
        except ValueError:
            pass
        else:
            if _fits(path, typed) or not _fits(path, raw):
                value = typed  # when neither fits, the typed value's error is the one to report
        set_path(tree, path, value)
    return tree


def _fits(path: tuple[str, ...], value: Any) -> bool:
    from kiln.host.settings.model import validate

    probe: Tree = {}
    set_path(probe, path, value)
    try:
        validate(probe)
    except InvalidSettings:
        return False
    return True


@route("GET", "/tx")
def get_tx(api: Api, req: Request) -> Response:
    admin_only(req, "pending transactions are admins' drafts")
    return Response(200, api.store.pending(_tx(req)))


@route("DELETE", "/tx")
def delete_tx(api: Api, req: Request) -> Response:
    tx = _tx(req)
    if not api.store.discard(tx):
        raise ApiError(404, f"transaction '{tx}' has nothing pending", "tx")
    return Response(204)


@route("GET", "/tx/list")
def list_tx(api: Api, req: Request) -> Response:
    admin_only(req, "pending transactions are admins' drafts")
    return Response(200, api.store.transactions())


@route("POST", "/tx/commit")
def commit(api: Api, req: Request) -> Response:
    return Response(200, [format_key(k) for k in api.store.commit(_tx(req))])


@contextlib.contextmanager
def _applying(api: Api) -> Iterator[None]:
    # Wait briefly: concurrent writers queue up instead of spinning on 423.
    if not api.apply_lock.acquire(timeout=api.apply_wait):
        raise ApiError(423, "another apply is running; retry when it finishes")
    try:
        yield
    finally:
        api.apply_lock.release()


def _apply(api: Api, keys: list[tuple[str, ...]] | None) -> dict[str, Any]:
    from kiln.host.render.apply import apply

    return apply(
        api.store, keys, templates=api.templates, root=api.render_root, restart=api.restart, cache=api.cache
    ).to_json()


@route("POST", "/tx/apply")
def apply_keys(api: Api, req: Request) -> Response:
    keys = _keys(req)
    with _applying(api):
        return Response(200, _apply(api, None if keys is None else [("settings", *k) for k in keys]))


@route("POST", "/tx/commit_and_apply")
def commit_and_apply(api: Api, req: Request) -> Response:
    with _applying(api):  # before the commit: a 423 must leave the store as it was
        changed = api.store.commit(_tx(req))
        return Response(200, {"changed": [format_key(k) for k in changed], "apply": _apply(api, changed)})


# -- read-only views ---------------------------------------------------------------------


@route("GET", "/os")
def get_os(api: Api, req: Request) -> Response:
    info: dict[str, Any] = dict(os_release(api.os_release_path))
    info["secure_boot"] = api.secure_boot().to_json()
    prefix = req.arg("prefix") or ""
    return Response(200, {k: v for k, v in info.items() if k.startswith(prefix)})


def _by_key(req: Request, table: dict[str, Any], resolve: Callable[[tuple[str, ...]], Any]) -> dict[str, Any]:
    keys = _keys(req)
    if keys is None:
        return table
    return {format_key(("settings", *k)): resolve(("settings", *k)) for k in keys}


@route("GET", "/metadata/affected-services")
def affected_services(api: Api, req: Request) -> Response:
    d = api.store.definitions()
    return Response(200, _by_key(req, d.affected_services, lambda k: d.services_for([k])))


@route("GET", "/metadata/setting-generators")
def setting_generators(api: Api, req: Request) -> Response:
    return Response(200, api.store.definitions().setting_generators)


@route("GET", "/metadata/templates")
def templates(api: Api, req: Request) -> Response:
    d = api.store.definitions()
    every = {name: cf.template_path for name, cf in d.configuration_files.items()}

    def resolve(k: tuple[str, ...]) -> list[str]:
        return sorted({d.configuration_files[f].template_path for f in d.files_for(d.services_for([k]))})

    return Response(200, _by_key(req, every, resolve))


def _named(req: Request, table: dict[str, Any], what: str) -> dict[str, Any]:
    import msgspec

    names = req.arg("names")
    out = msgspec.to_builtins(table)
    if names is None:
        return dict(out)
    wanted = grammar.name_list(names)
    missing = [n for n in wanted if n not in table]
    if missing:
        raise ApiError(404, f"no such {what}: {', '.join(missing)}", "names")
    return {n: out[n] for n in wanted}


@route("GET", "/services")
def services(api: Api, req: Request) -> Response:
    return Response(200, _named(req, api.store.definitions().services, "service"))


@route("GET", "/configuration-files")
def configuration_files(api: Api, req: Request) -> Response:
    return Response(200, _named(req, api.store.definitions().configuration_files, "configuration file"))


@route("GET", "/openapi.json")
def openapi(api: Api, req: Request) -> Response:
    return Response(200, json.loads(OPENAPI.read_text()))


@route("POST", "/actions/reboot")
def reboot(api: Api, req: Request) -> Response:
    if api.reboot is None:
        raise ApiError(409, "reboot is not available here")
    return Response(202, {"rebooting": True}, after=api.reboot)


# The update routes live in their own module and register themselves on ROUTES.
from kiln.host.api import containers as _containers  # noqa: E402,F401
from kiln.host.api import updates as _updates  # noqa: E402,F401
