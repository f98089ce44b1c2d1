"""Reading a guest's answers through the debug-console shell."""

from __future__ import annotations

import json
from typing import Any

from kiln.vm.qemu import Vm


def guest_json(vm: Vm, command: str) -> dict[str, Any]:
    """`command`'s JSON, printed on one line: the daemon's console messages may come between
    the shell's lines (they share the serial console), never inside one."""
    compact = "python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'"
    out = vm.check(f"{command} | {compact}", timeout=120)
    line = next(x for x in out.splitlines() if x.startswith("{"))
    doc: dict[str, Any] = json.loads(line)
    return doc
