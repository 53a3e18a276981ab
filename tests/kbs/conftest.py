"""Fixtures for clave-kbs: broker processes on loopback (see kbs_env)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kbs_env import Kbs, Material, make_material, start_kbs, stop_kbs


@pytest.fixture(scope="session")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return make_material(tmp_path_factory.mktemp("kbs-material"))


@pytest.fixture(scope="module")
def kbs(material: Material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kbs]:
    """A broker that accepts software-only evidence (the only kind this machine can make)."""
    server = start_kbs(material, tmp_path_factory.mktemp("kbs-state"), "--allow-insecure", "--session-ttl", "60")
    yield server
    stop_kbs(server)


@pytest.fixture(scope="module")
def strict_kbs(material: Material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kbs]:
    """A broker started without --allow-insecure."""
    server = start_kbs(material, tmp_path_factory.mktemp("kbs-strict"))
    yield server
    stop_kbs(server)


@pytest.fixture(scope="module")
def short_kbs(material: Material, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kbs]:
    """A broker whose sessions and tokens live one second."""
    server = start_kbs(material, tmp_path_factory.mktemp("kbs-short"), "--allow-insecure", "--session-ttl", "1")
    yield server
    stop_kbs(server)
