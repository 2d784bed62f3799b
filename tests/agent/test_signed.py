"""An agent that trusts a key: unsigned and wrongly signed images are refused before a
byte is written; a good signature stages (real agent process, real keys)."""

from __future__ import annotations

from pathlib import Path

from rollout import signing
from tests.agent.conftest import StartAgent
from tests.conftest import SampleImages
from tests.helpers import keys, signed_copy


async def test_an_agent_that_trusts_a_key_refuses_unsigned_and_wrongly_signed_images(
    start_agent: StartAgent, images: SampleImages, tmp_path: Path
) -> None:
    k1, p1 = keys(tmp_path, "k1")
    k2, _ = keys(tmp_path, "k2")
    agent = await start_agent("--trusted-key", str(p1))
    before = await agent.status()
    code, body = await agent.stage(images.v2.path, images.v2.digest)
    assert (code, body["error"]) == (422, "unsigned") and body["written"] is False
    (tmp_path / "w").mkdir()
    wrong = signed_copy(tmp_path / "w", images.v2.path, k2)
    doc = signing.read_signature(signing.signature_path(wrong))
    code, body = await agent.stage(images.v2.path, images.v2.digest, signature=signing.encode(doc))
    assert (code, body["error"]) == (422, "bad_signature")
    # A good signature of another image does not carry over.
    (tmp_path / "v1").mkdir()
    v1 = signed_copy(tmp_path / "v1", images.v1.path, k1)
    doc = signing.read_signature(signing.signature_path(v1))
    code, body = await agent.stage(images.v2.path, images.v2.digest, signature=signing.encode(doc))
    assert (code, body["error"]) == (422, "bad_signature") and "not this image" in body["message"]
    after = await agent.status()
    assert after["staged"] is None and after["booted"] == before["booted"]
    (tmp_path / "ok").mkdir()
    good = signed_copy(tmp_path / "ok", images.v2.path, k1)
    doc = signing.read_signature(signing.signature_path(good))
    code, body = await agent.stage(images.v2.path, images.v2.digest, signature=signing.encode(doc))
    assert code == 200 and body["written"] is True, body
