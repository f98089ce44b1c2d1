"""`kiln run`: boot an image in QEMU on a copy-on-write overlay."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from kiln.core.errors import KilnError

if TYPE_CHECKING:
    from kiln.vm.qemu import Vm


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="boot an image in QEMU (the image itself is never modified)")
    p.add_argument("image", type=Path, help="disk image, or a build directory containing disk.img")
    p.add_argument("--headless", action="store_true",
                   help="no console: wait for the ready line, report, then power off (see --keep-running)")
    p.add_argument("--keep-running", action="store_true",
                   help="with --headless: stay up through guest reboots until Ctrl-C, SIGTERM or a guest power-off")
    p.add_argument("--serial-log", type=Path, help="append the serial console to this file")
    p.add_argument("--forward", action="append", default=[], metavar="HOSTPORT:GUESTPORT",
                   help="forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (repeatable)")
    p.add_argument("--user-data", type=Path, metavar="FILE",
                   help="TOML user data ([settings]), attached as a config drive (vfat, label CIDATA)")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1),
                   help="vCPUs (default: 2, or fewer on a smaller workstation; under TCG each one is a host thread)")
    p.add_argument("--memory", type=int, default=1024, help="MiB")
    p.add_argument("--disk-size", type=int, metavar="MIB", help="make the overlay disk this big (DATA grows into it)")
    p.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                   help="auto uses KVM only when it really works here")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the ready line")
    p.add_argument("--json", action="store_true",
                   help="with --headless: print one JSON object per boot")
    p.add_argument("--secure-boot", action="store_true",
                   help="UEFI Secure Boot firmware (SMM) with the image's enrolled keys: "
                        "secureboot-vars.fd beside the image (made by `kiln build --keys`), or --efi-vars")
    p.add_argument("--efi-vars", type=Path, metavar="FILE",
                   help="with --secure-boot: the OVMF variables file to boot with (a copy; FILE is never written)")
    p.set_defaults(func=run)


def _image(path: Path) -> Path:
    if path.is_dir():
        path = path / "disk.img"
    if not path.is_file():
        raise KilnError(f"no disk image at {path}", hint="build one with 'kiln build'")
    return path


def secure_boot_vars(image: Path, secure_boot: bool, efi_vars: Path | None) -> Path | None:
    """The variables file `--secure-boot` boots with: --efi-vars, else the one the build
    wrote beside the image; None without --secure-boot."""
    from kiln.secureboot.varstore import VARS_NAME

    if not secure_boot:
        if efi_vars is not None:
            raise KilnError("--efi-vars needs --secure-boot")
        return None
    found = efi_vars if efi_vars is not None else image.parent / VARS_NAME
    if not found.is_file():
        raise KilnError(f"no Secure Boot variables file at {found}",
                        hint="build the image with 'kiln build --keys DIR' (it writes "
                             f"{VARS_NAME} beside disk.img), or pass --efi-vars FILE")
    return found


def run(args: argparse.Namespace) -> int:
    from kiln.vm.qemu import Vm, VmConfig, parse_forwards

    image = _image(args.image)
    sb_vars = secure_boot_vars(image, args.secure_boot, args.efi_vars)
    with tempfile.TemporaryDirectory(prefix="kiln-run-") as tmp:
        cfg = VmConfig(image, Path(tmp), memory_mib=args.memory, cpus=args.cpus,
                       forwards=parse_forwards(args.forward), accel=args.accel,
                       disk_size=args.disk_size * 2**20 if args.disk_size else None, user_data=args.user_data,
                       cold_reboot=args.headless,  # headless: a guest reboot (an update) is a fresh QEMU
                       secure_boot_vars=sb_vars)
        if not args.headless:
            vm = Vm(cfg, interactive=True).start()
            print("kiln: booting (Ctrl-A X quits QEMU)", file=sys.stderr)
            try:
                return vm.wait_exit()
            except KeyboardInterrupt:
                vm.shutdown()
                return 130
        return _headless(Vm(cfg, serial_log=args.serial_log), args)


def _headless(vm: Vm, args: argparse.Namespace) -> int:
    """Boot, report the ready line; with --keep-running, follow the guest through its
    reboots (an update, a rollback: each a new QEMU) until Ctrl-C, SIGTERM or its own
    power-off. Returns 1 if the VM ended any other way than a power-off."""
    from kiln.vm.qemu import READY_RE, Ending

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    quiet = args.json
    by_itself = True
    try:
        vm.start()
        if not quiet:
            where = f"serial log: {args.serial_log}" if args.serial_log else "headless"
            print(f"kiln: booting {vm.cfg.image} ({where})", file=sys.stderr)
        ready = vm.wait_ready(args.timeout)
        seconds = time.monotonic() - vm.started_at
        report = vm.wait_for(r"kiln: status (.*)\n", 30).group(1)
        info = {"ready": ready.group(0), "version": ready.group(1), "variant": ready.group(2),
                "slot": ready.group(3), "seconds_to_ready": round(seconds, 1), "status": report}
        if quiet:
            print(json.dumps(info), flush=True)
        else:
            print(ready.group(0), flush=True)
            print(f"kiln: ready after {seconds:.1f} s; {report}", flush=True)
        if args.keep_running:
            if not quiet:
                print("kiln: running; Ctrl-C (or SIGTERM) powers the guest off", file=sys.stderr)
            for again in vm.watch(READY_RE):  # ends only when the VM ends by itself
                _report_reboot(vm, again, quiet)
        else:
            by_itself = False
    except KeyboardInterrupt:
        by_itself = False
    finally:
        if vm.running:
            by_itself = False
            if not quiet:
                print("kiln: powering off", file=sys.stderr)
            try:
                vm.shutdown()
            except KeyboardInterrupt:  # asked twice: no more waiting
                vm.kill()
        else:
            vm.kill()  # reaps and joins the reader; nothing runs any more
        if not quiet and vm.ending is not None:
            print(f"kiln: {_say(vm, by_itself)}", file=sys.stderr)
    ok = vm.ending in (Ending.POWERED_OFF, Ending.REBOOTED) or (not by_itself and vm.ending == Ending.KILLED)
    return 0 if ok else 1


def _say(vm: Vm, by_itself: bool) -> str:
    """How the VM ended, for the operator (from `Vm.ending`)."""
    if vm.ending == "powered off":
        return "the guest powered off by itself" if by_itself else "guest powered off cleanly"
    if vm.ending == "rebooted":
        return "guest shut down (it was rebooting) and was not started again"
    if vm.ending == "killed":
        return "QEMU was killed from outside" if by_itself else "guest killed (it did not power off in time)"
    tail = "\n".join(vm.output.rstrip("\n").splitlines()[-5:])
    return f"QEMU failed; its last output:\n{tail}"


def _report_reboot(vm: Vm, ready: re.Match[str], quiet: bool) -> None:
    """The ready line of a boot after a guest reboot, timed from that boot's QEMU start."""
    seconds = vm.time_at(ready.start()) - vm.launched_at(ready.start())
    if quiet:
        print(json.dumps({"ready": ready.group(0), "version": ready.group(1), "variant": ready.group(2),
                          "slot": ready.group(3), "seconds_to_ready": round(seconds, 1),
                          "reboots": vm.relaunches}), flush=True)
    else:
        print(ready.group(0), flush=True)
        print(f"kiln: ready again after a guest reboot ({seconds:.1f} s from power-on)", flush=True)
