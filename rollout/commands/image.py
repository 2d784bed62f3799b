"""`rollout image ...`: build, sign, verify, inspect, push and resolve image files.

Building and signing are rollout.image, rollout.rootfs and rollout.signing; pushing to
and resolving in an OCI registry are rollout.oci. These commands parse, call and print.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from rollout.errors import InputError
from rollout.exitcodes import EXIT_FAILED, EXIT_INPUT
from rollout.image import build_image, load_image
from rollout.imagefile import KIND_ROOTFS
from rollout.rootfs import (
    DEFAULT_INITRD,
    DEFAULT_KERNEL,
    build_rootfs_image,
    image_kind,
    load_rootfs_image,
    parse_size,
)
from rollout.sample import write_sample_tree


# -- images ---------------------------------------------------------------------------------
@click.group()
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
