"""The streaming writer: parameters made one ahead in a background thread, views written without copies, shard
overlaps checked in linear time, and a CLI start-up that loads neither torch's compiler nor transformers."""
import gc
import itertools
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from converter import mcore_io
from converter.convert import convert
from converter.verify import verify


def test_next_parameter_is_made_while_the_writer_writes(tiny_models, tmp_path, monkeypatch):
    hf = tiny_models("Qwen/Qwen3-30B-A3B")  # MoE: many small parameters, fc1 split into gate and up views
    made, running, most = [], [0], [0]
    lock = threading.Lock()
    make = mcore_io._ViewResolver._make

    def tracked(self, name):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            made.append(threading.current_thread().name)
            return make(self, name)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(mcore_io._ViewResolver, "_make", tracked)
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    assert most[0] == 1  # never two makes at once
    assert all(n.startswith("hf2mcore-make") for n in made), made  # each made ahead, in the writer's order
    assert torch.serialization.get_crc32_options()  # the writer's setting is put back
    assert verify(hf, out)["ok"]


def test_a_library_conversion_in_one_process_warns_of_nothing_it_asked_for(tiny_models, tmp_path):
    """One process saves with DCP's no_dist (no plan gathered to itself); DCP's warning that it then assumes a
    single process is about our choice, not the caller's: a training script calling convert must not see it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(tiny_models("meta-llama/Llama-3.2-1B"), tmp_path / "mc", dtype="fp32", progress=False)
    assert not [w for w in caught if "torch.distributed" in str(w.message)], [str(w.message) for w in caught]


def test_shard_overlaps_are_found_as_torch_finds_them_without_comparing_every_pair(monkeypatch):
    """linear_overlap_checks: on a regular grid (megatron-core's layers x experts x gate/up halves) a cell given
    twice is an overlap, found without comparing shards pairwise; on any other sharding torch's own check decides."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharding_spec import _internals
    from torch.distributed._shard.sharding_spec.api import EnumerableShardingSpec

    def shards(boxes):
        return [ShardMetadata(list(o), list(n), "rank:0/cpu") for o, n in boxes]

    size = (1, 1, 4, 8)
    grid = [(tuple(c * n for c, n in zip(cell, size)), size)
            for cell in itertools.product(range(8), range(16), range(2), range(1))]
    cases = {  # name: (boxes, overlapping)
        "grid": (grid, False),
        "grid with a cell twice": (grid + [grid[37]], True),
        "uneven, disjoint": ([((0, 0), (3, 8)), ((3, 0), (5, 8)), ((0, 8), (8, 2))], False),
        "uneven, overlapping": ([((0, 0), (3, 8)), ((2, 0), (6, 8))], True),
        "same sizes, offsets off the grid": ([((0, 0), (4, 4)), ((0, 2), (4, 4))], True),
    }
    pairs = []
    compare = _internals._check_shard_metadata_pair_overlap
    monkeypatch.setattr(_internals, "_check_shard_metadata_pair_overlap", lambda a, b: pairs.append(1) or compare(a, b))

    def overlaps(check, boxes) -> bool:
        try:
            check(shards(boxes))
        except ValueError as exc:
            assert "overlap" in str(exc)
            return True
        return False

    for name, (boxes, overlapping) in cases.items():
        assert overlaps(_internals.validate_non_overlapping_shards_metadata, boxes) is overlapping, name  # torch's
        with mcore_io.linear_overlap_checks():
            assert overlaps(EnumerableShardingSpec, boxes) is overlapping, name
    pairs.clear()
    EnumerableShardingSpec(shards(grid))
    assert len(pairs) > 1000  # torch's sweep, along the halves' axis, compares the shards of each half pairwise
    pairs.clear()
    with mcore_io.linear_overlap_checks():
        EnumerableShardingSpec(shards(grid))
    assert not pairs


def test_a_contiguous_view_gets_its_own_storage_without_a_copy():
    real = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    for view in (real.new_empty(0, device="meta").as_strided((3, 4), (4, 1), 12),  # the up half of fc1
                 real.new_empty(0, device="meta").as_strided((6, 4), (4, 1), 0)):  # the whole tensor
        piece = mcore_io._own_storage(real, view)
        want = real.as_strided(view.size(), view.stride(), view.storage_offset())
        assert torch.equal(piece, want)
        assert piece.untyped_storage().nbytes() == piece.nbytes  # so DCP writes it as it is
        assert piece.data_ptr() == want.data_ptr()  # shared, not copied
    column = real.new_empty(0, device="meta").as_strided((6, 2), (4, 1), 2)  # not contiguous: copied
    piece = mcore_io._own_storage(real, column)
    assert torch.equal(piece, real[:, 2:]) and piece.untyped_storage().nbytes() == piece.nbytes
    up = mcore_io._own_storage(real, real.new_empty(0, device="meta").as_strided((3, 4), (4, 1), 12))
    del real  # the piece keeps the memory it shares alive
    gc.collect()
    assert torch.equal(up, torch.arange(12, 24, dtype=torch.bfloat16).reshape(3, 4))


def test_cli_convert_loads_neither_torch_compiler_nor_transformers(tiny_models, tmp_path):
    hf = tiny_models("meta-llama/Llama-3.2-1B")
    code = ("import sys; from converter.cli import main; "
            "rc = main(['convert', sys.argv[1], sys.argv[2], '--overwrite', '--no-progress']); "
            "print(rc, *[m for m in ('torch._dynamo', 'torch._inductor', 'transformers') if m in sys.modules])")
    runs = [subprocess.run([sys.executable, "-c", code, str(hf), str(tmp_path / "mc")], capture_output=True,
                           text=True, check=True).stdout.split("\n")[-2] for _ in range(2)]
    assert runs[1] == "0", runs  # the first run may fill the transformers-defaults cache


def test_rows_are_read_into_place_or_converted(tmp_path):
    from safetensors.torch import save_file

    from converter.hf_io import HFCheckpoint

    w = torch.randn(6, 4).to(torch.bfloat16)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    hf = HFCheckpoint(tmp_path)
    out = torch.zeros(8, 4, dtype=torch.bfloat16)
    hf.read_rows_into("w", 2, out[3:7])  # a slice of a larger tensor, same dtype: read into its memory
    assert torch.equal(out[3:7], w[2:6]) and not out[:3].any() and not out[7:].any()
    wide = torch.zeros(4, 4, dtype=torch.float32)  # another dtype: read, then converted
    hf.read_rows_into("w", 1, wide)
    assert torch.equal(wide, w[1:5].float())


def test_a_writer_order_other_than_expected_still_makes_each_parameter_once(tiny_models, tmp_path, monkeypatch):
    hf = tiny_models("Qwen/Qwen3-30B-A3B")
    expect = mcore_io._ViewResolver.expect
    # as if the writer went in another order than its plan (DCP's overlapping loader sorts by size)
    monkeypatch.setattr(mcore_io._ViewResolver, "expect", lambda self, views: expect(self, views[::-1]))
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)  # convert raises if one is made twice
    assert verify(hf, out)["ok"]


PEAK_DURING_SAVE = r"""
import importlib, json, sys
conv = importlib.import_module("converter.convert")
save, rss = conv.save_streaming, {}

def status(key):
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith(key + ":"))

def measured(*a, **k):
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
    rss["before"] = status("VmRSS")
    out = save(*a, **k)
    rss["peak"] = status("VmHWM")
    return out

conv.save_streaming = measured
conv.convert(sys.argv[1], sys.argv[2], dtype="fp32", progress=False)
print(json.dumps(rss))
"""


def test_written_parameters_give_their_memory_back(tmp_path):
    """DCP's writer keeps each key's last tensor referenced until its file is done: without giving the pages back,
    a process would hold a whole layer (and the embeddings) on top of the tensor being written. Here a layer's
    tensors sum to about 3x the largest; the save may add at most two parameters (the one being written and the
    next, made ahead) and some slack. The written bytes are still the source's."""
    import json

    from safetensors.torch import load_file
    from tiny import make_model, real_config, shrink

    from converter.export import export

    cfg = {**shrink(real_config("meta-llama/Llama-3.2-1B")), "hidden_size": 1024, "intermediate_size": 4096,
           "head_dim": 128, "vocab_size": 4096, "tie_word_embeddings": False}
    hf = make_model(cfg, tmp_path / "hf", dtype=torch.float32)
    largest = 2 * 4096 * 1024 * 4  # linear_fc1 (gate and up) in fp32: 32 MiB
    r = subprocess.run([sys.executable, "-c", PEAK_DURING_SAVE, str(hf), str(tmp_path / "mc")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    assert rss["peak"] - rss["before"] <= 2 * largest + (16 << 20), rss
    back = export(tmp_path / "mc", tmp_path / "back", like=hf, progress=False)
    got = {k: v for f in sorted(back.glob("*.safetensors")) for k, v in load_file(f).items()}
    ref = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_the_planner_finds_each_shard_without_scanning_the_key(monkeypatch):
    """The writer's planner finds a ShardedTensor's shard by its offsets even where DCP's position hint is wrong
    (as on the second rank of a parallel save), without DCP's scan over the key's shards; an absent one is DCP's
    error."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    from torch.distributed.checkpoint import utils
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from converter.runtime import ensure_distributed

    ensure_distributed(cpu=True)
    rows = [torch.full((2, 3), float(i)) for i in range(5)]
    st = init_from_local_shards([Shard(t, ShardMetadata([2 * i, 0], [2, 3], "rank:0/cpu")) for i, t in enumerate(rows)],
                                10, 3)
    planner = mcore_io._strategy_class().Planner(None, flatten_state_dict=False, flatten_sharded_tensors=False)
    planner.set_up_planner({"w": st, "step": 3}, is_coordinator=True)
    scans = []
    find = utils._find_shard
    monkeypatch.setattr(utils, "_find_shard", lambda *a: scans.append(a) or find(*a))
    for i in range(5):
        assert planner.lookup_object(MetadataIndex("w", torch.Size([2 * i, 0]), index=4 - i)) is rows[i]
    assert not scans and planner.lookup_object(MetadataIndex("step")) == 3
    with pytest.raises(ValueError, match="Could not find shard"):
        planner.lookup_object(MetadataIndex("w", torch.Size([1, 0])))


class _Cycle:
    def __init__(self):
        self.me = self


def test_what_survives_a_full_collection_is_frozen_until_the_end():
    """collector.survivors_frozen: young garbage is still collected; survivors of a full collection are frozen
    (never scanned again) and unfrozen at the end, when what died meanwhile is collected; the callback goes
    however the block ends."""
    import weakref

    from converter import collector

    with pytest.raises(KeyError):
        with collector.survivors_frozen():
            before = gc.get_freeze_count()
            kept = _Cycle()
            gc.collect()
            assert gc.get_freeze_count() > before  # `kept` and everything else alive
            young = _Cycle()
            young_ref, kept_ref = weakref.ref(young), weakref.ref(kept)
            del young, kept
            gc.collect()
            assert young_ref() is None  # garbage made after the freeze: collected
            assert kept_ref() is not None  # frozen before it died: left until the end
            raise KeyError
    assert gc.get_freeze_count() == 0 and collector._freeze_survivors not in gc.callbacks
    gc.collect()
    assert kept_ref() is None
