"""The per-VM software TPM: one swtpm process per VM, its state in the VM's state directory (``tpm/``).

QEMU's ``-tpmdev emulator`` speaks to swtpm over its control socket (``--ctrl type=unixio``) and hands it the
data channel itself; a TPM works on q35, not on microvm. swtpm does not exit when QEMU is killed, so the VM
stops it (by pid and start time, recorded in vm.json like QEMU's own).

The guest boots through OVMF when it has a TPM (clave.vm.qemu.FIRMWARE): with QEMU's direct kernel boot under
SeaBIOS (QEMU 7.2, SeaBIOS 1.16.2), SeaBIOS's high-memory allocations (ACPI tables plus its TPM log) outgrow
the 160 KiB QEMU keeps free below the top of RAM when it places the initramfs, so the initramfs overwrote the
ACPI tables and the kernel never found the TPM (measured here 2026-12-07). OVMF loads the EFI-stub kernel and
the initramfs itself; the device is tpm-crb.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from clave.vm.errors import VmError

SWTPM = "swtpm"
TPM_DIR = "tpm"  # inside the VM state directory
CTRL = "ctrl.sock"


class TpmStartError(VmError):
    """swtpm is missing or did not come up."""


def qemu_args(state_dir: str) -> list[str]:
    """QEMU's side: the emulator backend on swtpm's control socket and a CRB device (q35; see above)."""
    ctrl = os.path.join(state_dir, TPM_DIR, CTRL)
    return ["-chardev", f"socket,id=tpmctrl,path={ctrl}", "-tpmdev", "emulator,id=tpm0,chardev=tpmctrl",
            "-device", "tpm-crb,tpmdev=tpm0"]


def start(state_dir: str, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """A fresh swtpm (new state: a TPM manufactured on first use, its own seeds) for the VM in ``state_dir``."""
    if shutil.which(SWTPM) is None:
        raise TpmStartError("swtpm not found: install Debian's swtpm (make deps)")
    directory = os.path.join(state_dir, TPM_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ctrl = os.path.join(directory, CTRL)
    if os.path.exists(ctrl):
        os.unlink(ctrl)
    log = os.path.join(directory, "swtpm.log")
    cmd = [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={directory}", "--ctrl", f"type=unixio,path={ctrl}",
           "--log", f"file={log},level=1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                close_fds=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(ctrl):
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise TpmStartError(f"swtpm did not start: {_tail(log)}")
        time.sleep(0.005)
    return proc


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-2:]) or "(empty log)"


def remove(state_dir: str) -> None:
    shutil.rmtree(os.path.join(state_dir, TPM_DIR), ignore_errors=True)
