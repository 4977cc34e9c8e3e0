"""Source tensors copied into the checkpoint while torch is imported (preplace.py): the checkpoint reads back as the
one written without that head start, tensor for tensor, however each tensor got there (the early thread, the end of
the conversion for one the thread left half-done, its rank's own file for one the thread never reached); what no
item uses takes no space; a failed run leaves nothing behind; and a recorded conversion with placed tensors replays
byte for byte. (Megatron-LM's own loader judges a placed checkpoint in test_megatron_lm.py.)"""
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from converter import ConversionError, atomic, kernel_copy, preplace
from converter.convert import convert
from converter.export import export
from converter.untrusted import reading
from test_convert import assert_bit_exact
from tiny import with_values

LLAMA, MOE, PACKED = "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-30B-A3B", "openai/gpt-oss-20b"


@pytest.fixture
def place_all(monkeypatch):
    """Every tensor of the tiny models has a place (they are far below MIN_BYTES), in two files (two threads)."""
    monkeypatch.setattr(preplace, "MIN_BYTES", 1)
    monkeypatch.setattr(preplace, "FILE_BYTES", 1)
    monkeypatch.setattr(preplace, "cores", lambda: 2)


def _items(ckpt) -> dict:
    """Every stored item of a torch_dist checkpoint: (key, offsets) -> (file, its bytes as a flat uint8 tensor)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    release = ckpt / "release"
    with reading(str(release / ".metadata")):
        md = FileSystemReader(str(release)).read_metadata()
    out = {}
    for index, info in md.storage_data.items():
        with open(release / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        if isinstance(md.state_dict_metadata[index.fqn], TensorStorageMetadata):
            data = torch.load(io.BytesIO(raw), weights_only=True).contiguous().view(-1).view(torch.uint8)
        else:  # megatron-core's objects: their archive's bytes
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        out[index.fqn, tuple(index.offset or ())] = (info.relative_path, data)
    return out


def _unplaced(hf, out, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setattr(preplace, "MIN_BYTES", 1 << 62)
        return convert(hf, out, progress=False, **kw)


def _placed(f: str) -> bool:
    return f.startswith(preplace.PREFIX)


def _same_tensors(placed, unplaced) -> int:
    """How many items lie in the placed files; every item holds the same bytes as without placing."""
    a, b = _items(placed), _items(unplaced)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][1], b[k][1]), k
    assert not any(_placed(f) for f, _ in b.values())
    return sum(_placed(f) for f, _ in a.values())


def _placed_files(ckpt) -> list:
    return sorted((ckpt / "release").glob(preplace.PREFIX + "*"))


def _no_leftovers(d) -> None:
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name,workers", [(LLAMA, 2), (MOE, 1), (PACKED, 1)])
def test_placed_tensors_read_back_as_written_without_them(name, workers, tiny_models, tmp_path, monkeypatch,
                                                          place_all):
    hf = tiny_models(name, "bf16")
    placed = convert(hf, tmp_path / "placed", dtype="bf16", progress=False, workers=workers)
    unplaced = _unplaced(hf, tmp_path / "unplaced", monkeypatch, dtype="bf16", workers=workers)
    n = _same_tensors(placed, unplaced)
    items = _items(placed)
    # every item of source bytes lies in a placed file: a whole source tensor around its early copy, any other
    # (the q/k/v interleave) copied there by its runs at write time; only what is made in memory (gpt-oss's
    # dequantized experts) and the records of megatron-core's own go to the ranks' files
    left = {k.split("/")[0] for (k, _), (f, _) in items.items() if not _placed(f)}
    made = {f"decoder.layers.mlp.experts.experts.linear_fc{i}.weight" for i in (1, 2)} if name == PACKED else set()
    assert {k for k in left if not k.endswith("._extra_state") and k != "common_state"} == made
    used = {f: 0 for f, _ in items.values() if _placed(f)}
    for f, t in items.values():
        if f in used:
            used[f] += t.numel()
    assert [p.name for p in _placed_files(placed)] == sorted(used)  # a file no item uses is gone
    if name != PACKED:  # both threads' files are used
        assert len(used) == 2
    for f, nbytes in used.items():
        assert os.stat(placed / "release" / f).st_blocks * 512 <= nbytes + 2 * preplace.ROOM * n + (1 << 16)
    _no_leftovers(tmp_path)
    assert_bit_exact(hf, export(placed, tmp_path / "back", progress=False))  # read back through its storage entries
    # at another dtype nothing is placed
    fp32 = convert(hf, tmp_path / "fp32", dtype="fp32", progress=False)
    assert not _placed_files(fp32)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("workers", [1, 2])
def test_tensors_the_early_copy_left_half_done_or_never_reached(workers, direct, tiny_models, tmp_path, monkeypatch,
                                                                 place_all):
    """The copying thread stops (or fails) inside a tensor that an item relies on: the end of the conversion copies
    that tensor again, whole. A tensor it never reached the writer copies into its place itself, where the file
    takes direct writes, and else into its rank's own file (and with no tensor reached at all, no placed file is
    left)."""
    hf = tiny_models(LLAMA, "bf16")
    unplaced = _unplaced(hf, tmp_path / "unplaced", monkeypatch, dtype="bf16")
    if not direct:
        monkeypatch.setattr(preplace, "open_direct", lambda path: -1)

    def half_of_every_other(self, k):
        for i, (fd, offset, n, file, at) in enumerate(self.tensors):
            if i % 2 == 0 and file == k:
                with self._lock:
                    self._state[i] = preplace.COPYING
                kernel_copy.copy_range(fd, offset, n // 2, self.out[k], at)
        self._flags[1 + k] = 1

    monkeypatch.setattr(preplace.Placement, "_copy_all", half_of_every_other)
    placed = convert(hf, tmp_path / "placed", dtype="bf16", progress=False, workers=workers)
    n = _same_tensors(placed, unplaced)
    written_by_ranks = [k for (k, _), (f, _) in _items(placed).items()
                        if not _placed(f) and k.endswith("weight") and not k.endswith("linear_qkv.weight")]
    assert n > 0 and bool(written_by_ranks) != direct
    # linear_qkv (no one source tensor) goes to a placed file by its runs only where that takes direct writes
    assert {_placed(f) for (k, _), (f, _) in _items(placed).items() if k.endswith("linear_qkv.weight")} == {direct}

    monkeypatch.setattr(preplace.Placement, "_copy_all", lambda self, k: self._flags.__setitem__(1 + k, 1))
    none = convert(hf, tmp_path / "none", dtype="bf16", progress=False, workers=workers)
    n = _same_tensors(none, unplaced)
    assert (n > 0 and len(_placed_files(none)) == 2) if direct else (n == 0 and not _placed_files(none))
    _no_leftovers(tmp_path)


def test_a_failed_conversion_leaves_no_placed_file(tiny_models, tmp_path, monkeypatch, place_all):
    bad = with_values(tiny_models(LLAMA, "bf16"), tmp_path / "bad",
                      {"model.layers.1.mlp.down_proj.weight": ((0, 1), float("inf"))})
    for workers in (1, 2):
        with pytest.raises(ConversionError, match="down_proj.weight holds 1 non-finite"):
            convert(bad, tmp_path / "out", dtype="bf16", progress=False, workers=workers)
        assert not (tmp_path / "out").exists()
        _no_leftovers(tmp_path)


@pytest.mark.parametrize("early", [True, False])
def test_nonfinite_values_are_found_by_the_early_count_or_by_the_writer(early, tiny_models, tmp_path, monkeypatch,
                                                                          place_all):
    """The checking process counts each placed tensor's NaN/Inf values while the imports run; the writer then uses
    that count, and counts a tensor itself only where the process has not (here: ended at once)."""
    import importlib

    conv = importlib.import_module("converter.convert")
    bad = with_values(tiny_models(LLAMA, "bf16"), tmp_path / "bad",
                      {"model.layers.1.mlp.up_proj.weight": ((2, 3), float("nan"))})
    start = preplace.start

    def counted_first(*a, **kw):
        p = start(*a, **kw)
        p.counted()
        return p

    if not early:  # the checking process ends at once
        monkeypatch.setattr(preplace.Placement, "_count_all", lambda self: None)
    calls = []
    writer = conv.nonfinite
    monkeypatch.setattr(conv, "nonfinite", lambda *a: calls.append(a) or writer(*a))
    monkeypatch.setattr(preplace, "start", counted_first)
    with pytest.raises(ConversionError, match=r"up_proj.weight holds 1 non-finite"):
        convert(bad, tmp_path / "out", dtype="bf16", progress=False, workers=1)
    assert bool(calls) != early
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)
    # a conversion that allows them counts nothing, early or late
    forks, calls[:] = [], []
    fork = preplace.Placement._fork_checker
    monkeypatch.setattr(preplace.Placement, "_fork_checker", lambda self: forks.append(1) or fork(self))
    convert(bad, tmp_path / "out", dtype="bf16", progress=False, workers=1, allow_nonfinite=True)
    assert not forks and not calls


def test_the_early_directory_of_a_killed_run_is_swept(tiny_models, tmp_path, place_all):
    hf = tiny_models(LLAMA, "bf16")
    left = tmp_path / ".out.tmp-999999-early"
    left.mkdir()
    (left / atomic.MARK).touch()
    (left / preplace.name(0)).write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(left, (old, old))
    convert(hf, tmp_path / "out", dtype="bf16", progress=False)
    assert not left.exists()
    _no_leftovers(tmp_path)


# the command line in a fresh interpreter, with every tiny tensor placed; the last line says whether torch was imported
CLI = ("import sys; import converter.preplace as p; p.MIN_BYTES = p.FILE_BYTES = 1; p.cores = lambda: 2; "
       "from converter.cli import main; "
       "rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)")


def _cli(records, *args):
    env = {**os.environ, "HF2MCORE_REPLAY": str(records)}
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("name,workers", [(LLAMA, 2), (MOE, 1)])
def test_a_placed_conversion_replays_byte_for_byte(name, workers, tmp_path):
    from tiny import make_model, tiny_config

    src = [make_model(tiny_config(name), tmp_path / f"src{s}", dtype=torch.bfloat16, seed=s) for s in (0, 1)]
    records = tmp_path / "records"
    r = _cli(records, "convert", src[0], tmp_path / "first", "--workers", workers, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(_placed_files(tmp_path / "first")) == 2
    r = _cli(records, "convert", src[1], tmp_path / "replayed", "--no-progress")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False", r.stderr
    r = _cli("off", "convert", src[1], tmp_path / "torch", "--workers", workers, "--no-progress")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True", r.stderr
    release = {d: {p.name: p.read_bytes() for p in (tmp_path / d / "release").iterdir()} for d in ("replayed", "torch")}
    assert release["replayed"] == release["torch"]
    manifest = json.loads((tmp_path / "replayed" / "hf2mcore.json").read_text())
    assert manifest["writer"].startswith("replayed")


def test_auto_ranks_are_counted_by_the_bytes_still_to_copy(tiny_models, tmp_path, monkeypatch):
    """workers="auto" gives ranks only to what the early copying has not done."""
    import importlib

    from converter.shards import read_header

    conv = importlib.import_module("converter.convert")
    hf = tiny_models(MOE, "bf16")
    header, _ = read_header(hf / "model.safetensors")
    sizes = sorted(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    monkeypatch.setattr(preplace, "MIN_BYTES", sizes[len(sizes) // 2])  # the larger half placed
    start = preplace.start

    def done_before_counting(*a, **kw):
        p = start(*a, **kw)
        for t in p._threads:
            t.join()
        return p

    seen = []
    monkeypatch.setattr(preplace, "start", done_before_counting)
    monkeypatch.setattr(conv, "auto_count", lambda out, largest: seen.append(out) or 1)
    convert(hf, tmp_path / "out", dtype="bf16", progress=False, workers="auto")
    left = sum(n for n in sizes if n < preplace.MIN_BYTES)
    assert seen == [left] and 0 < left < sum(sizes) / 2


# a placement whose checking process would count for a minute; its pid on stdout, then the parent waits to be killed
SLOW_CHECK = ("import sys, time; import converter.preplace as p; p.MIN_BYTES = 1; "
              "p.Placement._count_all = lambda self: time.sleep(60); "
              "q = p.start(*map(__import__('pathlib').Path, sys.argv[1:3]), 'bf16', False); "
              "print(q._checker, flush=True); time.sleep(60)")


def _alive(pid: int) -> bool:
    try:  # (a zombie has left /proc/PID/stat's state as Z)
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _open_files(pid: int) -> set[str]:
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing
            pass
    return held


def test_the_checking_process_ends_with_its_parent_however_that_ends(tiny_models, tmp_path, place_all):
    """The NaN/Inf counting runs in a forked process: the end of the conversion ends it, and a parent killed
    outright (SIGKILL) takes it along."""
    hf = tiny_models(LLAMA, "bf16")
    p = subprocess.Popen([sys.executable, "-c", SLOW_CHECK, hf, tmp_path / "out"], stdout=subprocess.PIPE, text=True)
    checker = int(p.stdout.readline())
    assert checker > 0 and _alive(checker)
    # it holds the sources open, and nothing of the output (its placed files, the scratch directory's lock), once it
    # has closed what it inherited (it starts doing so at the fork, while its pid is being printed)
    deadline = time.monotonic() + 10
    while (output := [h for h in _open_files(checker) if h.startswith(str(tmp_path))]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not output and str(hf / "model.safetensors") in _open_files(checker)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while _alive(checker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(checker)
    # in this process: the conversion's end ends it (and reaps it)
    place = preplace.start(hf, tmp_path / "out2", "bf16", False)
    checker = place._checker
    assert checker > 0
    preplace.end()
    assert not _alive(checker)
    with pytest.raises(ChildProcessError):
        os.waitpid(checker, os.WNOHANG)


@pytest.mark.parametrize("direct", [True, False])
def test_runs_placed_at_write_time_take_new_room_of_their_own(direct, tmp_path, place_all, monkeypatch):
    """place_runs: source runs and zeros end to end, at the first run's offset modulo a page, each call in room of
    its own past every placed tensor; none where no file takes direct writes."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * kernel_copy.ALIGN + 123)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [len(data) // 2], "data_offsets": [0, len(data) // 2 * 2]}})
    (src / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + data)
    if not direct:
        monkeypatch.setattr(preplace, "open_direct", lambda path: -1)
    place = preplace.start(src, tmp_path / "out", "bf16", False)
    try:
        place.stop()
        fd, start = place.tensors[0][0], place.tensors[0][1]
        runs = [(fd, start + 5, 5000), (-1, 0, 3000), (fd, start + 7, 4096)]
        got = place.place_runs(runs)
        if not direct:
            assert got is None
            return
        k, at = got
        assert at % kernel_copy.ALIGN == (start + 5) % kernel_copy.ALIGN
        assert at >= max((t[4] + t[2] for t in place.tensors if t[3] == k), default=0) + preplace.ROOM
        again = place.place_runs(runs[:1])
        assert again[1] >= at + 12096 + preplace.ROOM
        placed = os.pread(place.out[k], 12096, at)
        assert placed == data[5:5005] + bytes(3000) + data[7:4103]
    finally:
        preplace.end()
