"""The emulated backend: the agent process is the machine.

Slots are directories under the state dir (store.py: the image tar, hashed and unpacked
while it streams), a reboot or kexec is a re-exec of the agent process after a simulated
delay (reboot = firmware + kernel, kexec = kernel), a soft reboot is done in-process, and
the workload is the image manifest's command, run as a supervised child process with the
slot's unpacked root as its working directory (workload.py).

Every agent start is a boot here (`boot_identity` is None) and the persisted plan decides
which slot boots (`booted_slot` is None): this is the simulated firmware.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from rollout.agent import state as sm
from rollout.agent.backend import IsCommitted, OnWorkloadFailed, SwitchResult
from rollout.agent.state import AgentState, Slot, SlotImage
from rollout.agent.store import Store
from rollout.agent.workload import Supervisor, WorkloadSpec, reap_leftover
from rollout.errors import InputError
from rollout.model import ActivationMode

if TYPE_CHECKING:
    from rollout.agent.node import AgentConfig

log = structlog.get_logger("rollout.agent")


class EmulatedBackend:
    kind = "emulated"

    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        *,
        is_committed: IsCommitted,
        on_workload_failed: OnWorkloadFailed,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store
        self.workload = Supervisor(
            log_path=store.log_path,
            pid_path=store.workload_pid_path,
            port=config.workload_port,
            grace=config.workload_grace,
            should_restart=is_committed,
            on_failed=on_workload_failed,
            on_change=on_change,
        )

    def factory_state(self) -> AgentState:
        if self.config.image is None:
            raise InputError(
                f"{self.config.state_dir}: no agent state yet; pass --image FILE to "
                "install the first image into slot A"
            )
        image = self.store.install_file(Slot.A, self.config.image)
        return sm.factory_state(image)

    def recover(self, state: AgentState) -> None:
        """A previous agent process may have died (SIGKILL): stop the workload it left,
        which still holds the port, and drop half-written slot files."""
        reap_leftover(self.store.workload_pid_path)
        for path in self.store.remove_partial(state):
            log.warning("partial_removed", path=path)

    def boot_identity(self) -> str | None:
        return None

    def booted_slot(self) -> Slot | None:
        return None

    def boot_delay(self, mode: ActivationMode | None, soft: bool) -> float:
        if soft:
            return 0.0
        return sm.boot_delay(
            mode, firmware=self.config.firmware_delay, kernel=self.config.kernel_delay
        )

    async def after_boot(self, state: AgentState) -> None:
        return None

    def start_workload(self, state: AgentState) -> None:
        image = state.booted_image
        manifest = self.store.manifest(state.booted)
        env = {
            **os.environ,
            **manifest.env,
            "ROLLOUT_WORKLOAD_HOST": self.config.host,
            "ROLLOUT_WORKLOAD_PORT": str(self.config.workload_port),
            "ROLLOUT_NODE_ID": self.config.node_id,
            "ROLLOUT_IMAGE_VERSION": image.version,
            "ROLLOUT_IMAGE_DIGEST": image.digest,
        }
        self.workload.start(
            WorkloadSpec(command=manifest.command, cwd=self.store.root(state.booted), env=env)
        )

    async def stop_workload(self) -> None:
        await self.workload.stop()

    def workload_snapshot(self) -> dict[str, Any]:
        return self.workload.snapshot()

    async def write_slot(
        self, state: AgentState, slot: Slot, digest: str, body: AsyncIterable[bytes]
    ) -> tuple[SlotImage, int]:
        return await self.store.receive(slot, digest, body)  # one pass: see store.py

    def clear_slot(self, slot: Slot) -> None:
        self.store.clear_slot(slot)

    async def switch(self, state: AgentState) -> SwitchResult:
        pending = state.pending
        if pending is not None and pending.mode is ActivationMode.SOFT_REBOOT:
            return SwitchResult.IN_PROCESS
        return SwitchResult.REEXEC

    async def commit(self, state: AgentState) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}
