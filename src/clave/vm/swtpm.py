"""The per-VM software TPM: one swtpm process per VM, its state in the VM's state directory (``tpm/``).

QEMU's ``-tpmdev emulator`` speaks to swtpm over its control socket (``--ctrl type=unixio``) and hands it the
data channel itself; a TPM works on q35 (tpm-tis), not on microvm. swtpm does not always exit when QEMU goes
away, so the VM stops it (by pid and start time, recorded in vm.json like QEMU's own).
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
    """QEMU's side: the emulator backend on swtpm's control socket and a TIS device (q35)."""
    ctrl = os.path.join(state_dir, TPM_DIR, CTRL)
    return ["-chardev", f"socket,id=tpmctrl,path={ctrl}", "-tpmdev", "emulator,id=tpm0,chardev=tpmctrl",
            "-device", "tpm-tis,tpmdev=tpm0"]


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
           "--log", f"file={log},level=1", "--terminate"]
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
