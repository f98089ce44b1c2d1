"""`kiln oci` (build, push, inspect OCI images) and `kiln registry serve` (a local registry).

`kiln.oci` is imported inside the commands, so the rest of the CLI does not pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError

ARGV_HELP = "a JSON array ('[\"/bin/sh\", \"-c\", \"...\"]') or a shell-quoted string"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("oci", help="build reproducible OCI images, push them to a registry, inspect them")
    osub = p.add_subparsers(dest="oci_command", required=True)

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        c = osub.add_parser(name, help=help, description=help)
        c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        c.set_defaults(func=func)
        return c

    build = command("build", "build an OCI image layout from an image spec (TOML) or a directory", cmd_build)
    build.add_argument("spec", nargs="?", type=Path, help="the image spec, e.g. variants/containers/admin.toml")
    build.add_argument("--from-dir", type=Path, metavar="DIR", help="build one layer of DIR as it is (no spec)")
    build.add_argument("--output", type=Path, required=True, metavar="DIR", help="the OCI layout to write (replaced)")
    build.add_argument("--tag", help="the image's tag (index.json ref name; default: the spec's, or latest)")
    cfg = build.add_argument_group("image config for --from-dir")
    cfg.add_argument("--name", default="", help="repository name recorded in the layout, e.g. kiln/tool")
    cfg.add_argument("--entrypoint", metavar="ARGV", help=ARGV_HELP)
    cfg.add_argument("--cmd", metavar="ARGV", help=ARGV_HELP)
    cfg.add_argument("--env", action="append", default=[], metavar="K=V", help="environment (repeatable)")
    cfg.add_argument("--workdir", default="", metavar="DIR", help="working directory")
    cfg.add_argument("--user", dest="run_user", default="", metavar="UID[:GID]", help="user to run as")
    cfg.add_argument("--label", action="append", default=[], metavar="K=V", help="config label (repeatable)")
    cfg.add_argument("--epoch", type=int, metavar="SECONDS", help="file mtimes and created time (default 0)")

    push = command("push", "push a layout's image to a registry and print its manifest digest", cmd_push)
    push.add_argument("layout", type=Path, help="an OCI image layout (kiln oci build --output)")
    push.add_argument("ref", help="HOST[:PORT]/NAME[:TAG] (default tag: the image's own)")
    push.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS (local registries only)")
    push.add_argument("--user", dest="login", metavar="USER[:PASS]", help="registry credentials")
    push.add_argument("--password-stdin", action="store_true", help="read --user's password from stdin")
    push.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per-request timeout (default 30)")

    inspect = command("inspect", "show a layout's image: digest, size, config, layers (blobs verified)", cmd_inspect)
    inspect.add_argument("layout", type=Path, help="an OCI image layout")
    inspect.add_argument("--tag", help="which image, when the layout holds more than one")

    r = sub.add_parser("registry", help="a local container registry (docker-registry on 127.0.0.1)")
    rsub = r.add_subparsers(dest="registry_command", required=True)
    serve = rsub.add_parser("serve", help="run docker-registry in the foreground until Ctrl-C",
                            description="run docker-registry in the foreground until Ctrl-C")
    serve.add_argument("--dir", type=Path, help="storage and config directory (default: $KILN_CACHE/registry)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    serve.add_argument("--htpasswd", type=Path, metavar="FILE", help="require Basic auth against this file (bcrypt)")
    serve.add_argument("--json", action="store_true", help="print the address as one JSON object")
    serve.set_defaults(func=cmd_serve)


def _print_json(doc: Any) -> int:
    print(json.dumps(doc, indent=2))
    return 0


def _argv(value: str | None, flag: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if value.lstrip().startswith("["):
        try:
            doc = json.loads(value)
        except ValueError as e:
            raise KilnError(f"{flag}: not a JSON array: {e}") from None
        if not isinstance(doc, list) or not all(isinstance(a, str) for a in doc):
            raise KilnError(f"{flag}: expected a JSON array of strings")
        return tuple(doc)
    try:
        return tuple(shlex.split(value))
    except ValueError as e:
        raise KilnError(f"{flag}: {e}") from None


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, eq, val = v.partition("=")
        if not eq or not key:
            raise KilnError(f"{flag} '{v}': expected KEY=VALUE")
        out[key] = val
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from kiln.core.progress import Progress, human_size
    from kiln.oci import build
    from kiln.oci.layout import ImageConfig
    from kiln.oci.spec import image_path, load_spec, parse_env

    progress = Progress(quiet=args.json or not sys.stderr.isatty())
    if (args.spec is None) == (args.from_dir is None):
        raise KilnError("give either an image spec or --from-dir DIR")
    if args.spec is not None:
        extras = [f for f, v in (("--name", args.name), ("--entrypoint", args.entrypoint), ("--cmd", args.cmd),
                                 ("--env", args.env), ("--workdir", args.workdir), ("--user", args.run_user),
                                 ("--label", args.label), ("--epoch", args.epoch)) if v not in (None, "", [])]
        if extras:
            raise KilnError(f"{extras[0]} is for --from-dir; with a spec, set it in the spec's [config]")
        result = build.build_spec(load_spec(args.spec), args.output, tag=args.tag, progress=progress)
    else:
        if args.workdir and args.workdir != "/":
            image_path(args.workdir, "--workdir")
        config = ImageConfig(
            entrypoint=_argv(args.entrypoint, "--entrypoint"), cmd=_argv(args.cmd, "--cmd"),
            env=parse_env(_pairs(args.env, "--env"), "--env"), workdir=args.workdir, user=args.run_user,
            labels=_pairs(args.label, "--label"),
        )
        result = build.build_dir(args.from_dir, args.output, config, name=args.name, tag=args.tag or "latest",
                                 epoch=args.epoch, progress=progress)
    if args.json:
        return _print_json(result.to_json())
    size = sum(x.descriptor.size for x in result.layers)
    print(f"{result.output}: {result.name or '(no name)'}:{result.tag}")
    print(f"digest {result.digest}\nlayers {len(result.layers)}, {human_size(size)} compressed")
    return 0


def _credentials(args: argparse.Namespace) -> Any:
    from kiln.oci.push import Credentials

    if args.login is None:
        if args.password_stdin:
            raise KilnError("--password-stdin needs --user USER")
        return None
    user, colon, password = args.login.partition(":")
    if not user:
        raise KilnError("--user: empty user name")
    if args.password_stdin:
        if colon:
            raise KilnError("--user USER:PASS and --password-stdin both give a password; use one")
        password = sys.stdin.readline().rstrip("\r\n")
    elif not colon:
        if not sys.stdin.isatty():
            raise KilnError(f"--user {user}: no password", hint="use --user USER:PASS or --password-stdin")
        password = getpass.getpass(f"password for {user}: ")
    return Credentials(user, password)


def cmd_push(args: argparse.Namespace) -> int:
    from kiln.core.progress import Progress
    from kiln.oci.push import push

    progress = Progress(quiet=args.json or not sys.stderr.isatty())
    result = push(args.layout, args.ref, plain_http=args.plain_http, credentials=_credentials(args),
                  timeout=args.timeout, progress=progress)
    if args.json:
        return _print_json(result.to_json())
    print(result.digest)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kiln.core.progress import human_size, table
    from kiln.oci.layout import Layout

    layout = Layout(args.layout)
    image = layout.select(args.tag)
    for d in (*image.layers, image.config_descriptor):
        layout.verify_blob(d)
    runtime = image.config.get("config") or {}
    doc = {
        "layout": str(layout.root),
        "name": image.name,
        "tag": image.tag,
        "digest": image.descriptor.digest,
        "size": image.descriptor.size,
        "config": image.config_descriptor.digest,
        "architecture": image.config.get("architecture"),
        "os": image.config.get("os"),
        "created": image.config.get("created"),
        "entrypoint": runtime.get("Entrypoint"),
        "cmd": runtime.get("Cmd"),
        "env": runtime.get("Env"),
        "labels": runtime.get("Labels"),
        "layers": [{"digest": x.digest, "size": x.size, "media_type": x.media_type} for x in image.layers],
        "images": [{"tag": d.ref_name, "digest": d.digest} for d in layout.manifests],
    }
    if args.json:
        return _print_json(doc)
    print(f"image    {image.name or '(no name)'}:{image.tag or '(untagged)'}")
    print(f"digest   {image.descriptor.digest} ({image.descriptor.size} bytes)")
    print(f"platform {doc['os']}/{doc['architecture']}, created {doc['created']}")
    for key in ("entrypoint", "cmd", "env"):
        if doc[key]:
            print(f"{key:<8} {json.dumps(doc[key])}")
    rows = [(x.digest, human_size(x.size), x.media_type.rsplit(".", 1)[-1]) for x in image.layers]
    print(table(rows, ("layer", "size", "type")))
    print(f"total    {human_size(sum(x.size for x in image.layers))} in {len(rows)} layers (blobs verified)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.build.pipeline import default_cache
    from kiln.oci.registry import LocalRegistry

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that a SIGTERM stops the registry too

    signal.signal(signal.SIGTERM, interrupted)
    directory = args.dir or default_cache() / "registry"
    with LocalRegistry(directory, args.host, args.port, htpasswd=args.htpasswd) as reg:
        if args.json:
            print(json.dumps({"address": reg.address, "port": reg.port, "dir": str(reg.root)}), flush=True)
        else:
            print(f"registry {reg.address} (storage {reg.root / 'data'}; Ctrl-C stops)", flush=True)
            print(f"push:  kiln oci push LAYOUT {reg.address}/NAME:TAG --plain-http", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            status = reg.wait()
            raise KilnError(f"docker-registry exited with status {status}", hint=f"see {reg.log}")
    return 0
