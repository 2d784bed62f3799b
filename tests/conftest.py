"""Shared fixtures: loopback addresses for real agents, sample images built once, local
fleets, a `rollout serve` process. Shared functions live in tests/helpers.py."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from rollout import fleet
from rollout.fleet import FleetOptions
from rollout.inventory import load_inventory
from rollout.model import Image, Node
from rollout.sample import build_sample_image

if TYPE_CHECKING:  # tests.registry and tests.helpers import this module
    from tests.helpers import Service
    from tests.registry import Registry, RegistryFactory

# Each test process gets its own 127.X.0.0/16 so parallel or leftover runs never collide.
_SECOND_OCTET = 100 + os.getpid() % 100
_hosts = itertools.count(1)


def next_host() -> str:
    """A fresh loopback address (127.X.Y.Z) no other test in this run uses."""
    n = next(_hosts)
    return f"127.{_SECOND_OCTET}.{n // 250}.{n % 250 + 2}"


def next_block(count: int) -> str:
    """First of `count` consecutive fresh loopback addresses within one /24."""
    global _hosts
    n = next(_hosts)
    if n % 250 + count > 250:
        n = (n // 250 + 1) * 250
    _hosts = itertools.count(n + count)
    return f"127.{_SECOND_OCTET}.{n // 250}.{n % 250 + 2}"


@pytest.fixture
def loopback() -> Callable[[], str]:
    return next_host


@dataclass(frozen=True)
class SampleImages:
    v1: Image
    v2: Image
    bad: Image  # version 2-bad: boots, but its workload answers /healthz with 500


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SampleImages]:
    d: Path = tmp_path_factory.mktemp("images")
    yield SampleImages(
        v1=build_sample_image(d / "v1.img", "1.0.0"),
        v2=build_sample_image(d / "v2.img", "2.0.0"),
        bad=build_sample_image(d / "bad.img", "2.0.0-bad", bad=True),
    )


@dataclass(frozen=True)
class LocalFleet:
    workdir: Path
    inventory: Path
    nodes: tuple[Node, ...]


@pytest.fixture
def make_fleet(tmp_path: Path, images: SampleImages) -> Iterator[Callable[..., LocalFleet]]:
    """Start real local fleets (agent processes on fresh loopback addresses); stop them after."""
    started: list[Path] = []

    def make(
        count: int, image: Image | None = None, trusted_keys: tuple[str, ...] = (), **opts: float
    ) -> LocalFleet:
        workdir = tmp_path / f"fleet-{len(started)}"
        options = FleetOptions(
            nodes=count,
            base_address=next_block(count),
            firmware_delay=opts.pop("firmware_delay", 0.2),
            kernel_delay=opts.pop("kernel_delay", 0.1),
            commit_deadline=opts.pop("commit_deadline", 120.0),
            trusted_keys=trusted_keys,
        )
        started.append(workdir)
        inventory = fleet.up(workdir, (image or images.v1).path, options)
        return LocalFleet(workdir, inventory, load_inventory(inventory).nodes)

    yield make
    for workdir in started:
        if (workdir / fleet.FLEET_FILE).exists():
            fleet.down(workdir)


@pytest.fixture
def tcp_listeners() -> Iterator[Callable[[str, int], socket.socket]]:
    """Open plain TCP listeners on chosen hosts: a health signal the test controls (a tcp
    check passes while its listener is open). All are closed at teardown."""
    socks: list[socket.socket] = []

    def listen(host: str, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()
        socks.append(s)
        return s

    yield listen
    for s in socks:
        s.close()


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Start real OCI registries (docker-registry processes, tests/registry.py); all are
    stopped at teardown. `registries.start(auth=..., tls=..., upstream=...)`."""
    from tests.registry import registries as started

    with started(tmp_path / "registries") as factory:
        yield factory


@pytest.fixture
def registry(registries: RegistryFactory) -> Registry:
    """One registry with TLS (its CA in `registry.ca_pem`) and basic auth."""
    return registries.start()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A `rollout serve` process on a fresh loopback address, its state and token file
    (`service-secret-token`) in tmp_path; killed at teardown."""
    from tests.helpers import Service

    (tmp_path / "token").write_text("service-secret-token\n")
    svc = Service(tmp_path, next_host(), "service-secret-token")
    svc.start()
    yield svc
    svc.kill()
