"""`kiln build`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kiln.core.progress import Progress, human_size, table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("build", help="build a disk image and update artifacts from a variant")
    p.add_argument("--variant", help="variant name (from variants/) or path to a .toml (default: container-host)")
    p.add_argument("--version", dest="image_version", help="override the variant's version")
    p.add_argument("--output", type=Path, help="output directory (default: build/<variant>-<version>)")
    p.add_argument(
        "--debug-console", action="store_true", help="add a root shell on the serial console (development only)"
    )
    p.add_argument(
        "--update-repo", type=Path, metavar="DIR|ROOT_JSON",
        help="the update repository whose TUF root the image trusts (a `kiln repo` directory or a root.json)",
    )
    p.add_argument(
        "--update-url", metavar="URL",
        help="the repository's base URL, as `kiln repo serve` prints it (default settings.updates.*-base-url)",
    )
    p.add_argument(
        "--admin-image", metavar="REF",
        help="image reference of the admin host container (default settings.host-containers.admin.source;"
        " build it with `kiln oci build variants/containers/admin.toml`)",
    )
    p.add_argument(
        "--keys", type=Path, metavar="DIR",
        help="sign the boot chain for Secure Boot with this key set (`kiln keys init DIR`); also writes"
        " secureboot-vars.fd, firmware variables with the keys enrolled (`kiln run --secure-boot`)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with every output path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.build.pipeline import BuildOptions, build
    from kiln.variant import load_variant

    variant = load_variant(args.variant)
    if args.image_version:
        variant = variant.with_version(args.image_version)
    output = (args.output or Path("build") / f"{variant.name}-{variant.version}").resolve()
    progress = Progress(quiet=args.json or not sys.stderr.isatty())
    if not args.json:
        progress.quiet = False
    opts = BuildOptions(
        variant, output, debug_console=args.debug_console, update_root=args.update_repo,
        update_url=args.update_url, admin_image=args.admin_image, keys=args.keys,
    )
    result = build(opts, progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    rows = [(k, human_size(v)) for k, v in result.sizes.items()]
    print(table(rows, ("output", "size")), file=sys.stderr)
    print(table([(k, f"{v:.1f} s") for k, v in result.timings.items()], ("step", "time")), file=sys.stderr)
    print(f"disk image: {result.disk}\nartifacts:  {result.manifest.parent}\nroot hash:  {result.root_hash}")
    if result.secure_boot_vars:
        print(f"signed for Secure Boot; firmware variables: {result.secure_boot_vars}")
    return 0
