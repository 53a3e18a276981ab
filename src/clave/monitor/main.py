"""clave-monitor: serve the metrics of every Clave shim on this node at ``http://ADDR/metrics``.

    clave-monitor [--listen HOST:PORT] [--namespace NS]... [--timeout SECONDS]
    clave-monitor --once [--namespace NS]...       one scrape printed to stdout

Each scrape of ``/metrics`` asks every shim found under /run/containerd/clave/.shims (or those of the given
containerd namespaces) at once and answers with their families merged, labelled by ``container_id``,
``container``, ``pod``, ``namespace``, ``uid`` (the pod's, from the CRI annotations) and ``handler``, followed by
the monitor's own ``clave_monitor_*`` figures. Needs root: the shims' sockets are root's.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from clave.errors import ClaveError, InvalidArgument
from clave.monitor.gather import Monitor
from clave.shim.prometheus import CONTENT_TYPE, SHIMS_DIR

DEFAULT_LISTEN = "127.0.0.1:8090"  # kata-monitor's port; loopback unless told otherwise
INDEX = b"clave-monitor: the metrics of this node's Clave shims are at /metrics\n"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (every IPv4 address) or ``[V6ADDR]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"--listen {text!r}: expected HOST:PORT, :PORT or [IPV6]:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    monitor: Monitor


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        path = self.path.partition("?")[0]
        if path == "/metrics":
            self._send(200, self.server.monitor.exposition(), CONTENT_TYPE)
        elif path == "/":
            self._send(200, INDEX, "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: see /metrics\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def serve(monitor: Monitor, listen: str) -> int:
    host, port = parse_listen(listen)
    if ":" in host:
        _Server.address_family = socket.AF_INET6
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise ClaveError(f"--listen {listen}: {exc.strerror or exc}") from None
    server.monitor = monitor

    def stop(sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
    print(f"clave-monitor: serving http://{shown}:{server.server_port}/metrics (shims under "
          f"{monitor.root})", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clave-monitor", description="Serve the metrics of every Clave shim on "
                                     "this node over HTTP (/metrics, Prometheus text format).")
    parser.add_argument("--listen", metavar="ADDR", default=DEFAULT_LISTEN,
                        help=f"HOST:PORT, :PORT or [IPV6]:PORT to serve on (default {DEFAULT_LISTEN})")
    parser.add_argument("--namespace", metavar="NS", action="append",
                        help="only the shims of this containerd namespace (repeatable; default: all)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=2.0,
                        help="how long a scrape waits for the shims (default 2)")
    parser.add_argument("--once", action="store_true", help="print one scrape to stdout and exit")
    parser.add_argument("--shims-dir", metavar="DIR", default=SHIMS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    monitor = Monitor(set(args.namespace) if args.namespace else None, args.timeout, args.shims_dir, sys.stderr)
    try:
        if args.once:
            sys.stdout.buffer.write(monitor.exposition())
            sys.exit(0)
        sys.exit(serve(monitor, args.listen))
    except ClaveError as exc:
        sys.exit(f"clave-monitor: {exc}")


if __name__ == "__main__":
    main()
