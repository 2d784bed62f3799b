"""`rollout fleet up|down` and `rollout status`: a local fleet of real agents, and what
every node of an inventory says about itself (rollout.fleet does the work).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click

from rollout import fleet
from rollout.cliopts import trusted_key_option
from rollout.console import make_console, node_table
from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import DriverError
from rollout.errors import InputError
from rollout.exitcodes import EXIT_FAILED
from rollout.inventory import load_inventory
from rollout.model import Node


# -- fleet ----------------------------------------------------------------------------------
@click.group("fleet")
def fleet_group() -> None:
    """Start and stop a local fleet of real agents on loopback addresses."""


@fleet_group.command("up")
@click.option("--nodes", default=None, type=int, help="Nodes [default: 12, or 2 with --vm].")
@click.option("--workdir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--image",
    "image_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Image every node boots first (required; with --vm, a root-filesystem image, "
    "by default the sample OS 1.0.0).",
)
@click.option(
    "--vm",
    is_flag=True,
    help="Real Linux nodes: QEMU virtual machines with A/B partitions and GRUB (the disk "
    "backend; docs/real-nodes.md).",
)
@click.option("--memory", default=384, show_default=True, type=int, help="With --vm: MiB per VM.")
@click.option("--base-address", default=None, help="First loopback address [default: "
              "127.0.0.2, or 127.0.0.20 with --vm].")  # fmt: skip
@click.option("--agent-port", default=7000, show_default=True, type=int)
@click.option("--workload-port", default=8080, show_default=True, type=int)
@click.option("--firmware-delay", default=0.6, show_default=True, type=float)
@click.option("--kernel-delay", default=0.3, show_default=True, type=float)
@click.option("--commit-deadline", default=300.0, show_default=True, type=float)
@click.option(
    "--tls",
    is_flag=True,
    help="Agents serve HTTPS: make a private CA (WORKDIR/ca.pem) and one certificate per "
    "node (in-process, with the cryptography package), and write ca_file into the inventory.",
)
@trusted_key_option("the agents require images signed by it (or another); repeat for several.")
def fleet_up(
    nodes: int | None,
    workdir: str,
    image_path: str | None,
    vm: bool,
    memory: int,
    base_address: str | None,
    agent_port: int,
    workload_port: int,
    firmware_delay: float,
    kernel_delay: float,
    commit_deadline: float,
    tls: bool,
    trusted_keys: tuple[str, ...],
) -> None:
    """Start N agents booted on IMAGE and write WORKDIR/inventory.yaml."""
    if vm:
        from rollout.vm import fleet as vm_fleet

        vm_opts = vm_fleet.VMFleetOptions(
            nodes=2 if nodes is None else nodes,
            base_address=base_address or "127.0.0.20",
            memory=memory,
            commit_deadline=commit_deadline,
            trusted_keys=trusted_keys,
        )
        click.echo("building or reusing the VM images and disks, then booting (~1 min)...")
        inventory = vm_fleet.up(workdir, image_path, vm_opts)
        click.echo(f"{vm_opts.nodes} VMs up; inventory: {inventory}")
        return
    if image_path is None:
        raise InputError("--image: required (the image every agent boots first)")
    nodes = 12 if nodes is None else nodes
    opts = fleet.FleetOptions(
        nodes=nodes,
        base_address=base_address or "127.0.0.2",
        agent_port=agent_port,
        workload_port=workload_port,
        firmware_delay=firmware_delay,
        kernel_delay=kernel_delay,
        commit_deadline=commit_deadline,
        tls=tls,
        trusted_keys=trusted_keys,
    )
    inventory = fleet.up(workdir, image_path, opts)
    click.echo(f"{nodes} agents up{' (HTTPS)' if tls else ''}; inventory: {inventory}")


@fleet_group.command("down")
@click.option("--workdir", required=True, type=click.Path(file_okay=False))
def fleet_down(workdir: str) -> None:
    """Stop every agent and workload (or VM) of the fleet in WORKDIR."""
    from rollout.vm import fleet as vm_fleet

    if vm_fleet.is_vm_fleet(Path(workdir)):
        click.echo(f"stopped {vm_fleet.down(workdir)} VM(s)")
        return
    count = fleet.down(workdir)
    click.echo(f"stopped {count} agent(s)")


# -- status and plan ------------------------------------------------------------------------
async def _statuses(nodes: tuple[Node, ...], workload_port: int) -> list[dict[str, Any]]:
    driver = AgentDriver()

    async def one(http: aiohttp.ClientSession, node: Node) -> dict[str, Any]:
        row: dict[str, Any] = {"node": node.id, "address": node.address}
        try:
            st = await driver.status(node)
        except DriverError as exc:
            return row | {"error": str(exc)}
        healthy: bool | None
        try:
            async with http.get(f"http://{node.host}:{workload_port}/healthz") as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy = False
        return row | {
            "version": st.booted_version,
            "digest": st.booted_digest,
            "committed": st.committed,
            "staged": st.staged_digest,
            "boot_count": st.boot_count,
            "workload": st.workload,
            **({"root": st.root_device} if st.root_device else {}),
            "healthy": healthy,
        }

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            return list(await asyncio.gather(*(one(http, n) for n in nodes)))
    finally:
        await driver.close()


def _short(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("digest"), str):
        out["digest"] = out["digest"].removeprefix("sha256:")[:12]
    out.pop("address", None)
    if isinstance(out.get("staged"), str):
        out["staged"] = out["staged"].removeprefix("sha256:")[:12]
    return out


@click.command()
@click.option("--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--workload-port", default=8080, show_default=True, type=int)
def status(inventory_path: str, output: str, workload_port: int) -> None:
    """Show each node's booted version, digest, committed flag, boots and health."""
    inv = load_inventory(inventory_path)
    rows = asyncio.run(_statuses(inv.nodes, workload_port))
    if output == "json":
        click.echo(json.dumps({"nodes": rows}, indent=2))
    else:
        make_console().print(node_table([_short(r) for r in rows], "fleet status"))
    if any("error" in r for r in rows):
        sys.exit(EXIT_FAILED)
