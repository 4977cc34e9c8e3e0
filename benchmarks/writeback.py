"""Copy a file with kernel_copy.copy_range and fsync it, with the writeback of each piece started as it is copied
(sync_file_range) and without, alternated in one run; medians and the paired ratio.

    .venv/bin/python benchmarks/writeback.py /tmp/l1b/model.safetensors /tmp/writeback.out --repeat 10
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converter import kernel_copy  # noqa: E402


def once(src: str, dst: str, writeback: bool) -> float:
    kept = kernel_copy._sync_range
    kernel_copy._sync_range = kept if writeback else None
    try:
        t = time.perf_counter()
        fd = os.open(src, os.O_RDONLY)
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        kernel_copy.copy_range(fd, 0, os.fstat(fd).st_size, out, 0)
        os.fsync(out)
        os.close(out)
        os.close(fd)
        return time.perf_counter() - t
    finally:
        kernel_copy._sync_range = kept
        os.unlink(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst", help="a path that does not exist, on the file system to measure")
    p.add_argument("--repeat", type=int, default=10)
    a = p.parse_args()
    if kernel_copy._sync_range is None:
        sys.exit("no sync_file_range on this system: nothing to compare")
    runs = {True: [], False: []}
    for i in range(a.repeat):  # A B B A ...: neither always runs first
        for wb in (True, False) if i % 2 == 0 else (False, True):
            runs[wb].append(once(a.src, a.dst, wb))
    for wb, rs in runs.items():
        print(f"{'writeback started per piece' if wb else 'fsync at the end only':30} median {statistics.median(rs):.2f} s"
              f"  runs {' '.join(f'{r:.2f}' for r in rs)}")
    print(f"paired ratio (started / fsync only), median: "
          f"{statistics.median(x / y for x, y in zip(runs[True], runs[False])):.3f}")


if __name__ == "__main__":
    main()
