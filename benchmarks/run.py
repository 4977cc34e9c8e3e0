"""Wall time, CPU time and peak RSS of the copy floors (every input byte read and written, synced), of
`hf2mcore convert` (1 and N processes; through torch, and replayed for a shape converted before) and of the peers,
each in a fresh process, --repeat rounds that run every tool in turn. Prints a markdown table row per tool (or the exact error of one that cannot run) with medians and the
median of its per-round ratios to the first tool run (the floor), then each tool's per-round ratio to the first
hf2mcore row.

The peers: ms-swift's mcore-bridge and verl's mbridge, each in its own virtual environment
(benchmarks/peers/setup.sh, which says what stand-ins they need here), ModelOpt's importer, and Megatron-Bridge
(not installable beside megatron-core 0.19: its row says why)."""
import argparse
import compileall
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLOOR = r"""
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            while chunk := f.read(64 << 20):
                g.write(chunk)
            g.flush(); os.fsync(g.fileno())
"""


REPLAYED = "hf2mcore convert (default, a shape converted before: replayed)"
# the imports, then leave as the command line does (cli.run: os._exit, without the interpreter's teardown of torch, about
# 1.2 s on this box that this row counted up to session 14)
# (with the command line's bytecode cache: where Python may not write bytecode beside torch, as on the H200 node,
# the bare imports compile torch from source every time, 8 s there, which no convert run pays)
STARTUP = ("import converter, os; from converter.imports import cache_bytecode, import_megatron_eager; "
           "cache_bytecode(); import_megatron_eager(); import torch.distributed.checkpoint; os._exit(0)")


def machine_kernel() -> float:
    """Seconds all cores have spent in the kernel so far (/proc/stat: system, irq, softirq), the kernel's own
    threads included: `cat` leaves its writeback to the flusher threads, whose time no process is charged; 0 where
    there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = f.readline().split()[1:]
    except OSError:
        return 0.0
    return sum(int(ticks[i]) for i in (2, 5, 6)) / os.sysconf("SC_CLK_TCK")


def measure(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = machine_kernel()
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if r.returncode:  # a peer that cannot run here: its exact error, for the table
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        # the exception, not a progress bar or log line printed after it
        raised = [line for line in lines if re.search(r"(Error|Exception|Interrupt|StopIteration)\b", line)]
        sys.exit(f"exit {r.returncode}: {(raised or lines or ['(no message)'])[-1]}")
    machine = machine_kernel() - machine
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    kernel = after.ru_stime - before.ru_stime
    cpu = (after.ru_utime - before.ru_utime) + kernel
    return wall, cpu, after.ru_maxrss / 1024, kernel, machine  # MiB: maxrss of the largest child so far


def settle(path: Path, timeout: float = 60.0) -> None:
    """Sync, then wait until the disk under `path` has had no request in flight for half a second: the removal of
    the previous run's output (its TRIM, on a file system mounted with `discard`) must not land in the next run,
    whichever tool that is (RESULTS.md session 13)."""
    os.sync()
    st = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(st)}:{os.minor(st)}/stat")
    if not stat.exists():  # a partition's queue counts in its own stat file; nothing to read: the sync only
        return
    quiet, end = 0, time.monotonic() + timeout
    while quiet < 5 and time.monotonic() < end:
        quiet = quiet + 1 if int(stat.read_text().split()[8]) == 0 else 0  # field 9: I/Os in flight
        time.sleep(0.1)


def warm(hf_dir: Path) -> None:
    """Read the input into the page cache (inside the kernel, to /dev/null). On this CPU box the kernel's DAMON
    reclaim pages out page cache untouched for about 60 s, at up to 128 MiB/s: an input made or last read minutes
    before a "warm" run was mostly read from disk again, by whichever tool ran first (RESULTS.md, session 14)."""
    with open(os.devnull, "wb") as null:
        for f in sorted(hf_dir.glob("*.safetensors")):
            with open(f, "rb") as src:
                size, pos = os.fstat(src.fileno()).st_size, 0
                while pos < size:
                    pos += os.sendfile(null.fileno(), src.fileno(), pos, size - pos)


def resident(hf_dir: Path) -> float | None:
    """The share of the input's bytes in the page cache (util-linux's fincore), or None without it."""
    files = sorted(str(f) for f in hf_dir.glob("*.safetensors"))
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *files], capture_output=True, text=True) \
        if shutil.which("fincore") else None
    if not r or r.returncode:
        return None
    res, size = (sum(int(line.split()[i]) for line in r.stdout.splitlines()) for i in (0, 1))
    return res / size


def evict(hf_dir: Path) -> None:
    for f in hf_dir.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the source is never written: its pages are clean
        finally:
            os.close(fd)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("--work", default="/tmp/hf2mcore-bench")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tools", nargs="*", help="run only the tools whose names contain one of these words")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="hf2mcore process counts to run")
    p.add_argument("--baseline", help="a checkout of another hf2mcore (e.g. `git worktree add DIR REV`): its convert "
                                      "runs too, one process, for paired ratios against this one")
    p.add_argument("--cold", action="store_true", help="evict the input's files from the page cache before every "
                                                       "run: read from disk, as after a download on another node "
                                                       "(Python's and torch's own files stay cached)")
    a = p.parse_args()
    work = Path(a.work)
    records = Path(f"{a.work}-records")  # replay.py's records, kept across the rounds (`work` is not)
    convert = [sys.executable, "-m", "converter", "convert", a.hf_dir, str(work / "mc"), "--no-progress",
               "--dtype", "bf16"]
    replayed = ["env", f"HF2MCORE_REPLAY={records}", *convert]
    convert = ["env", "HF2MCORE_REPLAY=off", *convert]  # each run through torch, as the first of a shape

    def baseline(cmd):  # the baseline's code first on the path, and not this checkout's (-P: not the working directory)
        path = os.pathsep.join([str(Path(a.baseline).resolve()), os.environ.get("PYTHONPATH", "")])
        i = cmd.index(sys.executable)
        return ["env", f"PYTHONPATH={path}", *cmd[:i + 1], "-P", *cmd[i + 1:]]

    peers = Path(__file__).with_name("peers")
    venvs = Path(__file__).resolve().parent.parent / ".peers"
    tools = {
        # coreutils cat copies inside the kernel (copy_file_range): no user-space buffer at all
        "kernel copy floor (cat + sync)": ["sh", "-c", 'mkdir -p "$2" && cat "$1"/*.safetensors > "$2/all" && sync',
                                           "_", a.hf_dir, str(work / "cat")],
        "I/O floor (Python copy + fsync)": [sys.executable, "-c", FLOOR, a.hf_dir, str(work / "floor")],
        **{f"hf2mcore convert ({n} process{'es' if n > 1 else ''})": convert + ["--workers", str(n)]
           for n in a.procs},
        "hf2mcore convert (default: --workers auto)": convert,
        # the same command for a source of a shape converted before (recorded once before the rounds): replay.py
        REPLAYED: replayed,
        # what every convert run pays before its first byte: the Python imports alone
        "hf2mcore start-up alone (imports)": [sys.executable, "-W", "ignore", "-c", STARTUP],
        # the part of that start-up no converter built on torch avoids: its own import, nothing of hf2mcore's
        "import torch alone": [sys.executable, "-W", "ignore", "-c", "import torch, os; os._exit(0)"],
        **({f"hf2mcore convert at {a.baseline} (1 process)": baseline(convert + ["--workers", "1"]),
            f"hf2mcore convert at {a.baseline} (default, replayed)": baseline(
                ["env", f"HF2MCORE_REPLAY={records}-baseline", *replayed[2:]])}
           if a.baseline else {}),
        "ModelOpt import_mcore_gpt_from_hf + megatron-core save": [
            sys.executable, str(Path(__file__).with_name("peer_modelopt.py")), a.hf_dir, str(work / "peer")],
        "ms-swift mcore-bridge 1.6.5 load_weights + megatron-core save": [
            str(venvs / "mcore-bridge/bin/python"), str(peers / "mcore_bridge_import.py"), a.hf_dir, str(work / "peer")],
        "verl mbridge 0.15.1 load_weights + megatron-core save": [
            str(venvs / "mbridge/bin/python"), str(peers / "mbridge_import.py"), a.hf_dir, str(work / "peer")],
        "Megatron-Bridge AutoBridge.import_ckpt": [
            sys.executable, str(Path(__file__).with_name("peer_bridge.py")), a.hf_dir, str(work / "peer")],
    }
    if a.tools:
        tools = {k: v for k, v in tools.items() if any(t.lower() in k.lower() for t in a.tools)}
    # hf2mcore with its modules' bytecode, as pip installs it (and scripts/setup.sh): where Python may not write it
    # (PYTHONDONTWRITEBYTECODE) a checkout's modules were compiled again in every run, 0.1 s of each (session 21)
    for tree in [Path(__file__).resolve().parent.parent, *([Path(a.baseline)] if a.baseline else [])]:
        for package in ("converter", "mappings"):
            compileall.compile_dir(tree / package, quiet=1)
    size = sum(f.stat().st_size for f in Path(a.hf_dir).glob("*.safetensors")) / 2**30
    print(f"input: {a.hf_dir} ({size:.2f} GiB), page cache {'evicted' if a.cold else 'read'} before every run")
    runs, errors = {name: [] for name in tools}, {}
    shutil.rmtree(records, ignore_errors=True)
    shutil.rmtree(f"{records}-baseline", ignore_errors=True)
    for name, cmd in tools.items():
        if "replayed" in name:  # through torch once: recorded
            shutil.rmtree(work, ignore_errors=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    # round robin, so every tool sees the same phases of this machine's noisy disk; every other round in reverse,
    # so no tool always runs right after the same one (after `cat`, the kernel is still reclaiming its pages)
    for i in range(a.repeat):
        for name, cmd in list(tools.items())[::-1 if i % 2 else 1]:
            if name in errors:
                continue
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            before = resident(Path(a.hf_dir))  # what the round so far left cached: the log shows it
            (evict if a.cold else warm)(Path(a.hf_dir))
            settle(work)
            # each tool runs in its own interpreter so ru_maxrss is that tool's own peak
            r = subprocess.run([sys.executable, __file__, "--one", *cmd], capture_output=True, text=True)
            if r.returncode:
                errors[name] = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                print(f"  {name}: could not run: {errors[name]}", file=sys.stderr, flush=True)
                continue
            runs[name].append(tuple(map(float, r.stdout.split())))
            cached = "" if before is None else f" (input {100 * before:.0f} % cached before it was read)"
            print(f"  {name}: {runs[name][-1][0]:.1f} s{cached}", file=sys.stderr, flush=True)
    print("| tool | wall s (median) | CPU s | kernel s | machine's kernel s | peak RSS MiB | paired ratio to floor "
          "(median) | runs (wall s) |")
    print("|---|---|---|---|---|---|---|---|")
    floor = None
    for name, rs in runs.items():
        if name in errors:
            print(f"| {name} | could not run: {errors[name].replace('|', '/')} | | | | | | |")
            continue
        wall = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        kernel = statistics.median(r[3] for r in rs)
        machine = statistics.median(r[4] for r in rs)
        rss = max(r[2] for r in rs)
        floor = floor or rs  # the first tool's runs; round i of each tool ran in the floor's round i
        paired = statistics.median(r[0] / f[0] for r, f in zip(rs, floor))
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {kernel:.1f} | {machine:.1f} | {rss:.0f} | {paired:.2f}x | "
              + " ".join(f"{r[0]:.1f}" for r in rs) + " |")
    this = next((k for k in tools if k.startswith("hf2mcore convert (") and k not in errors), None)
    if this is not None:
        print(f"\n| tool | paired ratio of wall times to {this} (median over rounds) | peak RSS ratio |")
        print("|---|---|---|")
        for name, rs in runs.items():
            if name != this and name not in errors:
                ratio = statistics.median(x[0] / y[0] for x, y in zip(rs, runs[this]))
                rss = max(r[2] for r in rs) / max(r[2] for r in runs[this])
                print(f"| {name} | {ratio:.3f} | {rss:.2f} |")
        start = "hf2mcore start-up alone (imports)"
        if start in runs and start not in errors and floor:
            less = statistics.median((x[0] - y[0]) / f[0] for x, y, f in zip(runs[this], runs[start], floor))
            print(f"\n{this} less its start-up, paired to the floor: {less:.2f}x (median over rounds)")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(records, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(*measure(sys.argv[2:]))
    else:
        main()
