"""Peak RSS of each rank when `converter.megatron_model` loads HF weights into a live model: 1 process, then
TP=2 and PP=2 under torchrun. Each rank should hold about its own shard, not the whole model.
Prints a markdown table: layout, rank, bytes of the rank's parameters, peak RSS, wall time."""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp)


def worker(hf_dir, tp, pp, out):
    import torch.distributed as dist

    from converter.live import megatron_model

    t = time.perf_counter()
    model = megatron_model(hf_dir, tp=int(tp), pp=int(pp), dtype="bf16")
    wall = time.perf_counter() - t
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"own": own, "rss": rss, "wall": wall}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    a = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    print("| layout | rank | own parameters GiB | peak RSS GiB | load s |")
    print("|---|---|---|---|---|")
    for tp, pp in LAYOUTS:
        with tempfile.TemporaryDirectory() as out:
            n = tp * pp
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(n)]
            subprocess.run([*launch, __file__, "--worker", a.hf_dir, str(tp), str(pp), out], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for r in range(n):
                d = json.loads(Path(out, f"rank{r}.json").read_text())
                print(f"| TP={tp} PP={pp} | {r} | {d['own'] / 2**30:.2f} | {d['rss'] / 2**30:.2f} | {d['wall']:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        import warnings

        warnings.filterwarnings("ignore")
        worker(*sys.argv[2:])
    else:
        main()
