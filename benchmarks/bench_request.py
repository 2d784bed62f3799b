"""What one agent request costs the controller: the floor under bench_http's ratio.

Usage: .venv/bin/python benchmarks/bench_request.py [--agents 200] [--rounds 5] [--repeat 3]

Starts `--agents` real agents in one host process (as bench_http does: rollout.agent.host,
each agent on its own loopback address with its own token, state dir and API) and, in this
process, calls them through the real `AgentDriver`, every agent at once per round (the
driver's slots bound what is in flight), measuring this process's CPU (`process_time`,
so the agents' CPU is not counted) per request:

- `status, pooled`: `GET /v1/status` on the node's kept connection (the driver's own
  HTTP/1.1 client, rollout.drivers.wire), as the boot status, the held health poll and
  the commit of a node in flight are;
- `lease, fresh`: `PUT /v1/lease` on a new TCP connection per request, as the leases
  and `rollback` are (and the first request after a reboot, on a connection then kept);
- `status, sim`: the same call on the simulated driver (bench_http's comparison run).

A node of bench_http's rollout makes 8 requests (lease, reach status, stage, activate,
boot status, held poll, commit, release) on 4 TCP connections; multiplied by these
figures it gives the HTTP driver's share of the controller's CPU per node, which no
change to the engine can reduce. Nothing is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_http import Fleet, build_images, raise_nofile
from bytecode import compile_rollout

from rollout.controller import LEASE_TTL
from rollout.drivers.agent import AgentDriver
from rollout.drivers.sim import SimDriver, SimFleet
from rollout.image import load_image
from rollout.model import Node

Call = Callable[[Node], Awaitable[Any]]


async def per_request(call: Call, nodes: list[Node], rounds: int) -> float:
    """CPU microseconds per call, over `rounds` rounds of every node at once (after one
    round to warm up: first connections, imports, caches)."""
    await asyncio.gather(*(call(n) for n in nodes))
    t0 = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(call(n) for n in nodes))
    return (time.process_time() - t0) / (rounds * len(nodes)) * 1e6


async def measure(fleet: Fleet, v1: Path, rounds: int, repeat: int) -> dict[str, list[float]]:
    driver = AgentDriver(lease_holder="bench-request")
    sim = SimDriver(SimFleet(fleet.nodes, load_image(str(v1))))
    calls: dict[str, Call] = {
        "status, pooled": driver.status,
        "lease, fresh": lambda n: driver.lease(n, LEASE_TTL),
        "status, sim": sim.status,
    }
    figures: dict[str, list[float]] = {label: [] for label in calls}
    try:
        for _ in range(repeat):  # interleaved: the machine's speed drifts
            for label, call in calls.items():
                figures[label].append(await per_request(call, fleet.nodes, rounds))
    finally:
        await driver.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    compile_rollout()
    raise_nofile()
    with contextlib.ExitStack() as stack:
        wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-request-")))
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=shm)))
        v1, _ = build_images(wd)
        fleet = Fleet(wd, state)
        try:
            ready = fleet.up(args.agents, 1, v1, kernel_delay=0.1, timeout=300.0)
            print(f"{args.agents} agents in 1 host listening after {ready:.1f} s")
            figures = asyncio.run(measure(fleet, v1, args.rounds, args.repeat))
        finally:
            fleet.down()
    print(f"\n{'request':<16}{'median us':>10}{'min us':>8}  runs")
    for label, runs in figures.items():
        print(
            f"{label:<16}{statistics.median(runs):>10.0f}{min(runs):>8.0f}  "
            + " ".join(f"{r:.0f}" for r in runs)
        )


if __name__ == "__main__":
    main()
