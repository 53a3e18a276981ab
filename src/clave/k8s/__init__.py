"""Kubernetes integration: the node installer (`clave node`), the runtime-handler config files it writes, and
the enclave device plugin (`clave device-plugin`). Nothing here is on a container's start path."""
