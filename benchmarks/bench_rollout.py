"""Measure a real local rollout: wall time, per-step latencies, image throughput.

Usage: .venv/bin/python benchmarks/bench_rollout.py [--nodes 12] [--image-mb 64]

Starts a local fleet of real agents on 127.77.0.0/24, builds a v2 image padded with
random bytes to the given size, rolls it out with a fast policy (canary 1, batches of
25%), and prints the figures. Nothing is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rollout import fleet
from rollout.drivers.agent import AgentDriver
from rollout.engine import Engine
from rollout.events import BytesSent, Event, StepDone
from rollout.image import build_image
from rollout.inventory import load_inventory
from rollout.plan import plan_batches
from rollout.policy import parse_policy
from rollout.sample import build_sample_image, write_sample_tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--image-mb", type=int, default=64)
    parser.add_argument("--base-address", default="127.77.0.2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        wd = Path(tmp)
        v1 = build_sample_image(wd / "v1.img", "1.0.0")
        src = write_sample_tree(wd / "src")
        (src / "blob.bin").write_bytes(os.urandom(args.image_mb << 20))
        t0 = time.perf_counter()
        v2 = build_image(src, wd / "v2.img", version="2.0.0")
        build_s = time.perf_counter() - t0
        opts = fleet.FleetOptions(nodes=args.nodes, base_address=args.base_address)
        t0 = time.perf_counter()
        inventory = fleet.up(wd / "fleet", v1.path, opts)
        up_s = time.perf_counter() - t0
        try:
            policy = parse_policy(
                {
                    "batches": {"canary": 1, "size": "25%", "max_unavailable": "25%"},
                    "health": {
                        "checks": [{"type": "http", "port": 8080}, {"type": "agent"}],
                        "interval": 0.25,
                        "min_healthy_time": 1,
                        "deadline": 60,
                    },
                },
                "bench",
            )
            nodes = load_inventory(inventory).nodes
            steps: dict[str, list[float]] = defaultdict(list)
            sent = 0

            def observe(e: Event) -> None:
                nonlocal sent
                if isinstance(e, StepDone):
                    steps[str(e.step)].append(e.seconds)
                elif isinstance(e, BytesSent):
                    sent += e.count

            async def go() -> float:
                driver = AgentDriver()
                engine = Engine(driver, policy, v2, observe)
                t = time.perf_counter()
                try:
                    result = await engine.run(plan_batches(nodes, policy))
                finally:
                    await driver.close()
                assert result.succeeded, result.message
                return time.perf_counter() - t

            total = asyncio.run(go())
        finally:
            fleet.down(wd / "fleet")
    stage = sum(steps["stage"])
    print(f"nodes {args.nodes}, image {v2.size / 2**20:.1f} MiB, "
          f"batches {len(plan_batches(nodes, policy))}")  # fmt: skip
    print(f"image build {build_s:.2f} s; fleet up {up_s:.2f} s; rollout {total:.2f} s")
    print(f"bytes sent {sent / 2**20:.0f} MiB; per-stream throughput "
          f"{sent / 2**20 / stage:.0f} MiB/s (sum of stage times)")  # fmt: skip
    for name, values in steps.items():
        values.sort()
        p90 = values[max(0, int(len(values) * 0.9) - 1)]
        print(f"  {name:<8} n={len(values):<3} p50 {statistics.median(values):.3f} s  "
              f"p90 {p90:.3f} s  max {values[-1]:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
