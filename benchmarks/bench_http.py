"""Real HTTP at scale: roll an image out to 2,000 real agents on loopback, and compare the
controller's CPU with the simulated driver's on the same path.

Usage: .venv/bin/python benchmarks/bench_http.py [--agents 2000] [--hosts 8]
       [--kernel-delay 0.1] [--batch 10%] [--skip-sim] [--skip-http]

What runs:

- The fleet: `--agents` real agents (rollout.agent.host; `--hosts` processes of
  agents/hosts each, agent i in host i % hosts, so that every batch spans every host),
  agent i on 127.66.<i // 250>.<i % 250 + 2>:7000, each with its own
  state dir, token file and aiohttp site, booted on a tiny v1 image whose workload is
  `sleep infinity` (a real child process per agent, cheap enough for 2,000). Boots are
  near instant (kexec: --kernel-delay seconds, workload grace 0.1 s). The state dirs are
  on /dev/shm by default (--agents-dir): an agent fsyncs state.json on its event loop at
  every change, and 250 agents sharing one loop and one disk would measure the disk.
- The controller: the real `rollout run` CLI as a subprocess (inventory file with one
  token file per node, SQLite journal, metrics, JSON event log on stderr, --output json)
  with a policy of 10% batches, no canary, the `agent` health check every 250 ms for
  500 ms. Its CPU (user+sys) and peak RSS come from wait4's rusage; while it runs a
  sampler thread reads /proc/PID/fd every 50 ms (open fds, socket fds) and /proc/net/tcp
  and tcp6 every 500 ms (which of those sockets are TCP connections, and in what state).
- The simulated run: the same `rollout run` command line, inventory, policy and image in
  a subprocess of this script (`--sim-child`) that swaps the controller's default driver
  factory (`rollout.controller.agent_driver`) for the in-memory SimDriver before calling
  the CLI, boots lasting as long as an agent's. Same journal, metrics and event log, so
  the difference is the HTTP driver and its sockets.

The soft RLIMIT_NOFILE of this process is raised to the hard limit and inherited by the
hosts and the controller (each host raises its own too). Every host process, workload
and temporary directory is removed at the end, also after a failure or Ctrl-C.

With --profile DIR each controller runs under cProfile on its CPU clock (not for the
figures: profiling slows it down). Nothing is asserted: these are measurements, printed
as a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bytecode import compile_rollout

from rollout.image import build_image
from rollout.inventory import dump_inventory
from rollout.model import Node

PORT = 7000
PER_BLOCK = 250  # agents per /24 (addresses .2 .. .251)
POLICY = """\
activation: kexec
batches: {canary: 0, size: "10%", max_unavailable: "10%"}
health:
  checks: [{type: agent}]
  interval: 250ms
  min_healthy_time: 500ms
  deadline: 60s
  boot_timeout: 60s
failure: {max_failed: 0, action: halt}
"""


@dataclass
class Sample:
    """Peaks of the controller process seen by the sampler."""

    fds: int = 0
    sockets: int = 0
    tcp: int = 0  # the controller's sockets found in /proc/net/tcp{,6}
    tcp_states: collections.Counter[str] = field(default_factory=collections.Counter)
    time_wait: int = 0  # system-wide TIME_WAIT (no process owns those)
    samples: int = 0


_TCP_STATES = {"01": "established", "02": "syn_sent", "06": "time_wait", "08": "close_wait",
               "0A": "listen"}  # fmt: skip


def _tcp_table() -> tuple[dict[str, str], int]:
    """(socket inode -> TCP state, TIME_WAIT count) for this network namespace's TCP
    sockets (a TIME_WAIT one has no inode: no process holds it)."""
    table: dict[str, str] = {}
    time_wait = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as fh:
            next(fh, None)
            for line in fh:
                parts = line.split()
                if len(parts) > 9:
                    if parts[3] == "06":
                        time_wait += 1
                    else:
                        table[parts[9]] = _TCP_STATES.get(parts[3], parts[3])
    return table, time_wait


def _fd_links(pid: int) -> list[str]:
    links = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def sample(pid: int, stop: threading.Event, peak: Sample) -> None:
    """Record the peaks of `pid`'s fds and TCP connections until `stop`."""
    next_tcp = 0.0
    while not stop.is_set():
        links = _fd_links(pid)
        sockets = [ln[8:-1] for ln in links if ln.startswith("socket:[")]
        peak.fds = max(peak.fds, len(links))
        peak.sockets = max(peak.sockets, len(sockets))
        peak.samples += 1
        now = time.monotonic()
        if now >= next_tcp:
            table, time_wait = _tcp_table()
            states = collections.Counter(table[s] for s in sockets if s in table)
            if sum(states.values()) > peak.tcp:
                peak.tcp, peak.tcp_states = sum(states.values()), states
            peak.time_wait = max(peak.time_wait, time_wait)
            next_tcp = time.monotonic() + 0.5
        stop.wait(0.05)


@dataclass
class RunResult:
    label: str
    wall: float
    cpu_user: float
    cpu_sys: float
    maxrss_mb: float
    exit_code: int
    phase: str
    nodes: int
    succeeded: int
    failed: list[str]
    warnings: collections.Counter[str]
    peak: Sample

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys


def run_controller(label: str, argv: list[str], wd: Path, nodes: int) -> RunResult:
    """Run `argv` (a controller command line) to completion, measuring it."""
    out_path, err_path = wd / f"{label}.out.json", wd / f"{label}.log"
    peak = Sample()
    stop = threading.Event()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=wd)
        sampler = threading.Thread(target=sample, args=(proc.pid, stop, peak), daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        result = json.loads(out_path.read_text())
    except ValueError:
        result = {"phase": "no output", "nodes": []}
    warnings: collections.Counter[str] = collections.Counter()
    for line in err_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict) and ev.get("level") in ("warning", "error", "critical"):
                warnings[f"{ev.get('level')}:{ev.get('event')}"] += 1
    rows = result.get("nodes", [])
    ok = [r for r in rows if r.get("phase") == "committed" and not r.get("failed")]
    bad = [f"{r['node']}: {r.get('phase')} {r.get('reason')} {r.get('detail')}" for r in rows
           if r not in ok]  # fmt: skip
    return RunResult(
        label, wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024,
        proc.returncode, str(result.get("phase")), nodes, len(ok), bad, warnings, peak,
    )  # fmt: skip


# -- the fleet ------------------------------------------------------------------------------
def address(i: int) -> str:
    return f"127.66.{i // PER_BLOCK}.{i % PER_BLOCK + 2}"


@dataclass
class Fleet:
    wd: Path
    state: Path  # the agents' state dirs live under it
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    host_cpu: float = 0.0

    def up(self, agents: int, hosts: int, v1: Path, kernel_delay: float, timeout: float) -> float:
        """Write the host configs, tokens and inventory; start the hosts; return seconds
        until every agent listens."""
        tokens = self.wd / "tokens"
        tokens.mkdir()
        specs: list[list[dict[str, Any]]] = [[] for _ in range(hosts)]
        width = len(str(agents))
        for i in range(agents):
            node_id = f"node-{i + 1:0{width}d}"
            token = tokens / node_id
            token.write_text(secrets.token_urlsafe(24) + "\n")
            token.chmod(0o600)
            specs[i % hosts].append({  # round robin: every batch spans every host
                "node_id": node_id,
                "listen": f"{address(i)}:{PORT}",
                "state_dir": str(self.state / node_id),
                "token_file": str(token),
            })  # fmt: skip
            rack = {"rack": f"rack-{i % 20 + 1}"}
            self.nodes.append(Node(node_id, f"{address(i)}:{PORT}", rack, str(token)))
        defaults = {
            "image": str(v1),
            "firmware_delay": 0.0,
            "kernel_delay": kernel_delay,
            "workload_grace": 0.1,
            "workload_port": 18080,
        }
        t0 = time.perf_counter()
        ready_files = []
        for k, agents_k in enumerate(s for s in specs if s):
            config = self.wd / f"host-{k}.json"
            config.write_text(json.dumps({"defaults": defaults, "agents": agents_k}))
            ready = self.wd / f"host-{k}.ready"
            ready_files.append(ready)
            with open(self.wd / f"host-{k}.log", "wb") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "rollout.agent.host", "--config", str(config),
                     "--ready-file", str(ready)],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                ))  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(r.exists() for r in ready_files):
            for k, p in enumerate(self.procs):
                if p.poll() is not None:
                    tail = (self.wd / f"host-{k}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"host {k} exited with {p.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hosts were not ready within {timeout:g}s")
            time.sleep(0.1)  # polling the ready files, with a deadline
        return time.perf_counter() - t0

    def down(self, timeout: float = 60.0) -> None:
        """SIGTERM every host (each stops its agents and their workloads), SIGKILL what is
        left, then kill any workload still running in a slot under the fleet."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # polling for exit, with a deadline
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in processes_under(self.state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_under(path: Path) -> list[int]:
    """Pids whose cwd is inside `path` (workloads run in their slot's root)."""
    prefix, found = str(path.resolve()) + os.sep, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                    found.append(int(entry))
    return found


def host_cpu(pids: list[int]) -> float:
    """User+sys CPU seconds used so far by these live processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def build_images(wd: Path) -> tuple[Path, Path]:
    src = wd / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("bench-http\n")
    command = ("sleep", "infinity")
    v1 = build_image(src, wd / "v1.img", version="1.0.0", name="bench", command=command)
    v2 = build_image(src, wd / "v2.img", version="2.0.0", name="bench", command=command)
    return Path(v1.path), Path(v2.path)


def raise_nofile() -> tuple[int, int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, *resource.getrlimit(resource.RLIMIT_NOFILE)  # before, after soft, hard


# -- the simulated controller ---------------------------------------------------------------
def sim_child(v1: str, boot_seconds: float, argv: list[str]) -> None:
    """`rollout run ARGV` with the controller's default driver swapped for SimDriver.

    Nodes are made on first use (no second inventory load), each factory-installed with
    v1, booting in `boot_seconds` on the real clock."""
    from rollout import cli, controller
    from rollout.drivers.agent import RetryHook
    from rollout.drivers.sim import SimDriver, SimFleet, SimNode
    from rollout.image import load_image
    from rollout.pull import PullAccess

    image = load_image(v1)

    class LazyFleet(SimFleet):
        def __getitem__(self, node_id: str) -> SimNode:
            sim = self.nodes.get(node_id)
            if sim is None:
                sim = self.nodes[node_id] = SimNode.factory(node_id, image)
            return sim

    fleet = LazyFleet([], image, boot_seconds=boot_seconds)

    def sim_driver(holder: str, pull: PullAccess, on_retry: RetryHook | None) -> SimDriver:
        return SimDriver(fleet)

    controller.agent_driver = sim_driver  # what Controller uses when given no driver_for
    cli.main(argv, prog_name="rollout")


# -- report ---------------------------------------------------------------------------------
def report(runs: list[RunResult], agents: int) -> None:
    print(f"\n{'':<6}{'wall s':>8}{'CPU s':>8}{'user':>7}{'sys':>7}{'us/node':>9}"
          f"{'RSS MB':>8}{'fds':>6}{'socks':>7}{'tcp':>6}  phase / errors")  # fmt: skip
    for r in runs:
        errors = len(r.failed) + (r.exit_code != 0)
        print(f"{r.label:<6}{r.wall:>8.2f}{r.cpu:>8.2f}{r.cpu_user:>7.2f}{r.cpu_sys:>7.2f}"
              f"{r.cpu / agents * 1e6:>9.0f}{r.maxrss_mb:>8.0f}{r.peak.fds:>6}"
              f"{r.peak.sockets:>7}{r.peak.tcp:>6}  {r.phase}, {r.succeeded}/{r.nodes} "
              f"committed, exit {r.exit_code}, errors {errors}")  # fmt: skip
        if r.peak.tcp_states:
            print(f"      tcp states at peak: {dict(r.peak.tcp_states)}; "
                  f"system TIME_WAIT peak {r.peak.time_wait}")  # fmt: skip
        if r.warnings:
            print(f"      warnings: {dict(r.warnings.most_common(8))}")
        for line in r.failed[:5]:
            print(f"      failed {line}")
    by = {r.label: r for r in runs}
    if "http" in by and "sim" in by and by["sim"].cpu > 0:
        print(f"\ncontroller CPU per node, HTTP / sim: {by['http'].cpu / by['sim'].cpu:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-child":
        sim_child(sys.argv[2], float(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--kernel-delay", type=float, default=0.1)
    parser.add_argument("--batch", default="10%")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    parser.add_argument(
        "--agents-dir",
        default=shm,
        help="Where the agents' state dirs go [default: /dev/shm when writable, else the "
        "temporary directory]. On tmpfs their fsyncs are free: hundreds of agents sharing "
        "one disk and one event loop would otherwise measure the disk, not the controller.",
    )
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--keep", type=Path, help="Copy the logs here before cleaning up.")
    parser.add_argument(
        "--profile",
        type=Path,
        help="Run each controller under cProfile into DIR/http.prof and DIR/sim.prof "
        "(slower: not for the figures).",
    )
    args = parser.parse_args()
    compile_rollout()  # as installed: see bytecode.py
    if args.agents > 250 * PER_BLOCK:
        parser.error(f"--agents: at most {250 * PER_BLOCK} (127.66.0.0/16)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as for Ctrl-C
    before, soft, hard = raise_nofile()
    print(f"RLIMIT_NOFILE soft {before} -> {soft} (hard {hard}); inherited by hosts and "
          "controller")  # fmt: skip
    runs: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-http-")))
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="bench-http-nodes-", dir=args.agents_dir)))  # fmt: skip
        try:
            v1, v2 = build_images(wd)
            (wd / "policy.yaml").write_text(POLICY.replace('"10%"', json.dumps(args.batch)))
            fleet = Fleet(wd, state)
            try:
                if args.skip_http:
                    for i in range(args.agents):
                        token = wd / "tokens" / f"n{i}"
                        token.parent.mkdir(exist_ok=True)
                        token.write_text("unused\n")
                        fleet.nodes.append(Node(f"n{i}", f"{address(i)}:{PORT}", {}, str(token)))
                else:
                    up_s = fleet.up(args.agents, args.hosts, v1, args.kernel_delay,
                                    args.ready_timeout)  # fmt: skip
                    per_host = -(-args.agents // args.hosts)
                    print(f"{args.agents} agents in {len(fleet.procs)} hosts "
                          f"(<= {per_host} each) listening after {up_s:.1f} s")  # fmt: skip
                dump_inventory(fleet.nodes, None, wd / "inventory.yaml")
                run_args = [
                    "run", "--inventory", str(wd / "inventory.yaml"),
                    "--policy", str(wd / "policy.yaml"), "--image", str(v2),
                    "--log-format", "json", "--output", "json",
                ]  # fmt: skip
                if not args.skip_http:
                    pids = [p.pid for p in fleet.procs]
                    cpu0 = host_cpu(pids)
                    argv = [sys.executable, *profile(args.profile, "http"), "rollout",
                            *run_args, "--state", str(wd / "http.db")]  # fmt: skip
                    runs.append(run_controller("http", argv, wd, args.agents))
                    rss = sum(_rss(p) for p in pids)
                    print(f"agent hosts: {host_cpu(pids) - cpu0:.1f} s CPU during the rollout, "
                          f"{rss / 2**20:.0f} MB RSS together")  # fmt: skip
            finally:
                fleet.down()
            if not args.skip_sim:
                boot = args.kernel_delay + 0.1  # an agent's boot: kernel delay + grace
                argv = [sys.executable, *profile(args.profile, "sim"),
                        str(Path(__file__).resolve()), "--sim-child", str(v1), str(boot),
                        *run_args, "--state", str(wd / "sim.db")]  # fmt: skip
                runs.append(run_controller("sim", argv, wd, args.agents))
        finally:
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for f in wd.glob("*.log"):
                    (args.keep / f.name).write_bytes(f.read_bytes())
    report(runs, args.agents)


_PROFILED = """\
import cProfile, os, runpy, sys, time
out, target = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
if target != "rollout":  # a script imports its neighbours, as `python SCRIPT` would let it
    sys.path.insert(0, os.path.dirname(target))
profiler = cProfile.Profile(time.process_time)  # CPU time: a starved process is not slow
try:
    profiler.runcall(runpy.run_module if target == "rollout" else runpy.run_path, target,
                     run_name="__main__")
finally:
    profiler.dump_stats(out)
"""


def profile(where: Path | None, label: str) -> list[str]:
    """Interpreter arguments that run the controller under cProfile, on the process's CPU
    clock, into WHERE/LABEL.prof; followed by a module name (rollout) or a script."""
    if where is None:
        return ["-m"] if label == "http" else []
    where.mkdir(parents=True, exist_ok=True)
    return ["-c", _PROFILED, str(where.absolute() / f"{label}.prof")]


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
