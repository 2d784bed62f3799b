"""The node agent: an A/B slot machine behind a small authenticated HTTP API.

One agent runs per node. It owns two slots (`A` and `B`) on disk, boots one of them, runs
the booted image's workload, and accepts a new image into the other slot. It is safe on
its own: a slot booted but never committed falls back to the last good slot without any
controller (boot counting, as RAUC, Mender and GRUB setups do).

Layers, pure to impure (each module's docstring says more):

    state.py     pure: the slot state machine and boot-counting decisions on a frozen
                 dataclass, and its JSON form. No I/O, no clock (``now`` is passed in).
    store.py     disk: state.json written atomically, slot directories, streaming an
                 image into a slot while hashing it, unpacking it safely.
    workload.py  the workload supervisor: one child process group, grace period,
                 restart with backoff, clean stop.
    node.py      the runtime: applies state transitions, persists them, drives the
                 supervisor, the commit deadline and real re-exec "reboots".
    app.py       the aiohttp application: auth, JSON errors, the HTTP contract.
    cli.py       the ``agent`` click command and the re-exec after a reboot.

The HTTP contract is documented in docs/agent-api.md.
"""
