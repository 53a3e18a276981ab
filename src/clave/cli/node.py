"""node: install Clave on a Kubernetes node, or remove it (what kata-deploy does for Kata).

usage: clave node install [--prefix DIR] [--containerd-config FILE] [--bin-dir DIR]
       clave node uninstall [--containerd-config FILE]

install copies Clave to DIR (default /opt/clave: lib/python/clave, bin/clave, bin/containerd-shim-clave-v2,
etc/runtime-<name>.toml) and adds the runtimes clave (native), clave-enclave and clave-vm to containerd's CRI
plugin in FILE (default /etc/containerd/config.toml) as one marked block, links bin/containerd-shim-clave-v2 into
--bin-dir (default /usr/local/bin: containerd 1.6 finds shims on its PATH), keeping the rest of the file as it is
and a byte-exact backup beside it (FILE.clave-orig, FILE.clave-install.json). uninstall restores FILE byte for
byte and removes what install put in DIR; it refuses when FILE changed since install. Both can run again safely
and print what they changed; containerd must be restarted to see a change.
"""

from __future__ import annotations

from clave.cli.main import Parsed, UsageError, parse_flags

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefix": ("str", ()), "containerd-config": ("str", ()), "bin-dir": ("str", ()), "help": ("bool", ("h",)),
}
SUBCOMMANDS = ("install", "uninstall")


def run(parsed: Parsed, ctx: Any) -> int:
    if not parsed.args or parsed.args[0] not in SUBCOMMANDS:
        raise UsageError(f"usage: clave node {{{'|'.join(SUBCOMMANDS)}}} ...; see 'clave node --help'")
    command = parsed.args[0]
    sub = parse_flags(parsed.args[1:], FLAGS, f"node {command}")
    if sub.args:
        raise UsageError(f"clave node {command} takes no arguments (got {' '.join(sub.args)!r})")
    flags = {**parsed.flags, **sub.flags}
    if command == "uninstall" and ("prefix" in flags or "bin-dir" in flags):
        raise UsageError("clave node uninstall takes no --prefix or --bin-dir: it removes what install recorded")
    from clave.k8s import node

    config = flags.get("containerd-config", node.DEFAULT_CONTAINERD_CONFIG)
    if command == "install":
        node.install(flags.get("prefix", node.DEFAULT_PREFIX), config, say=_say,
                     bin_dir=flags.get("bin-dir", node.DEFAULT_BIN_DIR))
    else:
        node.uninstall(config, say=_say)
    return 0


def _say(line: str) -> None:
    print(line, flush=True)
