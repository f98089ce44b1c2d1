#!/usr/bin/python3
"""2.0.0: the stock MOTD changed. Bottlerocket's ReplaceStringMigration shape: a stored
value is only rewritten when it is still the old default, so a host's own MOTD survives.
Storewolf never overwrites a populated key, which is why a changed default needs this."""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

OLD = "Welcome to Kiln!"
NEW = "Welcome to Kiln 2!"


def migrate(tree: dict, forward: bool) -> dict:
    src, dst = (OLD, NEW) if forward else (NEW, OLD)
    if tree.get("motd") == src:
        tree = {**tree, "motd": dst}
    return tree


def write(path: Path, tree: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(tree, sort_keys=True))
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--forward", action="store_true")
    d.add_argument("--backward", action="store_true")
    p.add_argument("--source-datastore", type=Path, required=True)
    p.add_argument("--target-datastore", type=Path, required=True)
    a = p.parse_args()
    src, dst = a.source_datastore, a.target_datastore
    for doc in [src / "live" / "settings.json", *sorted((src / "pending").glob("*.json"))]:
        write(dst / doc.relative_to(src), migrate(json.loads(doc.read_text()), a.forward))
    for other in (src / "live").iterdir():  # definitions come from the image each boot: copied as is
        if other.name != "settings.json" and other.is_file():
            shutil.copy2(other, dst / "live" / other.name)
    print(f"stock-motd: {'forward' if a.forward else 'backward'} done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
