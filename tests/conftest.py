"""Shared fixtures: loopback addresses for real agents, sample images built once."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rollout.model import Image
from rollout.sample import build_sample_image

# Each test process gets its own 127.X.0.0/16 so parallel or leftover runs never collide.
_SECOND_OCTET = 100 + os.getpid() % 100
_hosts = itertools.count(1)


def next_host() -> str:
    """A fresh loopback address (127.X.Y.Z) no other test in this run uses."""
    n = next(_hosts)
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
