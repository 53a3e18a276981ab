"""The shim's handling of a process's stdio FIFOs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from clave.shim.io import ProcessIO


def test_close_io_waits_for_the_handover_of_stdin(tmp_path: Path) -> None:
    """ctr sends CloseIO as soon as its own stdin ends, racing its Start of an exec: the stdin fd the container
    is being given must stay open until the container has its copy (seen as EBADF in the exec's stand-in)."""
    fifos = [tmp_path / name for name in ("in", "out", "err")]
    for fifo in fifos:
        os.mkfifo(fifo)
    writer = os.open(fifos[0], os.O_RDWR)  # containerd's end of the stdin FIFO
    io = ProcessIO(*(str(f) for f in fifos), terminal=False)
    closer = threading.Thread(target=io.close_stdin)
    with io.handover:
        stdin, _out, _err = io.open()
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "CloseIO went ahead while the container was being given its stdin"
        fifo_inode = os.fstat(stdin).st_ino  # still the container's to take
        io.after_start()
    closer.join(5)
    assert not closer.is_alive()
    try:
        assert os.fstat(stdin).st_ino != fifo_inode, "the shim kept its stdin fd after CloseIO"
    except OSError:
        pass  # closed
    io.close()
    os.close(writer)
