"""vm: the VM sandbox's guest and this host's acceleration.

usage: clave vm build-guest [--out DIR] [--force]
       clave vm accel [--probe]
       clave vm measure [--guest DIR] [--policy-out FILE]

build-guest builds the guest from Debian packages (apt-get download): the cloud kernel as a PVH vmlinux, an
initramfs with the virtio modules and a read-only ext4 image with Python and the agent. It shows each step,
is cached under /var/lib/clave/vm/guest by the digests of every input (a second run does nothing), and prints
the digests of kernel, initramfs, image and agent as JSON (recorded in DIR/manifest.json). --out builds into
DIR instead of the cache; --force rebuilds.

measure prints the reference values of a measured boot of the built guest (clave.vm.measure): the digests of
kernel, initramfs, image and agent from the build's manifest, the PCR 8 value a guest that booted exactly them
holds, and its event log (hex); --policy-out writes a clave-verify policy pinning that PCR (claim pcrs.8).
--guest names a build directory instead of the current one.

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
    "policy-out": ("str", ()), "guest": ("str", ()),
}
SUBCOMMANDS = ("build-guest", "accel", "measure")


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
    if command == "measure":
        return _measure(flags.get("guest"), flags.get("policy-out"))
    from clave.vm.accel import acceleration

    verdict = acceleration(force_probe=bool(flags.get("probe")))
    print(json.dumps({"accel": verdict.accel, "reason": verdict.reason, "cached": verdict.cached}))
    return 0


def _measure(directory: str | None, policy_out: str | None) -> int:
    import os

    from clave.vm import measure
    from clave.vm.guest import Guest, current_guest

    guest = Guest(directory) if directory else current_guest()
    digests = guest.digests()
    policy = measure.policy(digests)
    if policy_out:
        tmp = f"{policy_out}.tmp"
        with open(tmp, "w") as f:
            json.dump(policy, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, policy_out)
    pcrs = measure.reference_pcrs(digests)
    print(json.dumps({"guest": guest.key, "sha256": digests, "pcr_bank": "sha256",
                      "pcrs": {str(k): v for k, v in pcrs.items()},
                      "event_log": measure.reference_log(digests).hex(), "policy": policy}, indent=2, sort_keys=True))
    return 0
