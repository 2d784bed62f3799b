"""Signed images end to end: real keys (cryptography), the real CLI, real agent processes
that trust a key, and `rollout run --trusted-key` refusing before any node is touched."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from rollout import signing
from rollout.errors import InputError
from rollout.signing import Payload, SignatureError
from tests.conftest import LocalFleet, SampleImages
from tests.helpers import keys, rollout, signed_copy, status_json, write_policy


def test_keygen_keeps_the_private_key_private_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = keys(tmp_path, "release")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes() and b"PRIVATE KEY" in private.read_bytes()
    again = rollout("image", "keygen", str(tmp_path / "release"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_sign_then_verify_and_every_way_to_fail(tmp_path: Path, images: SampleImages) -> None:
    k1, p1 = keys(tmp_path, "k1")
    _, p2 = keys(tmp_path, "k2")
    image = signed_copy(tmp_path, images.v2.path, k1)
    assert rollout("image", "verify", str(image), "--key", str(p1)).returncode == 0
    other = rollout("image", "verify", str(image), "--key", str(p2))
    assert other.returncode == 2 and "no valid signature by a trusted key" in other.stderr
    # The signature names the release: a payload edited to another version fails.
    sig = signing.signature_path(image)
    doc = json.loads(sig.read_text())
    doc["payload"]["version"] = "9.9.9"
    sig.write_text(json.dumps(doc))
    edited = rollout("image", "verify", str(image), "--key", str(p1))
    assert edited.returncode == 2 and "does not verify" in edited.stderr
    # The signature is bound to the bytes: a re-signed file then changed fails.
    signed_copy(tmp_path, images.v2.path)  # fresh copy, old signature file stays
    sig.unlink()
    image = signed_copy(tmp_path, images.v2.path, k1)
    image.write_bytes(Path(images.v1.path).read_bytes())
    changed = rollout("image", "verify", str(image), "--key", str(p1))
    assert changed.returncode == 2 and "not this image" in changed.stderr
    unsigned = tmp_path / "unsigned.img"
    unsigned.write_bytes(Path(images.v1.path).read_bytes())
    missing = rollout("image", "verify", str(unsigned), "--key", str(p1))
    assert missing.returncode == 2 and "not signed" in missing.stderr


def test_key_rotation_two_signatures_either_key_verifies(
    tmp_path: Path, images: SampleImages
) -> None:
    k1, p1 = keys(tmp_path, "old")
    k2, p2 = keys(tmp_path, "new")
    image = signed_copy(tmp_path, images.v2.path, k1, k2)
    assert len(json.loads(signing.signature_path(image).read_text())["signatures"]) == 2
    for pub in (p1, p2):
        assert rollout("image", "verify", str(image), "--key", str(pub)).returncode == 0


@pytest.mark.parametrize(
    ("name", "mutate", "code"),
    [
        ("wrong digest", lambda d: {**d, "payload": {**d["payload"], "digest": "sha256:00"}},
         "bad_signature"),
        ("no signatures", lambda d: {**d, "signatures": []}, "bad_signature"),
        ("garbage signature", lambda d: {**d, "signatures": [
            {"key_id": d["signatures"][0]["key_id"], "signature": "!!"}]}, "bad_signature"),
        ("not a document", lambda d: [], "bad_signature"),
    ],
)  # fmt: skip
def test_verify_table(name: str, mutate: Callable[[dict], object], code: str) -> None:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    trusted = [signing.TrustedKey(signing.key_id(key.public_key()), key.public_key(), "k")]
    doc = signing.sign(Payload("sha256:ab", "tree", "web", "2", None), key)
    with pytest.raises(SignatureError) as err:
        signing.verify(mutate(doc), trusted, digest="sha256:ab")
    assert err.value.code == code, name


def test_run_with_trusted_key_refuses_an_unsigned_image_before_touching_a_node(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    _, pub = keys(tmp_path, "release")
    fl = make_fleet(2, image=images.v1)
    state = tmp_path / "state.db"
    policy = str(write_policy(tmp_path))
    proc = rollout(
        "run", "--inventory", str(fl.inventory), "--policy", policy, "--image", images.v2.path,
        "--trusted-key", str(pub), "--state", str(state),
    )  # fmt: skip
    assert proc.returncode == 2 and "not signed" in proc.stderr
    assert all(row["version"] == "1.0.0" and row["staged"] is None
               for row in status_json(fl.inventory).values())  # fmt: skip
    listed = rollout("ls", "--state", str(state), "--output", "json")
    assert listed.returncode != 0 or json.loads(listed.stdout or "[]") in ([], {"rollouts": []})


def test_a_signed_rollout_reaches_agents_that_trust_the_key(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    key, pub = keys(tmp_path, "release")
    fl = make_fleet(2, image=images.v1, trusted_keys=(str(pub),))
    image = signed_copy(tmp_path, images.v2.path, key)
    policy = str(write_policy(tmp_path))
    proc = rollout("run", "--inventory", str(fl.inventory), "--policy", policy,
                   "--image", str(image), "--trusted-key", str(pub),
                   "--state", str(tmp_path / "state.db"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {row["version"] for row in status_json(fl.inventory).values()} == {"2.0.0"}


def test_load_signed_image_without_keys_passes_the_signature_along(
    images: SampleImages, tmp_path: Path
) -> None:
    key, _ = keys(tmp_path, "k")
    image = signed_copy(tmp_path, images.v2.path, key)
    assert signing.load_signed_image(image).signature is not None
    assert signing.load_signed_image(images.v1.path).signature is None
    with pytest.raises(InputError, match="no such file"):
        signing.load_signed_image(images.v1.path, signature=tmp_path / "nope.sig")


def test_a_root_filesystem_image_is_signed_with_its_compatible_string(tmp_path: Path) -> None:
    from tests.helpers import build, make_tree

    _, image = build(make_tree(tmp_path / "tree"), tmp_path / "os.img")
    key, pub = keys(tmp_path, "k")
    proc = rollout("image", "sign", str(image), "--key", str(key))
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(signing.signature_path(image).read_text())["payload"]
    assert (payload["kind"], payload["compatible"]) == ("rootfs", "rollout-vm-x86_64")
    assert rollout("image", "verify", str(image), "--key", str(pub)).returncode == 0
    # Moved to other hardware's string, the signature no longer verifies.
    doc = json.loads(signing.signature_path(image).read_text())
    doc["payload"]["compatible"] = "other-board"
    signing.signature_path(image).write_text(json.dumps(doc))
    assert rollout("image", "verify", str(image), "--key", str(pub)).returncode == 2


async def test_rollout_serve_with_a_trusted_key_refuses_an_unsigned_image(
    make_fleet: Callable[..., LocalFleet], images: SampleImages, tmp_path: Path
) -> None:
    from tests.conftest import next_host
    from tests.helpers import Service, policy_file

    key, pub = keys(tmp_path, "release")
    (tmp_path / "token").write_text("service-secret-token\n")
    svc = Service(tmp_path, next_host(), "service-secret-token", args=("--trusted-key", str(pub)))
    svc.start()
    try:
        fl = make_fleet(1, image=images.v1, trusted_keys=(str(pub),))
        policy = policy_file(tmp_path)
        body = {"inventory": str(fl.inventory), "policy": policy, "image": images.v2.path}
        status, answer = await svc.call("POST", "/v1/rollouts", body)
        assert (status, answer.get("field")) == (400, "image") and "not signed" in answer["message"]
        signed = signed_copy(tmp_path, images.v2.path, key)
        status, answer = await svc.call("POST", "/v1/rollouts", {**body, "image": str(signed)})
        assert status == 201, answer
        rid = answer["id"]
        done = await svc.wait_phase(rid, {"succeeded", "halted", "failed", "rolled_back"})
        assert done["phase"] == "succeeded", done
    finally:
        svc.kill()
