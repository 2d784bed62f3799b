"""The controller's cost at fleet scale: `rollout simulate` at 1k, 10k and 100k nodes.

Usage: .venv/bin/python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--no-log]

Each size is one `rollout simulate` child process (so the resource usage read back with
`os.wait4` is the child's alone) over an inventory file of that many nodes, with 10%
batches, instant boots and health, the durable SQLite journal in a directory on the same
disk as the working directory (not a tmpfs), metrics, and the event log written to a file
as `rollout run` does off a terminal (`--no-log`: without it). That is the `rollout run`
path with only the nodes and the clock simulated. Printed per size: CPU (user + system),
wall, peak RSS (ru_maxrss) and CPU microseconds per node, so linear growth shows; a
1-node run first gives the fixed cost (interpreter, imports, start-up), and the last
column is the CPU per node beyond it. After each size, `pace`: the CPU seconds of a fixed
loop (bytecode.pace), because this machine's speed varies from minute to minute.

Then start-up: a child process that loads the largest inventory and the policy and plans
the batches, timed (CPU and wall) around exactly that.

Nothing is asserted: these are measurements (the goals are in issue 10: 10k nodes <= 4 s
CPU and <= 150 MB; 100k <= 45 s and <= 1 GB; 100k loaded and planned in <= 2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bytecode import compile_rollout, pace

POLICY = """\
batches: {canary: 0, size: "10%", max_unavailable: "10%"}
health: {checks: [{type: agent}], interval: 1s, min_healthy_time: 0s, deadline: 60s}
failure: {max_failed: 0, action: rollback}
"""

LOAD_AND_PLAN = """\
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from rollout.inventory import load_inventory
from rollout.plan import plan_batches
from rollout.policy import load_policy
t1, c1 = time.perf_counter(), time.process_time()
inv = load_inventory(sys.argv[1])
batches = plan_batches(inv.nodes, load_policy(sys.argv[2]))
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_wall": t1 - t0, "wall": t2 - t1, "cpu": c2 - c1,
                  "nodes": len(inv.nodes), "batches": len(batches)}))
"""


def write_inventory(path: Path, count: int) -> None:
    """`count` nodes over 40 racks and 3 zones, in the documented format."""
    lines = ["token_file: token", "nodes:"]
    for i in range(count):
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:7000"
        lines.append(
            f"  - id: node-{i + 1:06d}\n    address: {address}\n"
            f"    labels: {{rack: r{i % 40}, zone: z{i % 3}}}"
        )
    path.write_text("\n".join(lines) + "\n")


def run_child(argv: list[str], stderr_path: Path) -> tuple[float, float, float, str, int]:
    """Run `argv`; (CPU seconds, wall seconds, peak RSS MB, stdout, exit status)."""
    with stderr_path.open("wb") as err, tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    cpu = usage.ru_utime + usage.ru_stime
    return cpu, wall, usage.ru_maxrss / 1024, text, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument(
        "--no-log", action="store_true", help="no event log (the default of simulate)"
    )
    parser.add_argument("--dir", default=".", help="where the journals go (a real disk)")
    args = parser.parse_args()
    compile_rollout()  # as installed: see bytecode.py
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as tmp:
        wd = Path(tmp)
        (wd / "token").write_text("bench\n")
        policy = wd / "policy.yaml"
        policy.write_text(POLICY)
        print(
            f"{'nodes':>8} {'CPU s':>8} {'wall s':>8} {'RSS MB':>8} {'CPU us/node':>12} "
            f"{'beyond fixed':>12}  result"
        )
        fixed = 0.0
        for n in [1, *sizes]:
            inventory = wd / f"inventory-{n}.yaml"
            write_inventory(inventory, n)
            argv = [
                sys.executable, "-m", "rollout.cli", "simulate",
                "--policy", str(policy), "--inventory", str(inventory),
                "--boot", "0s", "--healthy-after", "0s",
                "--state", str(wd / f"state-{n}.db"), "--output", "json",
            ]  # fmt: skip
            if not args.no_log:
                argv += ["--log-format", "console"]
            cpu, wall, rss, out, code = run_child(argv, wd / f"log-{n}.txt")
            try:
                report = json.loads(out)
                result = f"{report['phase']}, {len(report['batches'])} batches"
            except ValueError:
                result = f"exit {code}: {(wd / f'log-{n}.txt').read_text()[-300:]}"
            if n == 1:
                fixed = cpu
            beyond = (cpu - fixed) / n * 1e6 if n > 1 else 0.0
            print(
                f"{n:>8} {cpu:>8.2f} {wall:>8.2f} {rss:>8.0f} {cpu / n * 1e6:>12.0f} "
                f"{beyond:>12.0f}  {result}; pace {pace():.2f} s"
            )
        largest = wd / f"inventory-{max(sizes)}.yaml"
        _, _, rss, out, code = run_child(
            [sys.executable, "-c", LOAD_AND_PLAN, str(largest), str(policy)], wd / "load.txt"
        )
        if code == 0:
            t = json.loads(out)
            print(
                f"start-up: {t['nodes']} nodes loaded and planned ({t['batches']} batches) in "
                f"{t['wall']:.2f} s wall, {t['cpu']:.2f} s CPU (imports {t['import_wall']:.2f} s "
                f"before), peak RSS {rss:.0f} MB"
            )
        else:
            print(f"start-up: exit {code}: {(wd / 'load.txt').read_text()[-300:]}")


if __name__ == "__main__":
    main()
