"""Staging throughput: one agent and four agents at once, against `sha256sum` of the file.

Usage: nice -n 19 .venv/bin/python benchmarks/bench_stage.py [--size-mb 1024] [--runs 3]

Builds two tree images of about --size-mb MiB each (the same random payload, two
versions, so every run replaces what the slot held before, as a real upgrade does),
times `sha256sum` and Python's hashlib (OpenSSL) on one of them, then starts four real
agents on 127.88.0.2-5 (`rollout fleet`) and stages through the controller's own send
path (`AgentDriver.stage`, `PUT /v1/image`):

- one agent: --runs timed stagings after one untimed warm-up, alternating the two images;
  the median MiB/s and its ratio to sha256sum;
- four agents at once: the same, MiB/s summed over the four (total bytes / wall time).

It also prints how long the controller takes to describe the image (`load_image`, which
hashes it) the first and the second time, and the CPU seconds the agents used per GiB.
The issue's goal: >= 0.8x sha256sum for one agent and for four together. Nothing is
asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rollout import fleet  # noqa: E402
from rollout.drivers.agent import AgentDriver  # noqa: E402
from rollout.image import build_image, load_image  # noqa: E402
from rollout.inventory import load_inventory  # noqa: E402
from rollout.model import Image, Node  # noqa: E402
from rollout.sample import build_sample_image, write_sample_tree  # noqa: E402

MIB = 1 << 20
BLOB = 64 * MIB  # payload file size: a tree of a few large files, like an OS's /usr


def build_pair(wd: Path, size_mb: int) -> tuple[Image, Image]:
    src = write_sample_tree(wd / "src")
    left = size_mb * MIB
    i = 0
    while left > 0:
        n = min(BLOB, left)
        (src / f"blob-{i:03d}.bin").write_bytes(os.urandom(n))
        left -= n
        i += 1
    return (build_image(src, wd / "v2a.img", version="2.0.0"),
            build_image(src, wd / "v2b.img", version="2.0.1"))  # fmt: skip


SUM_CPU: list[float] = []  # CPU seconds of each sha256sum run


def sha256sum_seconds(path: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["sha256sum", path], check=True, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    SUM_CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took


def hashlib_seconds(path: str) -> float:
    import hashlib

    h = hashlib.sha256()
    t = time.perf_counter()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            h.update(chunk)
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stage_all(driver: AgentDriver, nodes: list[Node], image: Image) -> float:
    t = time.perf_counter()
    written = await asyncio.gather(*(driver.stage(n, image) for n in nodes))
    took = time.perf_counter() - t
    if not all(written):
        raise RuntimeError("an agent did not write the image (already staged?)")
    return took


def mibs(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-address", default="127.88.0.2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        wd = Path(tmp)
        v1 = build_sample_image(wd / "v1.img", "1.0.0")
        t = time.perf_counter()
        a, b = build_pair(wd, args.size_mb)
        print(f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}; image {a.size / MIB:.0f} MiB "
              f"(built in {time.perf_counter() - t:.1f} s)")  # fmt: skip

        sha256sum_seconds(a.path)  # warm the page cache: every figure reads cached bytes
        sums = [sha256sum_seconds(a.path) for _ in range(args.runs)]
        ssl_s = statistics.median(hashlib_seconds(a.path) for _ in range(args.runs))
        ref = mibs(a.size, statistics.median(sums))
        print(f"sha256sum: {ref:.0f} MiB/s (median of {args.runs}); hashlib (OpenSSL): "
              f"{mibs(a.size, ssl_s):.0f} MiB/s")  # fmt: skip

        t = time.perf_counter()
        load_image(a.path)
        first = time.perf_counter() - t
        t = time.perf_counter()
        load_image(a.path)
        again = time.perf_counter() - t
        print(f"controller load_image: first {first:.3f} s, again {again:.3f} s")

        opts = fleet.FleetOptions(nodes=4, base_address=args.base_address,
                                  firmware_delay=0.1, kernel_delay=0.1)  # fmt: skip
        inventory = fleet.up(wd / "fleet", v1.path, opts)
        try:
            nodes = load_inventory(inventory).nodes
            pids = list(fleet._read_pids(wd / "fleet").values())
            images = [load_image(a.path), load_image(b.path)]

            async def timed(group: list[Node], image: Image) -> tuple[float, float]:
                """(sha256sum seconds, staging seconds) measured back to back: the machine
                is shared, so each staging is compared with a hash taken just before."""
                ref_s = sha256sum_seconds(a.path)
                cpu = time.process_time()
                took = await stage_all(driver, group, image)
                controller_cpu.append(time.process_time() - cpu)
                return ref_s, took

            controller_cpu: list[float] = []

            async def go() -> None:
                one: list[tuple[float, float]] = []
                four: list[tuple[float, float]] = []
                try:
                    await stage_all(driver, nodes[:1], images[1])  # warm-up
                    cpu0 = sum(cpu_seconds(p) for p in pids)
                    for i in range(args.runs):
                        one.append(await timed(nodes[:1], images[i % 2]))
                    cpu1 = sum(cpu_seconds(p) for p in pids)
                    report("one agent:  ", one, 1, (cpu1 - cpu0) / args.runs)
                    # Warm the other three up with what the first one holds now, so every
                    # timed run writes all four.
                    await stage_all(driver, nodes[1:], images[(args.runs - 1) % 2])
                    cpu2 = sum(cpu_seconds(p) for p in pids)
                    for i in range(args.runs):
                        four.append(await timed(nodes, images[(args.runs + i) % 2]))
                    cpu3 = sum(cpu_seconds(p) for p in pids)
                    report("four agents:", four, 4, (cpu3 - cpu2) / (4 * args.runs))
                finally:
                    await driver.close()

            def report(what: str, runs: list[tuple[float, float]], n: int, cpu: float) -> None:
                gib = a.size / (1 << 30)
                speeds = [mibs(n * a.size, s) for _, s in runs]
                ratios = [ref_s / s * n for ref_s, s in runs]
                ctl = sum(controller_cpu[-len(runs) :]) / (len(runs) * n * gib)
                print(f"{what} " + ", ".join(f"{v:.0f}" for v in speeds)
                      + f" MiB/s{' together' if n > 1 else ''}; median "
                      f"{statistics.median(speeds):.0f} MiB/s; ratio to sha256sum just before: "
                      + ", ".join(f"{r:.2f}" for r in ratios)
                      + f", median {statistics.median(ratios):.2f}x", flush=True)  # fmt: skip
                summed = statistics.median(SUM_CPU) / gib
                print(f"  CPU per GiB staged: agent {cpu / gib:.2f} s, controller {ctl:.2f} s; "
                      f"sha256sum {summed:.2f} s", flush=True)  # fmt: skip

            driver = AgentDriver()
            asyncio.run(go())
        finally:
            fleet.down(wd / "fleet")


if __name__ == "__main__":
    main()
