"""What sits behind the agent's API: the slot/boot/workload side of one node.

The runtime (node.py) owns the state machine, persistence, leases and the HTTP-facing
rules; a backend owns everything that touches the machine:

- `emulated` (emulated.py): slots are directories, a reboot is a re-exec of the agent
  process after a simulated delay, the workload is a child process. The embedded default
  for the local fleet, the demo and the fast tests.
- `disk` (disk.py): a real Linux node. Slots are block devices, the bootloader is GRUB
  with boot counting in its environment block, activation is `systemctl
  reboot|kexec|soft-reboot`, the workload is the image's own systemd units.

The contract, in the order the runtime calls it:

    recover(state)         clean up what a killed previous agent process left behind
    boot_identity()        None (every agent start is a boot) or an id of the running
                           kernel boot; the same id as the state's `boot_id` means the
                           agent restarted without a boot, so nothing is counted again
    booted_slot()          None (the plan decides, emulated) or the slot the root
                           filesystem really came from (disk: by device identity)
    boot_delay(mode)       simulated seconds to wait before the boot completes
    after_boot(state)      make the bootloader agree with the persisted state
    start_workload(state) / stop_workload() / workload_snapshot()
    write_slot(slot, ...)  stream an image into an inactive slot, verified
    clear_slot(slot)       after a failed write
    switch(state)          carry out the persisted pending boot: IN_PROCESS (the runtime
                           boots again at once), REEXEC (the runtime exits and the CLI
                           re-executes) or WAIT (the machine is going down; serve until
                           the service manager stops this process)
    commit(state)          the booted slot was confirmed: tell the bootloader
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, Callable
from typing import Any, Protocol

from rollout.agent.state import AgentState, Slot, SlotImage
from rollout.model import ActivationMode


class SwitchResult(enum.StrEnum):
    IN_PROCESS = "in_process"
    REEXEC = "reexec"
    WAIT = "wait"


OnWorkloadFailed = Callable[[int, float], None]
IsCommitted = Callable[[], bool]


class Backend(Protocol):
    kind: str

    def factory_state(self) -> AgentState:
        """The first state of a node that has none yet (InputError when it cannot)."""
        ...

    def recover(self, state: AgentState) -> None:
        """At agent start: clean up after a previous process that died (blocking)."""
        ...

    def boot_identity(self) -> str | None: ...

    def booted_slot(self) -> Slot | None: ...

    def boot_delay(self, mode: ActivationMode | None, soft: bool) -> float: ...

    async def after_boot(self, state: AgentState) -> None: ...

    def start_workload(self, state: AgentState) -> None: ...

    async def stop_workload(self) -> None: ...

    def workload_snapshot(self) -> dict[str, Any]: ...

    async def write_slot(
        self, state: AgentState, slot: Slot, digest: str, body: AsyncIterable[bytes]
    ) -> tuple[SlotImage, int]:
        """Write `body` into `slot`, hashing it; verified image and bytes received.

        Raises AgentError (digest_mismatch, bad_image, unsafe_image, incompatible,
        too_large, upload_incomplete); the runtime then calls `clear_slot`.
        """
        ...

    def clear_slot(self, slot: Slot) -> None: ...

    async def switch(self, state: AgentState) -> SwitchResult: ...

    async def commit(self, state: AgentState) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What status reports about the machine under the agent (`backend` field)."""
        ...
