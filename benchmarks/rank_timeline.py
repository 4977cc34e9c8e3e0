"""Where a conversion's wall time goes, per rank: `python benchmarks/rank_timeline.py HF_DIR OUT N [--torchrun]`.

Runs one conversion in a fresh interpreter with N ranks: forked after the imports, as `convert --workers N` does,
or (--torchrun) as N torchrun processes that each import everything. Prints, for each rank, seconds since the
launch at: interpreter up, imports done, save start, first and last tensor written, save end.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def rank_main(hf_dir: str, out: str, n: int, t0: float, log: Path) -> None:
    up = time.time() - t0
    from converter.imports import import_megatron_eager

    import_megatron_eager()
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as fs

    conv = importlib.import_module("converter.convert")  # the package exports a function of that name
    marks = {"interpreter up": up, "imports done": time.time() - t0}
    save, write = conv.save_streaming, fs._write_item

    def timed_save(*a, **k):
        marks["save start"] = time.time() - t0
        r = save(*a, **k)
        marks["save end"] = time.time() - t0
        with open(log, "a") as f:  # in the rank itself: forked ranks leave with os._exit
            f.write(json.dumps({"rank": dist.get_rank(), **marks}) + "\n")
        return r

    def timed_write(*a, **k):
        marks.setdefault("first write", time.time() - t0)
        r = write(*a, **k)
        marks["last write"] = time.time() - t0
        return r

    conv.save_streaming, fs._write_item = timed_save, timed_write
    conv.convert(hf_dir, out, progress=False, workers=n)


def main() -> None:
    hf_dir, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torchrun = "--torchrun" in sys.argv[4:]
    log = Path(out + ".timeline.jsonl")
    log.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)  # not timed: removing a previous output
    t0 = time.time()
    # as the CLI runs it: no CUDA for file work
    env = {**os.environ, "TIMELINE_T0": str(t0), "TIMELINE_LOG": str(log), "CUDA_VISIBLE_DEVICES": ""}
    me = [__file__, hf_dir, out, str(1 if torchrun else n)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *me] \
        if torchrun else [sys.executable, *me]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.time() - t0
    rows = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["rank"])
    keys = [k for k in rows[0] if k != "rank"]
    print(f"{n} process(es) ({'torchrun' if torchrun else 'forked'}), wall {total:.2f} s (seconds since launch)")
    print("| rank | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['rank']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    if "TIMELINE_T0" in os.environ:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        rank_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(os.environ["TIMELINE_T0"]),
                  Path(os.environ["TIMELINE_LOG"]))
    else:
        main()
