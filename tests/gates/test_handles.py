"""Pre-signed signal URLs: the secret derivation, its check, the key file, the controller."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from rollout.controller import Controller, UnknownSignalURL
from rollout.errors import InputError
from rollout.gates.handles import KEY_SUFFIX, SignalKey, gate_secret, secret_matches
from rollout.journal import SQLiteStore
from rollout.model import Image, Node
from rollout.policy import parse_policy

KEY = bytes(range(32))
OTHER_KEY = bytes(32)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((KEY, "r1", "tests"), (OTHER_KEY, "r1", "tests")),  # another controller's key
        ((KEY, "r1", "tests"), (KEY, "r2", "tests")),  # another rollout
        ((KEY, "r1", "tests"), (KEY, "r1", "smoke")),  # another gate
        ((KEY, "r1", "tests"), (KEY, "r1t", "ests")),  # the fields are framed
        ((KEY, "r1", "tests"), (KEY, "r1\ntests", "")),
    ],
)
def test_every_rollout_and_gate_has_its_own_secret(
    a: tuple[bytes, str, str], b: tuple[bytes, str, str]
) -> None:
    assert gate_secret(*a) != gate_secret(*b)
    assert gate_secret(*a) == gate_secret(*a)


def test_a_secret_is_43_url_safe_characters() -> None:
    for rid, gate in [("r1", "tests"), ("3f2a9c1b7d4e", "smoke-1"), ("x" * 128, "g")]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", gate_secret(KEY, rid, gate))


GOOD = gate_secret(KEY, "r1", "tests")


@pytest.mark.parametrize(
    ("rollout_id", "gate", "given", "ok"),
    [
        ("r1", "tests", GOOD, True),
        ("r1", "tests", GOOD[:-1], False),  # truncated
        ("r1", "tests", GOOD + "A", False),  # extended
        ("r1", "tests", GOOD.swapcase(), False),
        ("r1", "tests", "", False),
        ("r1", "tests", "é" * 43, False),  # not ASCII: no TypeError, just no
        ("r1", "tests", "\udcff" * 43, False),  # a lone surrogate (undecodable path)
        ("r2", "tests", GOOD, False),  # another rollout's URL
        ("r1", "smoke", GOOD, False),  # another gate's URL
    ],
)
def test_secret_matches_only_its_own_gate(rollout_id: str, gate: str, given: str, ok: bool) -> None:
    assert secret_matches(KEY, rollout_id, gate, given) is ok


def test_key_file_is_made_0600_once_and_read_again(tmp_path: Path) -> None:
    state = str(tmp_path / "state.db")
    first = SignalKey.beside(state)
    secret = first.secret("r1", "tests")
    path = Path(state + KEY_SUFFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    again = SignalKey.beside(state)  # a restarted controller
    assert again.secret("r1", "tests") == secret and again.matches("r1", "tests", secret)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_memory_store_keys_stay_in_memory(tmp_path: Path) -> None:
    key = SignalKey.beside(":memory:")
    assert key.path is None and len(key.key()) == 32
    assert key.secret("r1", "g") != SignalKey.beside(":memory:").secret("r1", "g")


@pytest.mark.parametrize(
    ("content", "mode", "says"),
    [
        ("0" * 64 + "\n", 0o644, "accessible to others (mode 0644)"),
        ("0" * 64 + "\n", 0o640, "accessible to others (mode 0640)"),
        ("not hex\n", 0o600, "not a signal key"),
        ("ab" * 16 + "\n", 0o600, "not a signal key"),  # too short
        ("", 0o600, "not a signal key"),
    ],
)
def test_a_key_file_that_cannot_be_trusted_is_refused_naming_it(
    tmp_path: Path, content: str, mode: int, says: str
) -> None:
    path = tmp_path / f"state.db{KEY_SUFFIX}"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(InputError) as err:
        SignalKey.beside(str(tmp_path / "state.db")).key()
    assert str(path) in str(err.value) and says in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_key_that_cannot_be_made_is_an_input_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot create the signal key"):
            SignalKey.beside(str(tmp_path / "state.db")).key()
    finally:
        tmp_path.chmod(0o700)


# -- the controller: which URLs exist, one answer for every wrong part ----------------------
def _controller(tmp_path: Path) -> tuple[Controller, str]:
    token = tmp_path / "agent-token"
    token.write_text("t\n")
    nodes = [Node("n1", "127.0.0.1:1", token_file=str(token))]
    policy = parse_policy(
        {"gates": [{"name": "tests", "kind": "wait", "after": "canary"},
                   {"name": "ship-it", "kind": "approval", "after": "canary"}]},
        "p",
    )  # fmt: skip
    image = Image(path="v2.img", digest="sha256:" + "0" * 64, name="x", version="2", size=1)
    controller = Controller(SQLiteStore(tmp_path / "state.db"))
    return controller, controller.create(nodes, policy, image).rollout_id


def test_controller_signal_urls_for_wait_gates_only_and_one_refusal(tmp_path: Path) -> None:
    controller, rid = _controller(tmp_path)
    paths = controller.signal_paths(rid)
    assert list(paths) == ["tests"]
    secret = paths["tests"].rsplit("/", 1)[1]
    assert paths["tests"] == f"/v1/rollouts/{rid}/gates/tests/signal/{secret}"
    key = controller.signal_key.key()
    wrong = [
        (rid, "tests", secret[:-1]),
        ("000000000000", "tests", secret),
        (rid, "nope", secret),
        ("000000000000", "tests", gate_secret(key, "000000000000", "tests")),  # no rollout
        (rid, "nope", gate_secret(key, rid, "nope")),  # no gate
        (rid, "ship-it", gate_secret(key, rid, "ship-it")),  # not a wait gate
    ]
    messages = set()
    before = controller.store.entries(rid)
    for args in wrong:
        with pytest.raises(UnknownSignalURL) as err:
            controller.signal_by_secret(*args, {"Status": "SUCCESS", "UniqueId": "x"})
        messages.add(str(err.value))
    assert messages == {"no such signal URL"}
    assert controller.store.entries(rid) == before
    sig = controller.signal_by_secret(rid, "tests", secret, {"Status": "SUCCESS", "UniqueId": "a"})
    assert sig.id == "a"
    assert controller.state(rid).gates[-1].event == "received_signal"
    # The journal holds no secret; a controller on the same state file derives the same.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*") if "key" not in p.name)
    assert secret.encode() not in raw
    again = Controller(SQLiteStore(tmp_path / "state.db"))
    assert again.signal_paths(rid) == paths


def test_an_unusable_key_refuses_a_wait_gated_rollout_before_anything_is_journaled(
    tmp_path: Path,
) -> None:
    key = tmp_path / f"state.db{KEY_SUFFIX}"
    key.write_text("0" * 64 + "\n")
    key.chmod(0o644)
    with pytest.raises(InputError, match="accessible to others"):
        _controller(tmp_path)
    store = SQLiteStore(tmp_path / "state.db")
    assert store.rollout_ids() == [] and store.lock_expiry("any") is None
