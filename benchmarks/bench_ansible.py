"""Against Ansible: the same rollout by `rollout run` and by ansible-playbook.

Usage: .venv/bin/python benchmarks/bench_ansible.py [--nodes 30] [--base-address 127.99.0.2]
       [--min-healthy-time 1] [--ansible-venv ~/.cache/rollout/bench-ansible]

ansible-core is not a dependency of rollout, not even a test one. This benchmark alone
uses it: on first use it creates a virtualenv at ~/.cache/rollout/bench-ansible (or
--ansible-venv) and installs ansible-core from PyPI into it with pip; later runs reuse it.

It starts a local fleet of --nodes real agents on loopback (127.99.0.2 and up) booted on
a v1 sample image, in a temporary directory of its own, and upgrades it to v2 with the
real CLI, `rollout run`, as a subprocess: policy canary 1, then batches of 10
(max_unavailable 10), `reboot` activation, http + agent checks every 0.25 s, healthy for
--min-healthy-time. Then a fresh v1 fleet on the same addresses is upgraded by
benchmarks/ansible/upgrade.yml: `serial: [1, 10, 10, 10]`, the same steps through the
agent's documented HTTP API with the uri module (stage, activate, wait for the new boot
on the target with its workload running, wait for /healthz, stay healthy, commit),
connection local, no facts, 10 forks, pipelining (benchmarks/ansible/ansible.cfg).

Each tool starts on a settled fleet: every workload answers /healthz and the CPUs are
quiet (`settle`). Without it the first tool ran while 30 workloads were still starting
and paid about 1.5 s more start-up than the second.

For each tool it measures the wall time and the CPU (user + sys from the child's rusage,
which covers its own children too: ansible's forks) and checks that every node ends on v2,
committed. The fixed waits are what no tool can shorten, batch after batch: the agents'
simulated boot (firmware + kernel delay), the workload's grace before it counts as
running, and min_healthy_time. The overhead beyond the waits is wall - fixed waits. It
also prints the nodes' own time, from the agents' logs (per batch, the slowest node from
`activate` to `workload_running`, which adds the agents' re-exec under load), and the
agents' CPU. Nothing is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bytecode import compile_rollout

from rollout import fleet
from rollout.agent.node import AgentConfig
from rollout.inventory import load_inventory
from rollout.model import Node
from rollout.sample import build_sample_image

HERE = Path(__file__).resolve().parent
PLAYBOOK = HERE / "ansible" / "upgrade.yml"
ANSIBLE_CFG = HERE / "ansible" / "ansible.cfg"
DEFAULT_VENV = Path.home() / ".cache" / "rollout" / "bench-ansible"
CANARY, BATCH = 1, 10
INTERVAL = 0.25
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    tool: str
    wall: float
    cpu: float  # user + sys of the child and the children it waited for
    exit_code: int
    on_target: int  # nodes on v2, committed
    node_time: float  # sum over batches of the slowest node's activate -> workload_running
    agents_cpu: float  # the agents' CPU during the run, their workloads included
    phases: str = ""  # rollout only: where its wall time went, from its event log
    settled: float = 0.0  # seconds the fresh fleet took to be ready and quiet


def ensure_ansible(venv: Path) -> Path:
    """The ansible-playbook of `venv`, creating the venv and installing ansible-core from
    PyPI into it first when it is missing."""
    playbook = venv / "bin" / "ansible-playbook"
    if not playbook.exists():
        print(f"installing ansible-core from PyPI into {venv} (for this benchmark only)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "ansible-core"], check=True)
    return playbook


def measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int]:
    """Run `cmd`; return its wall time, its CPU (the rusage wait4 reports: the child and
    the descendants it waited for) and its exit code."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def agents_cpu(workdir: Path) -> float:
    """CPU seconds of the fleet's agents so far (a reboot is an execv: same pid, the
    counters go on), with their reaped children, the workloads."""
    pids = json.loads((workdir / fleet.FLEET_FILE).read_text())["pids"].values()
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def on_target(nodes: list[Node], version: str) -> int:
    done = 0
    for node in nodes:
        assert node.token_file is not None
        token = Path(node.token_file).read_text().strip()
        request = urllib.request.Request(
            f"http://{node.address}/v1/status", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            status = json.load(answer)
        if status["booted"]["version"] == version and status["committed"]:
            done += 1
    return done


def busy_fraction(span: float) -> float:
    """How busy the machine's CPUs were over the next `span` seconds (0 to 1), from
    /proc/stat: everything but idle and iowait."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(f) for f in fh.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total0, idle0 = ticks()
    time.sleep(span)
    total1, idle1 = ticks()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def settle(nodes: list[Node], workload_port: int, timeout: float = 60.0) -> float:
    """Wait until the fresh fleet is ready and quiet before a tool starts: fleet.up
    returns once the agents answer, while their workloads (a Python server each) are
    still starting and keep both CPUs busy for a second or two, which the first tool to
    run would pay in its start-up and the second would not. Every workload must answer
    /healthz, then the CPUs must be under 15% busy over a quarter second. Returns the
    seconds waited."""
    t0 = time.monotonic()
    targets = {
        n.id: (f"http://{n.address.rsplit(':', 1)[0]}:{workload_port}/healthz", None) for n in nodes
    }
    fleet.wait_healthz(targets, timeout, "workloads", "see nodes/<id>/agent.log")
    while busy_fraction(0.25) > 0.15:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the machine stayed busy for {timeout:g} s after fleet up")
    return time.monotonic() - t0


def batches(nodes: list[Node]) -> list[list[Node]]:
    """Both tools cut the inventory order the same way: 1, 10, 10, 10 (the last takes what
    is left)."""
    cut = [nodes[:CANARY]]
    rest = nodes[CANARY:]
    cut += [rest[i : i + BATCH] for i in range(0, len(rest), BATCH)]
    return [b for b in cut if b]


def node_time(workdir: Path, plan: list[list[Node]]) -> float:
    """Per batch, the slowest node's time from its agent's `activate` to the new boot's
    `workload_running`, as the agents logged them; summed over the batches."""
    total = 0.0
    for batch in plan:
        slowest = 0.0
        for node in batch:
            activated = running = None
            log = workdir / "nodes" / node.id / "agent.log"
            for line in log.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                when = event.get("timestamp")
                if event.get("event") == "activate" and when:
                    activated, running = datetime.fromisoformat(when), None
                elif event.get("event") == "workload_running" and when and activated:
                    running = running or datetime.fromisoformat(when)
            if activated and running:
                slowest = max(slowest, (running - activated).total_seconds())
        total += slowest
    return total


def rollout_phases(log: Path, began: datetime, wall: float) -> str:
    """Start-up (exec to `rollout_started`), the engine, and the exit (`rollout_finished`
    to the process's end), from the JSON event log of `rollout run`."""
    stamps: dict[str, datetime] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") in ("rollout_started", "rollout_finished"):
                stamps.setdefault(event["event"], datetime.fromisoformat(event["timestamp"]))
    if len(stamps) < 2:
        return ""
    start = (stamps["rollout_started"] - began).total_seconds()
    engine = (stamps["rollout_finished"] - stamps["rollout_started"]).total_seconds()
    return (
        f"rollout run: start-up {start:.2f} s (imports, inventory, image, journal, leases), "
        f"engine {engine:.2f} s, exit {wall - start - engine:.2f} s"
    )


def policy_yaml(min_healthy: float) -> str:
    return (
        "activation: reboot\n"
        f"batches: {{canary: {CANARY}, size: {BATCH}, max_unavailable: {BATCH}}}\n"
        "health:\n"
        "  checks: [{type: http, port: 8080}, {type: agent}]\n"
        f"  interval: {INTERVAL}\n"
        f"  min_healthy_time: {min_healthy:g}\n"
        "  deadline: 120\n"
        "failure: {max_failed: 0, action: rollback}\n"
    )


def ansible_inventory(nodes: list[Node], python: Path, agent_port: int) -> str:
    hosts = {n.id: {"ansible_host": n.address.rsplit(":", 1)[0]} for n in nodes}
    body = {
        "all": {
            "hosts": {"localhost": {"ansible_connection": "local"}},
            "vars": {"ansible_python_interpreter": str(python), "agent_port": agent_port},
            "children": {"fleet": {"hosts": hosts}},
        }
    }
    return json.dumps(body, indent=1)  # JSON is YAML


def run_tool(
    tool: str, wd: Path, v1: str, v2: str, opts: fleet.FleetOptions, args: argparse.Namespace
) -> Run:
    fleet_dir = wd / tool / "fleet"
    inventory = fleet.up(fleet_dir, v1, opts)
    try:
        nodes = list(load_inventory(inventory).nodes)
        settled = settle(nodes, opts.workload_port)
        env = dict(os.environ)
        if tool == "rollout":
            policy = wd / tool / "policy.yaml"
            policy.write_text(policy_yaml(args.min_healthy_time))
            cmd = [
                sys.executable, "-m", "rollout", "run", "--inventory", str(inventory),
                "--policy", str(policy), "--image", v2,
                "--state", str(wd / tool / "state.db"), "--log-format", "json",
            ]  # fmt: skip
        else:
            venv = args.ansible_venv
            hosts = wd / tool / "hosts.yaml"
            hosts.write_text(ansible_inventory(nodes, venv / "bin" / "python", opts.agent_port))
            extra = {
                "image": v2,
                "token_file": str(fleet_dir / fleet.TOKEN),
                "workload_port": opts.workload_port,
                "min_healthy_time": int(args.min_healthy_time),
            }
            cmd = [
                str(venv / "bin" / "ansible-playbook"), "-i", str(hosts),
                "-e", json.dumps(extra), str(PLAYBOOK),
            ]  # fmt: skip
            env |= {
                "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
                "ANSIBLE_HOME": str(wd / tool / "ansible-home"),
                "ANSIBLE_LOCAL_TEMP": str(wd / tool / "ansible-tmp"),
            }
        cpu0 = agents_cpu(fleet_dir)
        began = datetime.now(UTC)
        wall, cpu, code = measured(cmd, env, wd / tool / "output.log")
        agents = agents_cpu(fleet_dir) - cpu0
        phases = rollout_phases(wd / tool / "output.log", began, wall) if tool == "rollout" else ""
        if code != 0:
            tail = (wd / tool / "output.log").read_text(errors="replace")[-3000:]
            print(f"{tool} exited {code}; the end of its output:\n{tail}", file=sys.stderr)
        done = on_target(nodes, "2.0.0")
        spent = node_time(fleet_dir, batches(nodes))
    finally:
        fleet.down(fleet_dir)
    return Run(tool, wall, cpu, code, done, spent, agents, phases, settled)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "inf"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="rollout run against an Ansible playbook on the same local fleet.",
        epilog=(
            "ansible-core is installed from PyPI into --ansible-venv on first use, for this "
            "benchmark only; it is no dependency of rollout."
        ),
    )
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--base-address", default="127.99.0.2")
    parser.add_argument(
        "--min-healthy-time", type=int, default=1,
        help="whole seconds (>= 1, the unit of ansible's pause); default 1",
    )  # fmt: skip
    parser.add_argument(
        "--ansible-venv", type=Path, default=DEFAULT_VENV,
        help=f"virtualenv holding ansible-core (created if missing; default {DEFAULT_VENV})",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    compile_rollout()  # as installed: see bytecode.py
    if args.min_healthy_time < 1:
        parser.error("--min-healthy-time: at least 1 (ansible's pause sleeps whole seconds)")
    load_before = os.getloadavg()[0]
    playbook = ensure_ansible(args.ansible_venv)
    version = subprocess.run(
        [str(playbook), "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    opts = fleet.FleetOptions(nodes=args.nodes, base_address=args.base_address)
    wd = Path(tempfile.mkdtemp(prefix="bench-ansible-"))
    v1 = build_sample_image(wd / "v1.img", "1.0.0").path
    v2 = build_sample_image(wd / "v2.img", "2.0.0").path
    (wd / "rollout").mkdir()
    (wd / "ansible").mkdir()
    runs = [run_tool(tool, wd, v1, v2, opts, args) for tool in ("rollout", "ansible")]
    sizes = [len(b) for b in batches([Node(str(i), "") for i in range(args.nodes)])]
    n_batches = len(sizes)
    per_batch = (
        opts.firmware_delay + opts.kernel_delay + AgentConfig.workload_grace + args.min_healthy_time
    )
    fixed = n_batches * per_batch
    print(
        f"{args.nodes} agents on {args.base_address} and up, {os.cpu_count()} CPUs; "
        f"batches {n_batches} ({', '.join(map(str, sizes))}); {version}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"fixed waits {fixed:.2f} s = {n_batches} batches x (boot {opts.firmware_delay:g} + "
        f"{opts.kernel_delay:g} s, workload grace {AgentConfig.workload_grace:g} s, "
        f"min_healthy_time {args.min_healthy_time:g} s)"
    )
    own = {r.tool: r.node_time + n_batches * args.min_healthy_time for r in runs}
    print()
    header = (
        f"{'':<8} {'wall s':>8} {'CPU s':>8} {'over waits s':>13} "
        f"{'nodes own s':>12} {'over nodes s':>13} {'agents CPU s':>13} {'on v2':>6} {'exit':>5}"
    )
    print(header)
    for r in runs:
        print(
            f"{r.tool:<8} {r.wall:>8.2f} {r.cpu:>8.2f} {r.wall - fixed:>13.2f} "
            f"{own[r.tool]:>12.2f} {r.wall - own[r.tool]:>13.2f} {r.agents_cpu:>13.2f} "
            f"{r.on_target:>6} {r.exit_code:>5}"
        )
    ro, an = runs
    if ro.phases:
        print(ro.phases)
    print(
        "before each tool, the fresh fleet's workloads answered and the CPUs were quiet "
        f"after {ro.settled:.2f} s (rollout) and {an.settled:.2f} s (ansible)"
    )
    print()
    print(
        f"ansible / rollout: wall {ratio(an.wall, ro.wall)}, CPU {ratio(an.cpu, ro.cpu)}, "
        f"overhead beyond the fixed waits {ratio(an.wall - fixed, ro.wall - fixed)}, "
        "beyond the nodes' own time "
        f"{ratio(an.wall - own['ansible'], ro.wall - own['rollout'])}"
    )
    if args.keep:
        print(f"work directory kept: {wd}")
    else:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
