"""clave-monitor: one Prometheus endpoint for every Clave shim on a node (kata-monitor's role).

Each ``containerd-shim-clave-v2`` serves its pod's metrics on ``metrics.sock`` in its state directory
(``clave.shim.prometheus``); the monitor finds them all, scrapes them concurrently and merges their families into
one exposition, plus its own scrape figures.
"""
