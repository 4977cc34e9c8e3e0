"""A conversion replayed without torch: a source of a shape converted before, written from what that conversion did.

When every weight byte of a checkpoint is a run of the source files' bytes (byte_copy.py), every other byte of it
(DCP's zip records and pickles, .metadata, the common state, megatron_args.sh's flags) depends only on the source's
shape (config.json less the fields no conversion reads, each tensor's name, dtype and shape), the options and the
code that wrote it. A conversion
through megatron-core and DCP records those bytes and where each source run went (`Recorder`, `store`), under a key
of all of them (`key`). Converting a source of the same shape again (`attempt`) writes the recorded bytes and copies
the new source's runs between them, with the same NaN/Inf check, space check and atomic publish, in a process that
never imports torch nor megatron-core: those imports alone took 2-3 s on the 2-core box, against 1.4-2 s for
copying all of a 2.3 GiB model (RESULTS.md, sessions 8 and 9). The files are those the conversion through torch
writes for the new source, byte for byte (tests/test_replay.py), its own config.json as hf_config.json included: a
base model and its instruct release differ only in fields no conversion reads (UNREAD), so the second of them is
replayed from the first; the processes that wrote the recorded layout
(--workers) set how the weights are split into .distcp files, which Megatron-LM reads the same whichever it is.

The records live in $HF2MCORE_REPLAY (default: `layouts` in hf2mcore's cache directory, ~/.cache/hf2mcore; "off"
turns recording and replaying off), the newest KEEP of them. A record holds no weight: a conversion that made any tensor in memory (a cast, a transpose,
dequantization) or under torchrun records nothing.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path

from . import layout, readahead
from .atomic import atomic_dir, refuse_existing
from .default_model import cache_dir
from .errors import ConversionError
from .finite import message, nonfinite
from .kernel_copy import direct_copy, open_direct, window, write_at
from .launch import cores, launched_by_torchrun
from .progress import Progress
from .shards import read_header, shard_files

ENV = "HF2MCORE_REPLAY"
KEEP = 32  # records kept (each holds no weight: kilobytes to a few MiB)
FORMAT = 2  # of the record itself (2: hf_config.json is the source's, not recorded)
LIT, SRC, ZERO = "lit", "src", "zero"  # segments: recorded bytes, a source tensor's bytes, zero bytes
_MAX_LITERAL = 256 << 20  # more recorded bytes than this means weights went through memory: not recorded
_PACKAGES = ("torch", "megatron-core", "transformers", "safetensors", "numpy")
# config.json fields that neither derive, the mappings nor the plan read (tests/test_replay.py derives every real
# config with them changed): they reach the output only as hf_config.json, which a replay writes from the source.
# Llama-3.2-1B and its Instruct release differ in eos_token_id alone; Llama-3.1's also in transformers_version.
UNREAD = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
          "pad_token_id", "use_cache")


def records_dir() -> Path | None:
    value = os.environ.get(ENV)
    if value is None:
        return cache_dir() / "layouts"
    return None if value.strip().lower() in ("", "0", "off", "no", "false") else Path(value)


def options(*, tp: int, pp: int, ep: int, etp: int | None, dtype: str, family: str | None, exact: bool,
            allow_nonfinite: bool, mtp: bool) -> dict:
    """The options that change what a conversion writes (not --workers: see the module's text)."""
    return {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "dtype": dtype, "family": family, "exact": exact,
            "allow_nonfinite": allow_nonfinite, "mtp": mtp}


def headers(hf_dir: Path) -> list[tuple[str, dict, int]]:
    """Each shard's file name, safetensors header and data start: read once for the key and the source."""
    return [(f, *read_header(hf_dir / f)) for f in shard_files(hf_dir)[0]]


def key(config: bytes, opts: dict, shards: list[tuple[str, dict, int]]) -> str:
    """What the written files depend on besides the weights' bytes and hf_config.json: the format, options,
    versions, hf2mcore's own code, config.json's fields less UNREAD (`config`: its bytes) and every shard's tensor
    names, dtypes and shapes (`shards`: headers()). ValueError: config.json is not JSON."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "options": opts, "versions": _versions(), "code": _code(),
                         "config": read_fields(config)}, sort_keys=True).encode())
    for f, header, _ in shards:
        h.update(json.dumps([f, {k: [v["dtype"], v["shape"]] for k, v in header.items() if k != "__metadata__"}],
                            sort_keys=True).encode())
    return h.hexdigest()


def read_fields(config: bytes):
    """config.json's fields that a conversion may read: all but UNREAD, also in a multimodal `text_config`
    (derive reads the language model's fields from there)."""
    cfg = json.loads(config)

    def read(d):
        return {k: v for k, v in d.items() if k not in UNREAD} if isinstance(d, dict) else d

    cfg = read(cfg)
    if isinstance(cfg, dict) and "text_config" in cfg:
        cfg["text_config"] = read(cfg["text_config"])
    return cfg


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _code() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for f in sorted([*here.glob("*.py"), *(here.parent / "mappings").glob("*.py")]):
        h.update(f"{f.parent.name}/{f.name}\0".encode() + f.read_bytes())
    return h.hexdigest()


class Recorder:
    """What one process's DCP streams wrote, file by file: their own bytes, and the source runs they copied, each
    named by tensor (so that another source of the same shape can stand in)."""

    def __init__(self, spans: dict[int, list[tuple[int, int, str]]]):
        """spans: HFCheckpoint.spans(), where each tensor as stored lies in the descriptors the conversion reads
        through. Runs are named by those tensors (a reader may present others: slices of packed experts)."""
        self._spans = spans
        self._starts = {fd: [s[0] for s in spans] for fd, spans in self._spans.items()}
        self.files: dict[str, list] = {}
        self.placed_items: dict[str, list] = {}  # file -> [position, segments] of each item written out of order
        self.blob = bytearray()
        self.spoiled: str | None = None
        self._ends: dict[str, int] = {}
        self._lock = threading.Lock()

    def spoil(self, why: str) -> None:
        with self._lock:
            self.spoiled = self.spoiled or why
            self.files.clear()
            self.placed_items.clear()
            self.blob = bytearray()

    def _segments(self, name: str, pos: int) -> list | None:
        if self.spoiled or not name.endswith(".distcp"):  # the other files are read back whole (`store`)
            return None
        if self._ends.get(name, 0) != pos:
            self.spoiled = f"{name} was not written in order"
            return None
        return self.files.setdefault(name, [])

    def literal(self, name: str, pos: int, data) -> None:
        with self._lock:
            segs = self._segments(name, pos)
            if segs is None:
                return
            data = memoryview(data).cast("B")
            if segs and segs[-1][0] == LIT and segs[-1][1] + segs[-1][2] == len(self.blob):
                segs[-1][2] += len(data)
            else:
                segs.append([LIT, len(self.blob), len(data)])
            self.blob += data
            self._ends[name] = pos + len(data)
            if len(self.blob) > _MAX_LITERAL:
                self.spoiled = "more recorded bytes than a layout holds"
                self.files.clear()
                self.blob = bytearray()

    def runs(self, name: str, pos: int, runs, skip: int, n: int) -> None:
        """Bytes [skip, skip + n) of `runs` (kernel_copy.Run) went to file `name` at `pos`."""
        with self._lock:
            segs = self._segments(name, pos)
            if segs is None:
                return
            self._ends[name] = pos + n
            for fd, offset, take in window(runs, skip, n):
                if fd < 0:
                    segs.append([ZERO, take])
                else:
                    self._by_tensor(segs, fd, offset, take)

    def placed(self, name: str, pos: int, before: bytes, runs, after: bytes) -> None:
        """An item written at `pos` of file `name` out of order (preplace.py): its records `before` and `after`
        around the bytes of `runs` (kernel_copy.Run). `_store` puts each file's items in order."""
        with self._lock:
            if self.spoiled:
                return
            segs: list = []
            for data in (before, None, after):
                if data is None:
                    for fd, offset, n in runs:
                        if fd < 0:
                            segs.append([ZERO, n])
                        else:
                            self._by_tensor(segs, fd, offset, n)
                else:
                    segs.append([LIT, len(self.blob), len(data)])
                    self.blob += data
            self.placed_items.setdefault(name, []).append([pos, segs])

    def _by_tensor(self, segs: list, fd: int, offset: int, n: int) -> None:
        spans, starts = self._spans.get(fd, []), self._starts.get(fd, [])
        while n:
            i = bisect.bisect_right(starts, offset) - 1
            if i < 0 or offset >= spans[i][0] + spans[i][1]:
                self.spoiled = "a copied run lies outside every source tensor"
                return
            start, length, tensor = spans[i]
            take = min(n, start + length - offset)
            segs.append([SRC, tensor, offset - start, take])
            offset, n = offset + take, n - take

    def result(self) -> tuple[dict, bytes, str | None, dict]:
        return self.files, bytes(self.blob), self.spoiled, self.placed_items


def store(hf_dir: Path, opts: dict, tmp: Path, recordings: list, manifest: dict, script: str, final: Path) -> None:
    """Record the conversion just written into `tmp` (not yet published as `final`), when every rank's recording
    holds all of its weight bytes as source runs. A record that cannot be written is only a note."""
    root = records_dir()
    if root is None or any(r is None or r[2] for r in recordings):
        return
    try:
        _store(root, key((tmp / layout.HF_CONFIG).read_bytes(), opts, headers(hf_dir)), hf_dir, tmp, recordings,
               manifest, script, final)
    except (OSError, ValueError, ConversionError) as exc:
        print(f"hf2mcore: note: this conversion was not recorded for replaying ({exc})", flush=True)


def _store(layouts: Path, k: str, hf_dir: Path, tmp: Path, recordings: list, manifest: dict, script: str,
           final: Path) -> None:
    release = layout.release_dir(tmp)
    blob, streams, placed = bytearray(), {}, {}
    for files, data, _, items in recordings:
        base = len(blob)
        blob += data
        moved = lambda segs: [[LIT, s[1] + base, s[2]] if s[0] == LIT else s for s in segs]  # noqa: E731
        for name, segs in files.items():
            streams[name] = moved(segs)
        for name, at in items.items():
            placed.setdefault(name, []).extend((pos, moved(segs)) for pos, segs in at)
    for name, items in placed.items():  # in order, the space between them as zeros
        size = (release / name).stat().st_size if (release / name).is_file() else 0
        streams[name], end = [], 0
        for pos, segs in sorted(items):
            if pos < end:
                raise ConversionError(f"recorded items of {name} overlap")
            streams[name] += ([[ZERO, pos - end]] if pos > end else []) + segs
            end = pos + sum(s[-1] for s in segs)
        if size > end:
            streams[name].append([ZERO, size - end])
    files = []
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        if rel in (layout.ARGS_FILE, layout.MANIFEST, layout.HF_CONFIG) or path.name == ".hf2mcore-partial":
            continue
        if path.parent == release and path.name in streams:
            segs = streams.pop(path.name)
            if sum(s[-1] for s in segs) != path.stat().st_size:
                raise ConversionError(f"the recording of {rel} does not add up to its size")
        else:
            segs = [[LIT, len(blob), path.stat().st_size]]
            blob += path.read_bytes()
        files.append([rel, segs])
    if streams:
        raise ConversionError(f"recorded streams {sorted(streams)} are not files of the checkpoint")
    for p in (hf_dir, tmp, final):  # nothing of this run's own paths may be replayed into another
        if os.fsencode(str(p.resolve())) in blob:
            raise ConversionError(f"the checkpoint's bytes name {p}")
    args = (tmp / layout.ARGS_FILE).read_text()
    record = {"format": FORMAT, "files": files, "script": script, "args": args,
              "args_use": layout.use_line(final, script), "manifest": manifest}
    layouts.mkdir(parents=True, exist_ok=True)
    work = layouts / f".tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "literal.bin").write_bytes(blob)
    (work / "layout.json").write_text(json.dumps(record))
    try:
        work.rename(layouts / k)
    except OSError:  # recorded meanwhile by another run
        shutil.rmtree(work, ignore_errors=True)
    _evict(layouts)


def _evict(layouts: Path) -> None:
    entries = [p for p in layouts.iterdir() if len(p.name) == 64 and (p / "layout.json").is_file()]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in entries[KEEP:]:
        shutil.rmtree(p, ignore_errors=True)


class _Source:
    """The new source's tensors: name -> (open file descriptor, offset, byte count, safetensors dtype)."""

    def __init__(self, hf_dir: Path, shards: list[tuple[str, dict, int]]):
        self.fds: list[int] = []
        self.tensors: dict[str, tuple[int, int, int, str]] = {}
        for f, header, data_start in shards:
            fd = os.open(hf_dir / f, os.O_RDONLY)
            self.fds.append(fd)
            size = os.fstat(fd).st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if not 0 <= begin <= end <= size - data_start:
                    raise ConversionError(f"cannot read {hf_dir / f}: tensor {name} lies past the end of the file")
                self.tensors[name] = (fd, data_start + begin, end - begin, info["dtype"])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def attempt(hf_dir: Path, out_dir: Path, opts: dict, *, overwrite: bool,
            progress: bool) -> tuple[str, dict] | None:
    """Convert by replaying a record of this source's shape, if there is one: (Megatron-LM's training script for it,
    the manifest written), else None (then nothing was done, and the conversion through torch says what, if
    anything, is wrong with the input)."""
    root = records_dir()
    if root is None or launched_by_torchrun():
        return None
    try:
        config = (hf_dir / "config.json").read_bytes()  # read once: the key's, and hf_config.json's bytes
        shards = headers(hf_dir)
        entry = root / key(config, opts, shards)
        record = json.loads((entry / "layout.json").read_text())
        blob = (entry / "literal.bin").read_bytes()
    except (OSError, ValueError, KeyError, TypeError, ConversionError):
        return None
    if record.get("format") != FORMAT:
        return None
    for rel, _ in record["files"]:  # a record names files inside the output only
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConversionError(f"the record {entry} names the file {rel!r} outside the output: remove it")
    os.utime(entry)  # the newest records are kept
    refuse_existing(out_dir, overwrite, (hf_dir,))
    src = _Source(hf_dir, shards)
    try:
        return record["script"], _replay(hf_dir, out_dir, record, blob, config, src, opts, overwrite, progress)
    finally:
        src.close()


def _replay(hf_dir: Path, out_dir: Path, record: dict, blob: bytes, config: bytes, src: _Source, opts: dict,
            overwrite: bool, progress: bool) -> dict:
    t0 = time.time()
    files = record["files"]
    used = list(dict.fromkeys(s[1] for _, segs in files for s in segs if s[0] == SRC))
    missing = [n for n in used if n not in src.tensors]
    if missing:  # (the key holds every name: only a file changed since the key was computed)
        raise ConversionError(f"{len(missing)} source tensors changed during the conversion, e.g. {missing[:3]}")
    need = sum(s[-1] for _, segs in files for s in segs)
    total = sum(s[3] for _, segs in files for s in segs if s[0] == SRC)
    bad: list[str] = []
    stop = threading.Event()

    def check() -> None:  # beside the copying: numpy's pass and the kernel's copy each take one core
        for name in used:
            fd, offset, n, dtype = src.tensors[name]
            count = nonfinite(fd, offset, n, dtype)
            if count:
                bad.append(message([name], count, dtype, "a Megatron tensor"))
            if bad or stop.is_set():
                return

    checker = threading.Thread(target=check, name="hf2mcore-finite", daemon=True)
    with readahead.following(hf_dir) as ahead, atomic_dir(out_dir, overwrite, need, (hf_dir,)) as tmp:
        if not opts["allow_nonfinite"]:
            checker.start()
        bar = Progress(len(files), total, "convert (replayed)", enabled=progress, unit="files")
        counting = threading.Lock()
        failed: list[BaseException] = []

        def write(rel: str, segs: list) -> None:
            path = tmp / rel
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            direct = open_direct(path)
            try:
                pos = 0
                for seg in segs:
                    if bad or stop.is_set():  # (another file's failure, or a stop: the others end too)
                        raise ConversionError(bad[0] if bad else "stopped")
                    if seg[0] == LIT:
                        write_at(out, memoryview(blob)[seg[1]:seg[1] + seg[2]], pos)
                    elif seg[0] == SRC:  # (ZERO: a new file reads as zeros where nothing was written)
                        fd, offset, _, _ = src.tensors[seg[1]]
                        direct_copy(fd, offset + seg[2], seg[3], out, direct, pos)
                        with counting:
                            bar.update(seg[3], items=0)
                            ahead.consumed(seg[3], 0)
                    pos += seg[-1]
                os.ftruncate(out, pos)
                if path.suffix == ".distcp":  # as DCP's writer (sync_files)
                    os.fsync(out)
            except BaseException as exc:
                if not stop.is_set():  # the first failure, the one to report (the others say "stopped")
                    failed.append(exc)
                stop.set()  # the other files end at their next piece
                raise
            finally:
                os.close(out)
                if direct >= 0:
                    os.close(direct)
            with counting:
                bar.update(0)

        for rel, _ in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        # the files at once, one per core: the kernel's copy into one file is one core's work (preplace.py)
        largest = sorted(files, key=lambda f: -sum(s[-1] for s in f[1]))
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, min(cores(), len(files)))) as pool:
                try:
                    for done in [pool.submit(write, rel, segs) for rel, segs in largest]:
                        done.exception()  # (waits for it)
                except BaseException:  # (a stop signal here): before the pool waits for its threads
                    stop.set()
                    raise
            if failed:
                raise failed[0]
        finally:
            stop.set()
            if checker.ident is not None:
                checker.join()
            bar.close()
        if bad:
            raise ConversionError(bad[0])
        args = record["args"].replace(record["args_use"], layout.use_line(out_dir, record["script"]), 1)
        (tmp / layout.ARGS_FILE).write_text(args)
        (tmp / layout.HF_CONFIG).write_bytes(config)
        manifest = {**record["manifest"], "source": str(hf_dir.resolve()), "config_sha256": layout.config_hash(config),
                    "seconds": round(time.time() - t0, 2),
                    "processes": 1,
                    "source_files": {f: {"bytes": (hf_dir / f).stat().st_size} for f in shard_files(hf_dir)[0]},
                    "writer": "replayed: the recorded layout of an earlier conversion of this shape (replay.py)"}
        (tmp / layout.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest

