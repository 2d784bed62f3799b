"""Push mode against pull mode: what the controller sends, and how long the rollout takes.

Usage (root: it counts bytes with an iptables rule it adds and removes):

    .venv/bin/python benchmarks/bench_pull.py [--nodes 50] [--image-mib 256]

Builds a tree image padded with random bytes to --image-mib, starts a real docker-registry
(TLS, basic auth; tests/registry.py) and pushes the image to it, then runs the same
rollout twice on a fresh local fleet of --nodes real agents each time:

- push: the controller streams the image to every node (prestage none);
- pull: every node fetches the blob from the registry itself, `prestage: all`.

Policy: canary 1, then batches of 25%, http + agent checks, 1 s min_healthy_time. It
prints, per mode, the rollout's wall time and the bytes the controller process sent to
the agents' port (an iptables OUTPUT rule counting TCP to dport 7000 on loopback: request
lines, headers and bodies), and in pull mode the share of one image that is. Goal: pull
mode sends < 1% of one image in total and is no slower than push mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rollout import fleet  # noqa: E402
from rollout.drivers.agent import AgentDriver  # noqa: E402
from rollout.engine import Engine  # noqa: E402
from rollout.image import build_image  # noqa: E402
from rollout.inventory import load_inventory  # noqa: E402
from rollout.model import Image  # noqa: E402
from rollout.plan import plan_batches  # noqa: E402
from rollout.policy import Policy, parse_policy  # noqa: E402
from rollout.pull import PullAccess, resolve_image  # noqa: E402
from rollout.sample import build_sample_image, write_sample_tree  # noqa: E402

AGENT_PORT = 7000
RULE = ["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(AGENT_PORT), "-j", "ACCEPT"]


def counted_bytes() -> int:
    out = subprocess.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    for line in out.splitlines():
        if f"dpt:{AGENT_PORT}" in line and "ACCEPT" in line:
            return int(line.split()[1])
    raise RuntimeError("the counting rule is gone")


def policy(prestage: str) -> Policy:
    body = {
        "activation": "soft-reboot",
        "batches": {"canary": 1, "size": "25%", "max_unavailable": "25%"},
        "health": {
            "checks": [{"type": "http", "port": 8080}, {"type": "agent"}],
            "interval": 0.25, "min_healthy_time": 1, "deadline": 120, "boot_timeout": 60,
        },
        "prestage": {"mode": prestage, "max_concurrent": 16},
    }  # fmt: skip
    return parse_policy(body, "bench")


def one_run(wd: Path, v1: Image, image: Image, nodes: int, base: str, prestage: str,
            pull: PullAccess | None) -> tuple[float, int]:  # fmt: skip
    opts = fleet.FleetOptions(nodes=nodes, base_address=base, firmware_delay=0.2,
                              kernel_delay=0.1)  # fmt: skip
    inventory = fleet.up(wd, v1.path, opts)
    try:
        pol = policy(prestage)
        batches = plan_batches(load_inventory(inventory).nodes, pol)

        async def go() -> float:
            driver = AgentDriver(pull=pull)
            engine = Engine(driver, pol, image, lambda e: None)
            t = time.perf_counter()
            try:
                result = await engine.run(batches)
            finally:
                await driver.close()
            assert result.succeeded, result.message
            return time.perf_counter() - t

        before = counted_bytes()
        took = asyncio.run(go())
        return took, counted_bytes() - before
    finally:
        fleet.down(wd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--image-mib", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the bytes are counted with an iptables rule")
    from tests.registry import registries

    subprocess.run(["iptables", "-I", *RULE], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
            wd = Path(tmp)
            v1 = build_sample_image(wd / "v1.img", "1.0.0")
            src = write_sample_tree(wd / "src")
            (src / "blob.bin").write_bytes(os.urandom(args.image_mib << 20))
            v2 = build_image(src, wd / "v2.img", version="2.0.0")
            (wd / "regs").mkdir()
            with registries(wd / "regs") as factory:
                registry = factory.start()
                ref = f"oci://{registry.address}/fleet/web:2.0"
                access = PullAccess(authfile=str(registry.authfile),
                                    ca_file=str(registry.ca_pem))  # fmt: skip

                async def publish() -> Image:
                    import aiohttp

                    async with aiohttp.ClientSession() as session:
                        await registry.client(session).push(registry.ref("fleet/web", "2.0"),
                                                            v2.path)  # fmt: skip
                    return await resolve_image(ref, access)

                t = time.perf_counter()
                pulled = asyncio.run(publish())
                push_s = time.perf_counter() - t
                print(f"machine: {os.cpu_count()} cores; {args.nodes} nodes; image "
                      f"{v2.size / 2**20:.1f} MiB; registry push {push_s:.1f} s")  # fmt: skip
                push_wall, push_bytes = one_run(wd / "push", v1, v2, args.nodes,
                                                "127.78.0.2", "none", None)  # fmt: skip
                print(
                    f"push mode (prestage none): wall {push_wall:.1f} s, controller sent "
                    f"{push_bytes / 2**20:,.1f} MiB ({push_bytes / v2.size:.2f} images)"
                )
                pull_wall, pull_bytes = one_run(wd / "pull", v1, pulled, args.nodes,
                                                "127.79.0.2", "all", access)  # fmt: skip
                print(
                    f"pull mode (prestage all):  wall {pull_wall:.1f} s, controller sent "
                    f"{pull_bytes / 2**10:,.1f} KiB ({100 * pull_bytes / v2.size:.3f}% of "
                    "one image)"
                )
                print(f"pull/push wall time: {pull_wall / push_wall:.2f}")
    finally:
        subprocess.run(["iptables", "-D", *RULE], check=True)


if __name__ == "__main__":
    main()
