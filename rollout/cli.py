"""The command line: parse, call, print. No rollout logic lives here.

Exit codes (a contract, see docs/cli.md): 0 done, 1 the rollout did not succeed, 2 bad
input (the message names what, where, and how to fix it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import click
from aiohttp import web
from rich.console import Console

from rollout import __version__, fleet
from rollout.cliopts import registry_options
from rollout.console import EventLog, LiveProgress, configure_logging, make_console, node_table
from rollout.control import Control
from rollout.controller import Controller, rebuild
from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import DriverError
from rollout.errors import InputError
from rollout.events import Fanout, Observer
from rollout.gates.schedule import unreachable
from rollout.image import build_image, load_image
from rollout.imagefile import KIND_ROOTFS
from rollout.inventory import Inventory, load_inventory, split_address
from rollout.journal import SQLiteStore
from rollout.junit import JUnitReport
from rollout.metrics import MetricsRecorder
from rollout.model import Batch, Image, Node, NodePhase, RolloutPhase
from rollout.plan import describe, plan_batches
from rollout.policy import Policy, load_policy
from rollout.pull import PullAccess
from rollout.record import RolloutResult
from rollout.rootfs import (
    DEFAULT_INITRD,
    DEFAULT_KERNEL,
    build_rootfs_image,
    image_kind,
    load_rootfs_image,
    parse_size,
)
from rollout.sample import build_sample_image, write_sample_tree
from rollout.server import make_app
from rollout.tls import optional_server_context
from rollout.tokens import read_token

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class RolloutGroup(click.Group):
    """Turns InputError anywhere into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_INPUT)


@click.group(cls=RolloutGroup)
@click.version_option(__version__, prog_name="rollout")
def main() -> None:
    """Batched, health-checked A/B image rollouts over a fleet of node agents."""


# -- images ---------------------------------------------------------------------------------
@main.group()
def image() -> None:
    """Build and inspect image files."""


@image.command("build")
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.option("--version", "version", required=True, help="Image version, e.g. 2.0.0.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--name", help="Image name (default: manifest.json's, or the directory name).")
@click.option("--workload", help="Workload command, e.g. 'python3 app/server.py'.")
@click.option(
    "--rootfs", is_flag=True, help="A root-filesystem image: SRC_DIR as an ext4 filesystem."
)
@click.option("--compatible", help="With --rootfs: the string nodes match, e.g. rollout-vm-x86_64.")
@click.option("--unit", "units", multiple=True, help="With --rootfs: a systemd unit that must be "
              "active for the node to run (repeat for more), e.g. sample-web.service.")  # fmt: skip
@click.option("--size", help="With --rootfs: filesystem size, e.g. 512M (default: the tree's "
              "size * 1.2 + 64 MiB).")  # fmt: skip
@click.option("--kernel", help="With --rootfs: kernel path in the tree (default: vmlinuz).")
@click.option("--initrd", help="With --rootfs: initrd path in the tree (default: initrd.img).")
def image_build(
    src_dir: str,
    version: str,
    output: str,
    name: str | None,
    workload: str | None,
    rootfs: bool,
    compatible: str | None,
    units: tuple[str, ...],
    size: str | None,
    kernel: str | None,
    initrd: str | None,
) -> None:
    """Pack SRC_DIR into an image file and print its sha256 digest.

    A tree image by default; with --rootfs, a root-filesystem image (docs/images.md).
    """
    import shlex

    if not rootfs:
        rootfs_only = {
            "--compatible": compatible,
            "--unit": units,
            "--size": size,
            "--kernel": kernel,
            "--initrd": initrd,
        }
        extra = [flag for flag, value in rootfs_only.items() if value]
        if extra:
            raise InputError(f"{', '.join(extra)}: only for root-filesystem images; add --rootfs")
        command = tuple(shlex.split(workload)) if workload else None
        img = build_image(src_dir, output, version=version, name=name, command=command)
        click.echo(img.digest)
        return
    if workload:
        raise InputError(
            "--workload: only for tree images; a root-filesystem image names the systemd units "
            "that must be active with --unit NAME"
        )
    if not compatible:
        raise InputError(
            "--rootfs: needs --compatible STR, the string a node compares with its own "
            "(e.g. --compatible rollout-vm-x86_64)"
        )
    if not units:
        raise InputError(
            "--rootfs: needs --unit NAME, a systemd unit that must be active for the node to "
            "count as running (e.g. --unit sample-web.service; repeat for more)"
        )
    size_bytes = None
    if size is not None:
        try:
            size_bytes = parse_size(size)
        except ValueError as exc:
            raise InputError(f"--size: {exc}") from exc
    img = build_rootfs_image(
        src_dir,
        output,
        version=version,
        name=name or Path(src_dir).resolve().name,
        compatible=compatible,
        units=units,
        size=size_bytes,
        kernel=kernel or DEFAULT_KERNEL,
        initrd=initrd or DEFAULT_INITRD,
    )
    click.echo(img.digest)


@image.command("sample")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--bad", is_flag=True, help="A workload whose /healthz answers 500.")
def image_sample(dest: str, bad: bool) -> None:
    """Write the sample image tree (a tiny HTTP workload) into DEST, to build from."""
    root = write_sample_tree(dest, bad=bad)
    click.echo(f"sample tree in {root}; build it with: rollout image build {root} "
               "--version 1.0.0 --output v1.img")  # fmt: skip


@image.command("sample-os")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--version", required=True, help="Version of the sample OS, e.g. 2.0.0.")
@click.option("--bad", is_flag=True, help="Its service fails at boot (a release to roll back).")
def image_sample_os(output: str, version: str, bad: bool) -> None:
    """Build the sample OS root-filesystem image for VM nodes (Debian 13 + the agent).

    The first call runs debootstrap (root, about 2 minutes) and caches the tree.
    """
    from rollout.vm import guest

    img = guest.sample_image(Path(output), version, bad=bad)
    click.echo(img.digest)


@image.command("keygen")
@click.argument("prefix", type=click.Path(dir_okay=False))
def image_keygen(prefix: str) -> None:
    """Make an ed25519 key pair: PREFIX.key (private, 0600) and PREFIX.pub (public)."""
    from rollout.signing import keygen, load_public

    private, public = keygen(Path(prefix))
    click.echo(f"private key {private} (keep it secret), public key {public} "
               f"(key id {load_public(public).key_id}); give nodes the public key")  # fmt: skip


@image.command("sign")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Private key (PEM) from `rollout image keygen`.")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False), help="[default: FILE.sig]")
def image_sign(file: str, key_path: str, output: str | None) -> None:
    """Sign FILE's digest and manifest; adds to an existing signature file (key rotation)."""
    from rollout.signing import image_payload, load_private, read_signature, sign, signature_path

    out = Path(output) if output else signature_path(file)
    payload = image_payload(load_image(file))
    existing = read_signature(out) if out.exists() else None
    doc = sign(payload, load_private(Path(key_path)), existing)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    click.echo(f"{out}: {len(doc['signatures'])} signature(s) over {payload.digest}")


@image.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--key", "keys", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Trusted public key (PEM); repeat for several.")  # fmt: skip
@click.option("--signature", type=click.Path(dir_okay=False), help="[default: FILE.sig]")
def image_verify(file: str, keys: tuple[str, ...], signature: str | None) -> None:
    """Check FILE's signature against trusted keys: exit 0 when good, 2 when not."""
    from rollout.signing import load_signed_image

    img = load_signed_image(file, keys, signature)
    click.echo(f"{file}: good signature for {img.name} {img.version} ({img.digest})")


@image.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
def image_inspect(file: str) -> None:
    """Print an image's name, version, size and digest as JSON.

    For a root-filesystem image also its kind, compatible string, filesystem and units.
    """
    if image_kind(file) == KIND_ROOTFS:
        rimg, m = load_rootfs_image(file)
        click.echo(json.dumps({
            "name": rimg.name, "version": rimg.version, "size": rimg.size, "digest": rimg.digest,
            "kind": KIND_ROOTFS, "compatible": m.compatible,
            "rootfs": {"type": m.rootfs.type, "size": m.rootfs.size, "digest": m.rootfs.digest},
            "boot": {"kernel": m.boot.kernel, "initrd": m.boot.initrd}, "units": list(m.units),
        }, indent=2))  # fmt: skip
        return
    img = load_image(file)
    click.echo(json.dumps({"name": img.name, "version": img.version, "size": img.size,
                           "digest": img.digest}, indent=2))  # fmt: skip


_AUTHFILE_HELP = ("Registry auth file, {\"auths\": {\"HOST:PORT\": {\"auth\": ...}}} (default: "
                  "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, "
                  "~/.docker/config.json).")  # fmt: skip
_REGISTRY_CA_HELP = "PEM CA certificates the registry's must chain to (default: the system's)."
_PLAIN_HTTP_HELP = "Reach the registry over plain http:// (a test registry on loopback)."


@image.command("push")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("reference")
@click.option("--signature", type=click.Path(dir_okay=False),
              help="Signature file to publish too [default: FILE.sig if it exists].")  # fmt: skip
@click.option("--authfile", type=click.Path(dir_okay=False), help=_AUTHFILE_HELP)
@click.option("--registry-ca", type=click.Path(dir_okay=False), help=_REGISTRY_CA_HELP)
@click.option("--plain-http", is_flag=True, help=_PLAIN_HTTP_HELP)
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
def image_push(
    file: str,
    reference: str,
    signature: str | None,
    authfile: str | None,
    registry_ca: str | None,
    plain_http: bool,
    output: str,
) -> None:
    """Publish image FILE to an OCI registry as REFERENCE (oci://HOST[:PORT]/REPO:TAG).

    Prints the pinned reference (REPO@sha256:..., what to roll out), then the image's
    digest and size (--output json: what `image resolve` prints). Exit 2 for bad input or
    refused credentials, 1 when the registry fails.
    """
    from rollout import oci
    from rollout.signing import encode, read_signature, signature_path

    ref = oci.parse_reference(reference)
    sig_path = Path(signature) if signature is not None else signature_path(file)
    if signature is not None and not sig_path.exists():
        raise InputError(f"--signature {sig_path}: no such file")
    sig = encode(read_signature(sig_path)) if sig_path.exists() else None

    async def push() -> oci.Artifact:
        async with oci.open_client(
            ref.registry, authfile=authfile, ca_file=registry_ca, plain_http=plain_http
        ) as client:
            return await client.push(ref, file, signature=sig)

    try:
        artifact = asyncio.run(push())
    except oci.FetchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INPUT if exc.code in oci.INPUT_CODES else EXIT_FAILED)
    if output == "json":
        click.echo(json.dumps(artifact.as_dict(), indent=2))
        return
    click.echo(str(artifact.reference))
    click.echo(f"digest {artifact.blob_digest} size {artifact.size}"
               + (" signed" if artifact.signature else ""))  # fmt: skip


@image.command("resolve")
@click.argument("reference")
@click.option("--authfile", type=click.Path(dir_okay=False), help=_AUTHFILE_HELP)
@click.option("--registry-ca", type=click.Path(dir_okay=False), help=_REGISTRY_CA_HELP)
@click.option("--plain-http", is_flag=True, help=_PLAIN_HTTP_HELP)
def image_resolve(
    reference: str, authfile: str | None, registry_ca: str | None, plain_http: bool
) -> None:
    """Print what REFERENCE (oci://HOST[:PORT]/REPO:TAG or ...@sha256:...) names, as JSON:
    its pinned reference, the image's digest, size, kind, name, version and signature."""
    from rollout import oci

    ref = oci.parse_reference(reference)

    async def resolve() -> oci.Artifact:
        async with oci.open_client(
            ref.registry, authfile=authfile, ca_file=registry_ca, plain_http=plain_http
        ) as client:
            return await client.resolve(ref)

    try:
        artifact = asyncio.run(resolve())
    except oci.FetchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INPUT if exc.code in oci.INPUT_CODES else EXIT_FAILED)
    click.echo(json.dumps(artifact.as_dict(), indent=2))


# -- fleet ----------------------------------------------------------------------------------
@main.group("fleet")
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
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="ed25519 public key (PEM) the agents require images to be signed by; repeat for several.",
)
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


@main.command()
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


@main.command()
@click.option("--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
def plan(inventory_path: str, policy_path: str, output: str) -> None:
    """Print the batches a rollout would use; touches no node."""
    inv = load_inventory(inventory_path)
    pol = load_policy(policy_path)
    batches = plan_batches(inv.nodes, pol)
    rows = describe(batches, pol.batches.spread_by)
    warnings = unreachable(pol.gates, batches)
    if output == "json":
        click.echo(json.dumps({"batches": rows, "warnings": warnings}, indent=2))
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    console = make_console()
    for row in rows:
        spread = row.get("spread") or {}
        per = ", ".join(f"{k}: {v}" for k, v in spread.items())
        kind = " (canary)" if row.get("canary") else ""
        console.print(
            f"batch {row['number']}{kind}: {row['size']} node(s) {' '.join(row['nodes'])}"
            + (f"  ({per})" if per else ""),
            markup=False,
        )


# -- run ------------------------------------------------------------------------------------
def _is_terminal(log_format: str) -> bool:
    return log_format == "auto" and sys.stderr.isatty()


@contextlib.contextmanager
def _observers(log_format: str, console: Console, metrics_port: int | None,
               metrics_host: str) -> Iterator[tuple[Fanout, MetricsRecorder]]:  # fmt: skip
    recorder = MetricsRecorder()
    if metrics_port is not None:
        recorder.serve(metrics_port, metrics_host)
    live = _is_terminal(log_format)
    configure_logging("json" if log_format == "json" else "console")
    observers: list[Observer] = [recorder]
    if live:  # on a terminal the live view and the summary say it all
        progress = LiveProgress(console)
        observers.append(progress)
        with progress:
            yield Fanout(observers), recorder
    else:
        observers.append(EventLog())
        yield Fanout(observers), recorder


DEFAULT_STATE = ".rollout/state.db"


def _pick_rollout(controller: Controller, inv: Inventory, pol: Policy, img: Image,
                  policy_name: str, console: Console,
                  pull: PullAccess | None = None) -> str:  # fmt: skip
    """Resume the unfinished rollout of these nodes and this image, or create a new one
    (`Controller.resume_or_create`), saying which."""
    rollout_id, chosen, again = controller.resume_or_create(
        inv.nodes, pol, img, policy_name=policy_name, by="run", pull=pull
    )
    if chosen.kind == "resume":
        console.print(
            f"resuming rollout {rollout_id} ({chosen.phase}) from the journal", soft_wrap=True
        )
        if chosen.tag_moved_from is not None:
            console.print(
                f"[yellow]{img.reference} now names {img.digest[:19]}; this rollout stays "
                f"on the digest it resolved when it started, {chosen.tag_moved_from}[/]",
                soft_wrap=True,
            )
    elif chosen.kind == "retry":
        console.print(
            f"retrying halted rollout {rollout_id}: {len(again)} failed node(s) again",
            soft_wrap=True,
        )
    return rollout_id


def run_rollout(
    inventory_path: str,
    policy_path: str,
    image_path: str,
    *,
    state_path: str = DEFAULT_STATE,
    log_format: str = "auto",
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_linger: float = 0.0,
    listen: str | None = None,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    stop_after: str | None = None,
    junit: str | None = None,
    console: Console | None = None,
    trusted_keys: tuple[str, ...] = (),
    signature: str | None = None,
    pull: PullAccess | None = None,
) -> RolloutResult:
    """Load inputs, run (or resume) the rollout in the foreground, return its result.

    `pull`: how to reach the registry when IMAGE is an oci:// reference (pull mode)."""
    inv = load_inventory(inventory_path)
    pol = load_policy(policy_path)
    pull = replace(pull or PullAccess(), mirrors=inv.mirrors)
    img = load_any_image(image_path, pull, trusted_keys, signature)
    batches = plan_batches(inv.nodes, pol)
    stop_batch = _stop_batch(stop_after, batches)
    token = _listen_token(listen, token_file)
    ssl_context = listen_tls(tls_cert, tls_key, listen)
    console = console or make_console(stderr=True)
    store = SQLiteStore(state_path)
    try:
        reports: dict[str, JUnitReport] = {}
        with _observers(log_format, console, metrics_port, metrics_host) as (observer, rec):

            def observer_for(rid: str) -> Observer:
                return Fanout([observer, reports.setdefault(rid, JUnitReport(rid))])

            controller = Controller(store, observer_for=observer_for)
            rollout_id = _pick_rollout(
                controller, inv, pol, img, Path(policy_path).stem, console, pull
            )
            if stop_batch is not None:
                controller.stop_after[rollout_id] = stop_batch
            api = (listen, token, rec, ssl_context) if listen and token else None
            result = asyncio.run(_run_controller(controller, rollout_id, console, api))
            if metrics_port is not None and metrics_linger > 0:
                rec.wait_for_scrape(metrics_linger, count=2)  # Prometheus sees the final state
        if junit:
            reports.setdefault(rollout_id, JUnitReport(rollout_id)).write(junit, result)
        return result
    finally:
        store.close()


def load_any_image(
    image: str, pull: PullAccess, trusted_keys: Sequence[str], signature: str | None
) -> Image:
    """`--image`: a local file (push mode) or an image in a store (pull mode: an oci://
    reference, resolved to its digest now, or an https:// URL)."""
    from rollout.pull import is_remote, resolve_image
    from rollout.signing import load_signed_image

    if is_remote(image):
        return asyncio.run(resolve_image(image, pull, trusted_keys, signature))
    return load_signed_image(image, trusted_keys, signature)


def _stop_batch(stop_after: str | None, batches: Sequence[Batch]) -> int | None:
    if stop_after is None:
        return None
    if stop_after == "canary":
        if not batches or not batches[0].canary:
            raise InputError("--stop-after canary: the policy has no canary batch (canary: 0)")
        return 1
    if not stop_after.isdigit() or not 1 <= int(stop_after) <= len(batches):
        raise InputError(
            f"--stop-after: expected 'canary' or a batch number 1..{len(batches)}, "
            f"got {stop_after!r}"
        )
    return int(stop_after)


def listen_tls(
    tls_cert: str | None, tls_key: str | None, listen: str | None
) -> ssl.SSLContext | None:
    """The HTTPS context of `run --listen` for --tls-cert/--tls-key (both or neither)."""
    if listen is None and (tls_cert is not None or tls_key is not None):
        raise InputError("--tls-cert/--tls-key: only used with --listen HOST:PORT")
    return optional_server_context(tls_cert, tls_key)


def _listen_token(listen: str | None, token_file: str | None) -> str | None:
    if listen is None:
        return None
    if token_file is None:
        raise InputError("--listen: needs --token-file F; the API always authenticates")
    token = read_token(token_file, "--token-file")
    try:
        split_address(listen)  # bad input is reported before anything starts
    except ValueError as exc:
        raise InputError(f"--listen: {exc}") from exc
    return token


async def _run_controller(
    controller: Controller,
    rollout_id: str,
    console: Console,
    api: tuple[str, str, MetricsRecorder, ssl.SSLContext | None] | None = None,
) -> RolloutResult:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    controller.controls.setdefault(rollout_id, Control())  # commands and signals find it
    presses = 0

    def on_sigint() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            console.print(
                "[yellow]stopping: no new batch or node will start; in-flight nodes settle "
                "per policy (Ctrl-C again to abandon them)[/]"
            )
            controller.request_abort(rollout_id, "signal")
        elif task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal too
            loop.add_signal_handler(sig, on_sigint)
    runner: web.AppRunner | None = None
    if api is not None:  # the signal/approve API beside this one rollout
        listen, token, recorder, ssl_context = api
        host, port = split_address(listen)
        # No access log: request lines carry the wait gates' signal secrets.
        runner = web.AppRunner(
            make_app(controller, token, recorder, service=False), access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    try:
        return await controller.execute(rollout_id)
    except asyncio.CancelledError:
        engine_records = rebuild(controller.state(rollout_id)).records
        return RolloutResult(
            rollout_id,
            RolloutPhase.ABORTED,
            "abandoned by a second interrupt: nodes in flight may be uncommitted; run the "
            "same command again to resume, or their agents fall back at the commit deadline",
            engine_records,
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def print_result(result: RolloutResult, console: Console) -> None:
    rows = []
    for rec in result.nodes.values():
        rows.append({
            "node": rec.node.id,
            "batch": rec.batch,
            "phase": str(rec.phase),
            "version": rec.version,
            "reason": str(rec.reason) if rec.reason else "",
            "detail": rec.detail,
        })  # fmt: skip
    console.print(node_table(rows, f"rollout {result.rollout_id}: {result.phase}"))
    style = "green" if result.succeeded else "red"
    console.print(f"[{style}]{result.phase}[/]: {result.message}")
    unsettled = [r.node.id for r in result.nodes.values()
                 if r.phase.in_flight or r.phase is NodePhase.ROLLBACK_FAILED]  # fmt: skip
    if unsettled:
        console.print(
            f"[bold red]not settled: {', '.join(unsettled)}[/] (uncommitted; their agents fall "
            "back to the last good image at their commit deadline)"
        )


@main.command()
@click.option("--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--image",
    "image_path",
    required=True,
    help="An image file (pushed to each node), oci://HOST[:PORT]/REPO:TAG|@sha256:... or an "
    "https:// URL (each node pulls it).",
)
@registry_options
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option(
    "--metrics-linger",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="After the rollout, keep /metrics up until it is scraped once more (at most "
    "SECONDS), so Prometheus sees the final state.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="auto: live progress on a terminal, log lines otherwise.",
)
@click.option("--output", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve the controller API (gate signals, approvals, commands) during the run.",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="Bearer token for --listen.")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="PEM certificate: serve --listen over HTTPS (needs --tls-key).",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option(
    "--stop-after",
    metavar="canary|N",
    help="Stop once this batch and its gates passed (exit 0); run again to go on.",
)
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.option(
    "--state",
    "state_path",
    default=DEFAULT_STATE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Journal file (SQLite); running again with it resumes an unfinished rollout.",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="ed25519 public key (PEM): IMAGE must be signed by it (or by another --trusted-key) "
    "before any node is touched; exit 2 otherwise.",
)
@click.option(
    "--signature",
    type=click.Path(dir_okay=False),
    help="Signature file of IMAGE [default: IMAGE.sig when it exists]; sent to the agents.",
)
def run(
    inventory_path: str,
    policy_path: str,
    image_path: str,
    state_path: str,
    metrics_port: int | None,
    metrics_host: str,
    metrics_linger: float,
    log_format: str,
    output: str,
    listen: str | None,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    stop_after: str | None,
    junit: str | None,
    trusted_keys: tuple[str, ...],
    signature: str | None,
    pull: PullAccess,
) -> None:
    """Roll IMAGE out to the inventory's nodes, batch by batch, as the policy says."""
    console = make_console()
    result = run_rollout(
        inventory_path,
        policy_path,
        image_path,
        state_path=state_path,
        log_format=log_format,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        metrics_linger=metrics_linger,
        listen=listen,
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        stop_after=stop_after,
        junit=junit,
        trusted_keys=trusted_keys,
        signature=signature,
        pull=pull,
    )
    if output == "json":
        click.echo(json.dumps(_result_json(result), indent=2))
    else:
        print_result(result, console)
    sys.exit(result.exit_code)


def _result_json(result: RolloutResult) -> dict[str, Any]:
    return {
        "rollout": result.rollout_id,
        "phase": str(result.phase),
        "message": result.message,
        "nodes": [
            {
                "node": r.node.id,
                "batch": r.batch,
                "phase": str(r.phase),
                "failed": r.failed,
                "reason": str(r.reason) if r.reason else None,
                "detail": r.detail,
                "version": r.version,
                "boot_count": r.boot_count,
            }
            for r in result.nodes.values()
        ],
    }


# -- demo -----------------------------------------------------------------------------------
def _default_policy() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "policies" / "canary.yaml"
        if candidate.is_file():
            return candidate
    raise InputError("policies/canary.yaml not found; pass --policy FILE")


@main.command()
@click.option("--nodes", default=12, show_default=True, type=int)
@click.option("--bad", is_flag=True, help="Make v2 fail its health check (the canary catches it).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the fleet lives.")
@click.option("--keep", is_flag=True, help="Leave the fleet running (needs --workdir).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False))
@click.option("--base-address", default="127.0.0.2", show_default=True)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
def demo(
    nodes: int,
    bad: bool,
    workdir: str | None,
    keep: bool,
    policy_path: str | None,
    base_address: str,
    log_format: str,
) -> None:
    """Build v1 and v2, start a local fleet on v1, roll v2 out with policies/canary.yaml."""
    if keep and not workdir:
        raise InputError("--keep: needs --workdir DIR so you can find the fleet afterwards")
    policy = Path(policy_path) if policy_path else _default_policy()
    load_policy(policy)  # bad input is reported before anything starts
    console = make_console()
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rollout-demo-"))
    wd.mkdir(parents=True, exist_ok=True)
    v1 = build_sample_image(wd / "v1.img", "1.0.0")
    v2 = build_sample_image(wd / "v2.img", "2.0.0-bad" if bad else "2.0.0", bad=bad)
    console.print(
        f"images: v1 {v1.digest[:19]}  v2 {v2.digest[:19]}{' (bad)' if bad else ''}",
        soft_wrap=True,
    )
    inventory = fleet.up(wd, v1.path, fleet.FleetOptions(nodes=nodes, base_address=base_address))
    console.print(
        f"fleet: {nodes} agents up from {base_address}; inventory {inventory}", soft_wrap=True
    )
    try:
        result = run_rollout(
            str(inventory), str(policy), v2.path, state_path=str(wd / "state.db"),
            log_format=log_format,
        )  # fmt: skip
        print_result(result, console)
        rows = asyncio.run(_statuses(load_inventory(inventory).nodes, 8080))
        console.print(node_table([_short(r) for r in rows], "fleet after the rollout"))
    finally:
        if keep:
            console.print(
                f"fleet left running: rollout status --inventory {inventory}; "
                f"rollout fleet down --workdir {wd}",
                soft_wrap=True,
            )
        else:
            fleet.down(wd)
            if not workdir:
                shutil.rmtree(wd, ignore_errors=True)
    sys.exit(result.exit_code)


@main.command("schema")
@click.argument("kind", type=click.Choice(["policy", "inventory"]))
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Write the schema to FILE, not stdout."
)
def schema_command(kind: str, output: str | None) -> None:
    """Print the JSON Schema of a policy or an inventory file (for editors).

    The same schema ships as schemas/KIND.schema.json; see docs/policies.md#editors.
    """
    from rollout.schema import schema_text

    text = schema_text("policy" if kind == "policy" else "inventory")
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--output {output}: cannot write: {exc.strerror or exc}") from exc


def _register() -> None:
    from rollout import client
    from rollout.agent.cli import agent

    main.add_command(agent)
    client.register(main)


_register()

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
