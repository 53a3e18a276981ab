"""vm: the VM sandbox's guest and this host's acceleration.

usage: clave vm build-guest [--out DIR] [--force]
       clave vm accel [--probe]

build-guest builds the guest from Debian packages (apt-get download): the cloud kernel as a PVH vmlinux, an
initramfs with the virtio modules and a read-only ext4 image with Python and the agent. It shows each step,
is cached under /var/lib/clave/vm/guest by the digests of every input (a second run does nothing), and prints
the digests of kernel, initramfs, image and agent as JSON (recorded in DIR/manifest.json). --out builds into
DIR instead of the cache; --force rebuilds.

accel prints which accelerator VMs use here (kvm or tcg) and why; --probe boots the guest under KVM again
instead of using the cached verdict.
"""

from __future__ import annotations

import json

from clave.cli.main import Parsed, UsageError, parse_flags

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "out": ("str", ("o",)), "force": ("bool", ("f",)), "probe": ("bool", ()), "help": ("bool", ("h",)),
}
SUBCOMMANDS = ("build-guest", "accel")


def run(parsed: Parsed, ctx: Any) -> int:
    if not parsed.args or parsed.args[0] not in SUBCOMMANDS:
        raise UsageError(f"usage: clave vm {{{'|'.join(SUBCOMMANDS)}}} ...; see 'clave vm --help'")
    command = parsed.args[0]
    sub = parse_flags(parsed.args[1:], FLAGS, f"vm {command}")
    flags = {**parsed.flags, **sub.flags}
    if sub.args:
        raise UsageError(f"clave vm {command}: unexpected argument {sub.args[0]!r}")
    if command == "build-guest":
        from clave.vm.guest import build_guest, print_progress

        guest = build_guest(flags.get("out"), force=bool(flags.get("force")), progress=print_progress)
        print(json.dumps({"directory": guest.directory, "key": guest.key, "kernel_release": guest.kernel_release,
                          "sha256": guest.digests()}, indent=2, sort_keys=True))
        return 0
    from clave.vm.accel import acceleration

    verdict = acceleration(force_probe=bool(flags.get("probe")))
    print(json.dumps({"accel": verdict.accel, "reason": verdict.reason, "cached": verdict.cached}))
    return 0
