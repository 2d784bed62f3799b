"""Engine timing and decisions on virtual time, over simulated nodes (drivers/sim.py).

The loop's clock jumps (looptime), so boots of 10 s and health deadlines of minutes run
in milliseconds and the tests assert exact virtual seconds. The real-agent tests
(test_engine.py) prove the same paths against real processes; these pin the arithmetic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from rollout import clock
from rollout.drivers.sim import Healthy, SimDriver, SimFleet, SimProber
from rollout.engine import Engine
from rollout.events import Event, StepDone
from rollout.health import CheckResult
from rollout.model import Image, Node, NodePhase, NodeStatus, RolloutPhase
from rollout.plan import plan_batches
from rollout.policy import Check, Policy, parse_policy
from rollout.record import RolloutResult
from rollout.steps import BOOT_POLL_MAX, POLL_INTERVAL, poll_delay
from tests.helpers import seen_at

pytestmark = pytest.mark.looptime

V1 = Image("v1.img", "sha256:" + "1" * 64, "app", "1.0", 100)
V2 = Image("v2.img", "sha256:" + "2" * 64, "app", "2.0", 100)
NODES = tuple(Node(f"n{i}", f"10.0.0.{i}:7000", {"rack": f"r{i % 2}"}) for i in range(1, 7))


BOOT = 10.1
SEEN = seen_at(BOOT)  # 10.108: polls every 0.2 s, then a twentieth of the time waited


def policy(**over: Any) -> Policy:
    data: dict[str, Any] = {
        "batches": {"canary": 1, "size": 2, "max_unavailable": 2},
        "health": {
            "checks": [{"type": "agent"}],
            "interval": 5,
            "min_healthy_time": 20,
            "deadline": 120,
            "boot_timeout": 60,
        },
        "failure": {"max_failed": 0, "action": "rollback"},
    }
    for key, value in over.items():
        data[key] = data[key] | value if isinstance(data.get(key), dict) else value
    return parse_policy(data, "virtual")


async def run(
    pol: Policy, healthy: Healthy, nodes: tuple[Node, ...] = NODES
) -> tuple[RolloutResult, SimFleet, list[Event], float]:
    fleet = SimFleet(nodes, V1, boot_seconds=BOOT)  # seen at the boot poll after: SEEN
    driver = SimDriver(fleet)
    events: list[Event] = []
    engine = Engine(driver, pol, V2, events.append, prober_for=lambda _: SimProber(fleet, healthy))
    start = clock.now()
    result = await engine.run(plan_batches(nodes, pol))
    await driver.close()
    return result, fleet, events, clock.now() - start


def always(node: str, digest: str, since_boot: float) -> bool:
    return True


async def test_exact_virtual_duration_of_a_clean_rollout() -> None:
    result, fleet, events, took = await run(policy(), always)
    assert result.phase is RolloutPhase.SUCCEEDED
    # 4 batches (1 + 2 + 2 + 1): each boots (10.1 s, seen at the next status poll) and
    # is healthy from its first check, so min_healthy_time (20 s, checked every 5 s) holds
    # at the 5th check: SEEN + 20 s per batch.
    assert SEEN == pytest.approx(10.108, abs=0.001)
    assert took == pytest.approx(4 * (SEEN + 20), abs=0.05)
    assert [n.boot_count for n in fleet.nodes.values()] == [2] * 6
    boots = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "boot"]
    assert boots == [pytest.approx(SEEN, abs=0.001)] * 6


async def test_health_deadline_fails_at_exactly_the_deadline_then_rolls_back() -> None:
    never_v2 = lambda node, digest, t: digest != V2.digest  # noqa: E731
    result, fleet, events, took = await run(policy(), never_v2)
    assert result.phase is RolloutPhase.ROLLED_BACK
    canary = result.nodes["n1"]
    assert canary.reason == "health_deadline" and canary.phase is NodePhase.ROLLED_BACK
    verify = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "verify"]
    assert verify == [pytest.approx(120, abs=0.01)]  # the deadline, not a second more
    assert took == pytest.approx(SEEN + 120 + SEEN, abs=0.05)  # boot, deadline, boot back
    assert fleet["n1"].boot_count == 3 and fleet["n1"].slots[fleet["n1"].booted] == V1.digest
    assert all(fleet[n.id].boot_count == 1 for n in NODES[1:])


async def test_failure_threshold_fails_early() -> None:
    never_v2 = lambda node, digest, t: digest != V2.digest  # noqa: E731
    result, _, events, _ = await run(policy(health={"failure_threshold": 3}), never_v2)
    verify = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "verify"]
    assert verify == [pytest.approx(10, abs=0.01)]  # checks at 0, 5, 10 s
    assert result.nodes["n1"].reason == "unhealthy"


async def test_a_flap_restarts_min_healthy_time() -> None:
    # Healthy, except between 12 and 17 s after boot: the streak restarts at the check at 20 s.
    flappy = lambda node, digest, t: not (12 <= t < 17)  # noqa: E731
    result, _, events, _ = await run(policy(), flappy, NODES[:1])
    assert result.phase is RolloutPhase.SUCCEEDED
    verify = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "verify"]
    # checks at 0 (ok), held: looks at 5, 10 (ok), 15 (fail), rounds: 20 ok, held: 40 ok;
    # healthy since 20 -> done at 40 s
    assert verify == [pytest.approx(40, abs=0.01)]


@pytest.mark.parametrize(
    ("checks", "verified"),
    [
        # Held: one look after the first passing round, over the rest of the 12 s.
        ([{"type": "agent"}], 12),
        # An http check is not held: rounds at 0, 5, 10 and 15 s.
        ([{"type": "agent"}, {"type": "http", "port": 8080}], 15),
    ],
    ids=["agent_only_held", "with_http_rounds"],
)
async def test_min_healthy_time_between_rounds(checks: list[Any], verified: float) -> None:
    pol = policy(health={"checks": checks, "min_healthy_time": 12})
    result, _, events, _ = await run(pol, always, NODES[:1])
    assert result.phase is RolloutPhase.SUCCEEDED
    verify = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "verify"]
    assert verify == [pytest.approx(verified, abs=0.01)]


class FirstRounds(SimProber):
    """The simulated prober, recording the statuses it is offered as first rounds."""

    def __init__(self, fleet: SimFleet) -> None:
        super().__init__(fleet, always)
        self.offered: list[tuple[int, str | None]] = []

    def first_round(
        self, checks: Sequence[Check], target_digest: str, st: NodeStatus
    ) -> list[CheckResult] | None:
        self.offered.append((st.boot_count, st.booted_digest))
        return None


async def test_each_node_s_boot_status_is_offered_as_its_first_round() -> None:
    fleet = SimFleet(NODES[:3], V1, boot_seconds=BOOT)
    driver = SimDriver(fleet)
    prober = FirstRounds(fleet)
    engine = Engine(driver, policy(), V2, lambda e: None, prober_for=lambda _: prober)
    result = await engine.run(plan_batches(NODES[:3], policy()))
    await driver.close()
    assert result.phase is RolloutPhase.SUCCEEDED
    # The status read once each node was back: its second boot, on the target.
    assert prober.offered == [(2, V2.digest)] * 3


@pytest.mark.parametrize(
    ("max_failed", "action", "phase", "activated"),
    [
        (0, "rollback", RolloutPhase.ROLLED_BACK, 1),  # the canary only
        (0, "halt", RolloutPhase.HALTED, 1),
        (1, "halt", RolloutPhase.HALTED, 3),  # canary tolerated; batch 2 adds a 2nd failure
        (0, "continue", RolloutPhase.FAILED, 6),  # every batch tried
        ("50%", "halt", RolloutPhase.FAILED, 6),  # 3 of 6 tolerated: goes on, ends failed
    ],
)
async def test_failure_tolerance_and_actions(
    max_failed: Any, action: str, phase: RolloutPhase, activated: int
) -> None:
    odd = lambda node, digest, t: digest != V2.digest or int(node[1:]) % 2 == 0  # noqa: E731
    pol = policy(failure={"max_failed": max_failed, "action": action},
                 health={"failure_threshold": 2})  # fmt: skip
    result, fleet, _, _ = await run(pol, odd)
    assert result.phase is phase, result.message
    assert len(fleet.activations) == activated
    for node_id, sim in fleet.nodes.items():  # failed nodes are always back on v1
        if result.nodes[node_id].failed:
            assert sim.slots[sim.booted] == V1.digest and sim.committed


async def test_pause_holds_on_virtual_time_until_resumed() -> None:
    fleet = SimFleet(NODES[:3], V1, boot_seconds=10)
    driver = SimDriver(fleet)
    pol = policy(batches={"canary": 1, "size": 1, "max_unavailable": 1})
    engine = Engine(driver, pol, V2, lambda e: None,
                    prober_for=lambda _: SimProber(fleet, always))  # fmt: skip
    task = asyncio.create_task(engine.run(plan_batches(NODES[:3], pol)))
    await asyncio.sleep(1)  # virtual: the canary is booting
    engine.control.pause()
    await asyncio.sleep(3600)  # an hour of virtual time while paused
    assert [n.node_id for n in fleet.nodes.values() if n.boot_count > 1] == ["n1"]
    assert not task.done()
    engine.control.resume()
    result = await task
    assert result.phase is RolloutPhase.SUCCEEDED
    assert [t for _, t in fleet.activations][1] >= 3600  # batch 2 only after the resume


@pytest.mark.parametrize(
    ("waited", "delay"),
    [
        pytest.param(0.0, POLL_INTERVAL, id="at-once"),
        pytest.param(3.9, POLL_INTERVAL, id="a-quick-boot-every-0.2s"),
        pytest.param(10.0, 0.5, id="a-twentieth-of-the-wait"),
        pytest.param(39.0, 1.95, id="still-growing"),
        pytest.param(40.0, BOOT_POLL_MAX, id="capped"),
        pytest.param(3600.0, BOOT_POLL_MAX, id="an-hour-still-capped"),
    ],
)
def test_boot_polls_back_off_with_the_time_waited(waited: float, delay: float) -> None:
    assert poll_delay(waited) == pytest.approx(delay)


async def test_a_long_reboot_is_polled_a_fifth_as_often_and_seen_within_2s() -> None:
    boot = 90.0
    fleet = SimFleet(NODES[:1], V1, boot_seconds=boot)
    driver = SimDriver(fleet)
    polls: list[float] = []
    status = driver.status

    async def counted(node: Node) -> Any:
        polls.append(clock.now())
        return await status(node)

    driver.status = counted  # type: ignore[method-assign]
    events: list[Event] = []
    pol = policy(health={"boot_timeout": 300, "min_healthy_time": 0})
    engine = Engine(driver, pol, V2, events.append, prober_for=lambda _: SimProber(fleet, always))
    result = await engine.run(plan_batches(NODES[:1], pol))
    assert result.phase is RolloutPhase.SUCCEEDED
    (took,) = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "boot"]
    assert boot <= took <= boot + BOOT_POLL_MAX
    assert took == pytest.approx(seen_at(boot), abs=0.001)
    in_boot = [t for t in polls if polls[0] < t]  # the boot wait's (after the first look)
    assert len(in_boot) <= 100 < boot / POLL_INTERVAL  # 450 at a fixed 0.2 s


async def test_a_node_not_back_fails_at_exactly_the_boot_timeout() -> None:
    # Backed-off polls (up to 2 s apart) still end the wait at the timeout, not past it.
    fleet = SimFleet(NODES[:1], V1, boot_seconds=90.0)
    driver = SimDriver(fleet)
    events: list[Event] = []
    pol = policy(health={"boot_timeout": 61})
    engine = Engine(driver, pol, V2, events.append, prober_for=lambda _: SimProber(fleet, always))
    result = await engine.run(plan_batches(NODES[:1], pol))
    assert result.nodes["n1"].reason == "boot_timeout"
    boots = [e.seconds for e in events if isinstance(e, StepDone) and e.step == "boot"]
    assert boots[0] == pytest.approx(61.0, abs=0.001)
