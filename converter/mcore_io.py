"""torch_dist checkpoints through megatron-core's dist_checkpointing, and Megatron-LM's directory layout.

Writing streams: the model is built on the meta device, megatron-core produces its sharded state dict (keys,
stacked layers, global expert axis, gate/up halves), and PyTorch DCP writes it with a planner whose
`resolve_data` makes each tensor only when the writer reaches it; the next one is made in a background thread
while the writer writes. Megatron-core's views of a parameter (e.g. the gate and up halves of linear_fc1) are
replayed on the real tensor with as_strided.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import io
import mmap
import warnings
from unittest import mock
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from .errors import ConversionError, causes
from .save_memo import SaveMemo

CONTENT_METADATA = {"singleton_local_shards": False}


def _strategy_class():
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    from torch.distributed._shard.sharded_tensor import ShardedTensor as TorchShardedTensor

    class LazyPlanner(MCoreSavePlanner):
        def __init__(self, resolve: Callable, **kw):
            super().__init__(**kw)
            self._resolve = resolve
            self._shards: dict[tuple[str, tuple[int, ...]], torch.Tensor] | None = None

        def lookup_object(self, index):
            """A ShardedTensor's shard by its offsets, from a table. DCP's own lookup scans the key's shards
            unless its position hint holds, and on the second rank of a 2-process save it did not: with 48 layers
            x 128 experts that rank took twice as long (RESULTS.md, session 15)."""
            if index.offset is None or not isinstance(self.state_dict.get(index.fqn), TorchShardedTensor):
                return super().lookup_object(index)
            if self._shards is None:
                self._shards = {(k, tuple(sh.metadata.shard_offsets)): sh.tensor for k, v in self.state_dict.items()
                                if isinstance(v, TorchShardedTensor) for sh in v.local_shards()}
            found = self._shards.get((index.fqn, tuple(index.offset)))
            return found if found is not None else super().lookup_object(index)  # (its error, if absent)

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            if self._resolve is not None:  # DCP's single-threaded writer asks for the items in plan order
                objs = (self.lookup_object(i.index) for i in plan.items if i.type != WriteItemType.BYTE_IO)
                self._resolve.expect([o for o in objs if isinstance(o, torch.Tensor) and o.is_meta])
            return plan

        def resolve_data(self, write_item):
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and obj.is_meta:
                return self._resolve(obj)
            return super().resolve_data(write_item)

    class Writer(FileSystemWriter):
        def storage_meta(self):
            # DCP would record the directory written (here the temporary one, renamed afterwards) and a random save
            # id; neither is read at load, and without them the files depend on the model alone (replay.py)
            return None

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """megatron-core's torch_dist strategy with DCP's synchronous writer and a lazy planner (`resolve` makes
        the meta tensors; None when every tensor is real)."""

        Planner = LazyPlanner

        def __init__(self, resolve: Callable | None, direct=None):
            super().__init__(thread_count=1)
            self._resolve = resolve
            self._direct = direct  # byte_copy.DirectWrites: placeholders whose bytes are copied file to file

        def save(self, sharded_state_dict, checkpoint_dir):
            # torch.save's archives repeated where they repeat (save_memo): megatron-core serializes each
            # ShardedObject with it in _save, DCP each tensor
            with linear_overlap_checks(), mock.patch.object(torch, "save", SaveMemo(torch.save)):
                self._save(sharded_state_dict, checkpoint_dir)

        def _save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_sd = mcore_to_pyt_state_dict(sd, False)
            planner = self.Planner(self._resolve, flatten_state_dict=False, flatten_sharded_tensors=False)
            # No zip CRC32 per tensor: torch.load never checks it, and computing it costs the writing thread
            # about 0.25 s per GiB. The files stay loadable by every torch (a documented torch.save option).
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            # Streaming: the serial loader, which asks for the items in plan order (the resolver's `expect`).
            # Where CUDA is available DCP would otherwise take its overlapping loader, which sorts them by size.
            ahead = {"per_thread_copy_ahead": 0} if self._resolve is not None else {}
            # DCP re-checks every key's chunks for overlaps; with stacked MoE layers (a [layers, experts, ...]
            # key of layers x experts chunks) its sweep is quadratic (RESULTS.md, session 5). megatron-core has
            # already validated the sharding (validate_sharding_integrity) before this.
            from torch.distributed.checkpoint import default_planner
            from torch.distributed.checkpoint.metadata import Metadata

            with contextlib.ExitStack() as stack:
                if hasattr(default_planner, "_validate_global_plan"):
                    # its own answer for a valid plan: True up to torch 2.11, an empty error list since
                    valid = default_planner._validate_global_plan([], Metadata(state_dict_metadata={}))
                    stack.enter_context(mock.patch.object(default_planner, "_validate_global_plan",
                                                          lambda plan, md: valid))
                writer = Writer(str(checkpoint_dir), thread_count=1, single_file_per_rank=True,
                                sync_files=True, **ahead)
                if self._direct is not None:
                    writer.fs = self._direct.file_system(writer.fs)
                    if self._direct.placement is not None:
                        stack.enter_context(placing_items())
                try:
                    # one process: the plans are not pickled and gathered to itself (31k items: about 1 s); DCP
                    # warns that it assumes a single process, which is what was asked: not the caller's concern
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                        dcp_save(pyt_sd, storage_writer=writer, planner=planner,
                                 no_dist=torch.distributed.get_world_size() == 1)
                finally:
                    torch.serialization.set_crc32_options(crc)

    return StreamingSaveStrategy


@contextlib.contextmanager
def placing_items():
    """DCP's writing of one item, with its writes held back by our stream (byte_copy._Stream.item): an item that
    went around a placed source tensor (preplace.py) gets that file, offset and length as its storage entry."""
    import dataclasses

    from torch.distributed.checkpoint import filesystem

    from .byte_copy import _Stream

    original = filesystem._write_item

    def write_item(transforms, stream, data, write_item, *rest):
        if not isinstance(stream, _Stream):
            return original(transforms, stream, data, write_item, *rest)
        with stream.item() as where:
            result = original(transforms, stream, data, write_item, *rest)
        if not where:
            return result
        path, offset, length = where[0]
        info = dataclasses.replace(result.storage_data, relative_path=path, offset=offset, length=length)
        return dataclasses.replace(result, size_in_bytes=length, storage_data=info)

    with mock.patch.object(filesystem, "_write_item", write_item):
        yield


_OVERLAP_CHECKERS = ("torch.distributed._shard.sharding_spec.api", "torch.distributed._shard.sharded_tensor.api",
                     "torch.distributed._shard.sharded_tensor.utils")


@contextlib.contextmanager
def linear_overlap_checks():
    """torch's check that a ShardedTensor's shards are disjoint, in linear time where they are the cells of one
    regular grid (every shard the same size, every offset a multiple of it: megatron-core's layers, experts, TP
    ranks and gate/up halves): there two shards overlap exactly when they start at the same offsets. torch's own
    sweep runs along the sharded axis where the first shard is longest and compares every two shards that meet on
    it; for the experts' gate and up halves (a [layers, experts, 2 x rows, cols] key) that is the halves' axis, so
    every gate half of every layer meets every other: 20 s of a save of Qwen3-30B-A3B's 48 layers x 128 experts,
    93 s alone for 58 x 256 (RESULTS.md, session 15). Other shardings get torch's check."""
    with contextlib.ExitStack() as stack:
        for name in _OVERLAP_CHECKERS:
            mod = importlib.import_module(name)
            if hasattr(mod, "validate_non_overlapping_shards_metadata"):
                check = mod.validate_non_overlapping_shards_metadata
                stack.enter_context(mock.patch.object(mod, "validate_non_overlapping_shards_metadata",
                                                      functools.partial(_non_overlapping, check)))
        yield


def _non_overlapping(check: Callable, shards: list) -> None:
    size = shards[0].shard_sizes if shards else None
    if not size or not all(size) or any(s.shard_sizes != size or any(o % n for o, n in zip(s.shard_offsets, size))
                                        for s in shards):
        return check(shards)
    first: dict[tuple[int, ...], int] = {}
    for i, s in enumerate(shards):
        if (j := first.setdefault(tuple(s.shard_offsets), i)) != i:
            raise ValueError(f"Shards {shards[j]} and {s} overlap")


class _ViewResolver:
    """Maps a meta view back to its parameter, makes the parameter once and frees it after its last view.

    It makes the next parameter in the writer's order (`expect`) in a background thread while the writer writes
    the current one: reading and transforming overlap writing, for one more parameter in memory. The first one is
    started while DCP plans. A view that covers part of its parameter (e.g. the gate half of linear_fc1) gets a
    storage of its own there (`_own_storage`). `make` never runs in two threads at once.
    """

    def __init__(self, model, make: Callable[[str], torch.Tensor], sharded_state_dict, direct=None):
        from megatron.core.dist_checkpointing.mapping import is_main_replica

        self.names = _names_by_storage(model)
        self.make = make
        self.direct = direct
        # only the views this rank writes (its main replicas), so a parameter is freed after its last one
        self.views = {n: mine for n, v in views_by_param(self.names, sharded_state_dict).items()
                      if (mine := [sh.data for sh in v if is_main_replica(sh.replica_id)])}
        self.pending = {n: len(v) for n, v in self.views.items()}
        self.cache: dict[str, dict[tuple, torch.Tensor]] = {}
        self.written: set[str] = set()
        self.bases: dict[str, torch.Tensor] = {}  # the made parameters, until their memory is given back
        self.finished: list[str] = []  # parameters whose last view went to the writer (written at its next ask)
        self.next_of: dict[str, str] = {}
        self.ahead: tuple[str, Future] | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hf2mcore-make")
        first = next(iter(self.views), None)
        if first is not None:  # DCP's plan keeps the state dict's order (if not, _take keeps this one for later)
            self.ahead = (first, self.pool.submit(self._make, first))

    def expect(self, views: list[torch.Tensor]) -> None:
        order = list(dict.fromkeys(self.name_of(v) for v in views))
        self.next_of = dict(zip(order, order[1:]))

    def name_of(self, t: torch.Tensor) -> str:
        try:
            return self.names[_storage_key(t)]
        except KeyError:
            raise ConversionError("internal: a checkpoint tensor is not a view of a model parameter") from None

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        self._give_back()  # the serial loader asks for an item once the previous one is written
        name = self.name_of(view)
        pieces = self.cache.get(name)
        if pieces is None:
            pieces = self.cache[name] = self._take(name)
            nxt = self.next_of.get(name)
            while nxt is not None and (nxt in self.cache or nxt in self.written):  # asked for out of order
                nxt = self.next_of.get(nxt)
            if nxt is not None:
                self.ahead = (nxt, self.pool.submit(self._make, nxt))
        piece = pieces.get(_view_key(view))
        if piece is None:
            raise ConversionError(f"internal: the writer asked for a view of {name} that this rank does not write")
        self.pending[name] -= 1
        if self.pending[name] <= 0:
            self.cache.pop(name, None)
            self.written.add(name)
            self.finished.append(name)
        return piece.reshape(view.size())  # the writer's view may carry extra leading axes (stacked layers)

    def _make(self, name: str) -> dict[tuple, torch.Tensor]:
        real = self.bases[name] = self.make(name).contiguous()
        pieces = {_view_key(v): _own_storage(real, v) for v in self.views.get(name, ())}
        if self.direct is not None:
            self.direct.expect(real, pieces.values())
        return pieces

    def _give_back(self) -> None:
        """Release the memory of the parameters whose views are all written.

        DCP's file writer keeps every tensor it wrote referenced until its file is done (torch 2.14: the last
        chunk of each key), so with stacked layers a process would hold a whole layer plus the embedding and
        output layer: for Llama-3.1-405B about 14 GiB. The pages go back to the system instead; the tensors stay
        valid (they read as zeros), so nothing can fault if they were read again.
        """
        for name in self.finished:
            _release_pages(self.bases.pop(name))
        self.finished.clear()

    def _take(self, name: str) -> dict[tuple, torch.Tensor]:
        if self.ahead is not None:
            ahead, fut = self.ahead
            self.ahead = None
            if ahead == name:
                return fut.result()
            self.cache[ahead] = fut.result()  # out of the expected order: keep it for when it is asked for
        return self._make(name)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._give_back()


def _madvise_dontneed() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):  # not Linux / glibc: memory is returned when DCP drops the tensors
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return lambda addr, n: fn(addr, n, mmap.MADV_DONTNEED)


_MADVISE = _madvise_dontneed() if hasattr(mmap, "MADV_DONTNEED") else None


def _release_pages(t: torch.Tensor) -> None:
    """Return the whole pages under `t`'s storage to the system (MADV_DONTNEED): anonymous memory then reads as
    zeros. The caller guarantees nothing needs the data any more; partial pages at either end are kept."""
    st = t.untyped_storage()
    start = -(-st.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (st.data_ptr() + st.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
    if _MADVISE is not None and end - start >= 16 * mmap.PAGESIZE:
        _MADVISE(start, end - start)


def _own_storage(real: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """`view`'s region of `real` as a tensor whose storage is exactly that region. The writer copies any tensor
    whose storage is larger than itself (torch.save writes whole storages); a contiguous region is shared instead."""
    piece = real.as_strided(view.size(), view.stride(), view.storage_offset())
    if piece.numel() == real.numel():
        return piece
    if not piece.is_contiguous():
        return piece.clone()
    start = view.storage_offset() * real.element_size()
    region = real.untyped_storage()[start:start + piece.nbytes]  # shares the memory, keeps `real`'s alive
    return torch.empty(0, dtype=real.dtype).set_(region, 0, piece.shape)


def _view_key(v: torch.Tensor) -> tuple[int, int]:
    """The region a view covers; its shape may differ between megatron-core's and the writer's view."""
    return v.storage_offset(), v.numel()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _names_by_storage(model) -> dict[int, str]:
    """State-dict name of each model tensor by its storage: storage identity survives every view and detach
    megatron-core applies (meta storages are distinct)."""
    return {_storage_key(t): n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def views_by_param(names: dict[int, str], sharded_state_dict) -> dict[str, list]:
    """megatron-core's ShardedTensors grouped by the model tensor (`names`: _names_by_storage) they view.

    Each says where its piece lives in the checkpoint (key, global offset, prepended layer/expert axes); a
    parameter has several when megatron-core splits it (e.g. the gate and up halves of linear_fc1).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out: dict[str, list] = {}
    for sh in nested_values(sharded_state_dict):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            name = names.get(_storage_key(sh.data))
            if name is None:
                raise ConversionError(f"internal: checkpoint entry {sh.key} is not a view of a model tensor")
            out.setdefault(name, []).append(sh)
    return out


def sharded_views(model) -> dict[str, list]:
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = model.sharded_state_dict(metadata=dict(CONTENT_METADATA))
    apply_factories(sharded)
    return views_by_param(_names_by_storage(model), sharded)


def save_streaming(model, make: Callable[[str], torch.Tensor], ckpt_dir: Path, common: dict,
                   direct=None) -> list[str]:
    """Write `model`'s torch_dist checkpoint into ckpt_dir; `make(name)` returns parameter `name`'s data, or a
    placeholder of `direct` (byte_copy.DirectWrites) whose bytes are copied from the source files.

    Several processes (torchrun, all with the same model at TP=PP=1) share the work: megatron-core's
    fully-parallel save distribution gives each rank its share of the tensors, and each rank makes, reads
    and writes only those. Returns the parameters this rank writes."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    from .runtime import cpu_patches

    sharded = model.sharded_state_dict(metadata=dict(CONTENT_METADATA))
    apply_factories(sharded)  # so the resolver counts the views the writer will ask for
    strategy = _strategy_class()(None, direct)
    if dist.get_world_size() > 1:
        FullyParallelSaveStrategyWrapper(strategy).apply_saving_parallelization(sharded)
    strategy._resolve = resolver = _ViewResolver(model, make, sharded, direct)
    sharded.update(common)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    try:
        with cpu_patches():
            dist_checkpointing.save(sharded, str(ckpt_dir), sharded_strategy=strategy,
                                    content_metadata=dict(CONTENT_METADATA))
    except BaseException as exc:  # DCP wraps what `make` raised (a bad tensor) in its CheckpointException
        reason = next((e for e in causes(exc) if isinstance(e, ConversionError)), getattr(direct, "error", None))
        if reason is None or reason is exc:
            raise
        raise reason.with_traceback(None) from exc
    finally:
        resolver.close()
    if direct is not None:
        direct.check()
    return list(resolver.views)


class ChunkReader:
    """Reads any box of a tensor stored in a torch_dist checkpoint, touching only the chunks that overlap it.

    The chunks are the pieces the saving ranks wrote (one per layer, TP rank, expert ...): whatever TP/PP/EP
    a checkpoint was saved with, a region is assembled from them, so memory stays at one tensor.
    """

    def __init__(self, ckpt: Path):
        from torch.distributed.checkpoint import FileSystemReader

        from .untrusted import reading

        self.dir = Path(ckpt)
        with reading(f"{ckpt}/.metadata"):
            self.md = FileSystemReader(str(ckpt)).read_metadata()

    def has(self, key: str) -> bool:
        return key in self.md.state_dict_metadata

    def dtype(self, key: str) -> torch.dtype:
        return self.md.state_dict_metadata[key].properties.dtype

    def read(self, key: str, offset: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if key not in self.md.state_dict_metadata:
            raise ConversionError(f"{self.dir} has no tensor {key}: not a checkpoint of this architecture?")
        tm = self.md.state_dict_metadata[key]
        if len(tm.size) != len(size) or any(o + n > g for o, n, g in zip(offset, size, tm.size)):
            raise ConversionError(f"{key}: the model needs {tuple(size)} at {tuple(offset)}, the checkpoint holds "
                                  f"{tuple(tm.size)}: not a checkpoint of this architecture?")
        out = torch.empty(size, dtype=tm.properties.dtype)
        covered = 0
        for chunk in tm.chunks:
            lo = [max(o, c) for o, c in zip(offset, chunk.offsets)]
            hi = [min(o + n, c + m) for o, n, c, m in zip(offset, size, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            data = self._chunk(MetadataIndex(key, chunk.offsets))
            src = data[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))] = src
            covered += src.numel()
        if covered != out.numel():
            raise ConversionError(f"{key}: the checkpoint's chunks cover {covered} of {out.numel()} values "
                                  "(missing .distcp file?)")
        return out

    def _chunk(self, index) -> torch.Tensor:
        info = self.md.storage_data.get(index)
        if info is None:
            raise ConversionError(f"{self.dir}/.metadata lists no storage for {index.fqn} at {index.offset}")
        if info.transform_descriptors:
            raise ConversionError(f"{index.fqn}: stored with transforms {info.transform_descriptors}; unsupported")
        path = self.dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            if len(raw) != info.length:
                raise ConversionError(f"{path} is truncated")
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"cannot read {index.fqn} from {path}: {exc}") from exc


def params_from_checkpoint(model, reader: ChunkReader, names: list[str]):
    """Yield (name, tensor) for the parameters `names` of `model` (meta is fine), read from the checkpoint.

    megatron-core's sharded state dict says where each parameter (or each view of it, e.g. the gate and up
    halves of linear_fc1) lives in the checkpoint; the views are filled in the real tensor with as_strided.
    """
    params = dict(model.state_dict(keep_vars=True))
    pieces = sharded_views(model)
    for name in names:
        if name not in pieces:
            raise ConversionError(f"internal: {name} has no place in megatron-core's sharded state dict")
        first = pieces[name][0]
        buf = torch.empty(params[name].shape, dtype=reader.dtype(first.key) if reader.has(first.key) else None)
        for sh in pieces[name]:
            size = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
            region = reader.read(sh.key, tuple(sh.global_offset), size).reshape(sh.data.shape)
            buf.as_strided(sh.data.size(), sh.data.stride(), sh.data.storage_offset()).copy_(region)
        yield name, buf


def sync_save_strategy():
    """megatron-core's torch_dist save with DCP's synchronous writer, as for convert. megatron-core's default
    strategy starts a multiprocessing manager with the spawn method: a fresh interpreter that imports the caller's
    `__main__` again, and runs all of it where a script has no `if __name__ == "__main__"` guard."""
    return _strategy_class()(None)


def save_model(model, root: str | Path, spec, *, overwrite: bool = False, extra=None) -> Path:
    """Save a live (possibly parallel) model as a Megatron-LM checkpoint root (layout.py), the way training saves
    it; every rank calls. Written under a temporary sibling and renamed by rank 0 when complete.
    `extra(release_dir)` runs on every rank before the rename (e.g. ModelOpt's state)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from . import layout
    from .atomic import atomic_dir_all_ranks
    from .model import parallel_sizes
    from .runtime import cpu_patches

    root = Path(root)
    ns = spec.megatron_namespace(*parallel_sizes(), dtype=model.config.params_dtype)
    with atomic_dir_all_ranks(root, overwrite) as tmp:
        out = layout.release_dir(tmp)
        out.mkdir(parents=True, exist_ok=True)
        with cpu_patches():  # ModelOpt's quantizer state synchronizes CUDA when it is read
            sharded = model.sharded_state_dict(metadata=dict(CONTENT_METADATA))
            sharded.update(layout.common_state(ns))
            dist_checkpointing.save(sharded, str(out), sharded_strategy=sync_save_strategy(),
                                    content_metadata=dict(CONTENT_METADATA))
            if extra is not None:
                extra(out)
        if dist.get_rank() == 0:
            layout.write_root(tmp, root, spec, ns, spec.hook_settings())
    return root


def load_into(model, ckpt_dir: str | Path, strict: bool = True) -> None:
    """Fill a (possibly parallel) megatron-core model from a torch_dist checkpoint; resharding is megatron's."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from .layout import find_checkpoint
    from .runtime import cpu_patches
    from .untrusted import reading

    ckpt = find_checkpoint(ckpt_dir)
    with cpu_patches():
        sharded = model.sharded_state_dict(metadata=dict(CONTENT_METADATA))
        with reading(str(ckpt)), linear_overlap_checks():
            state = dist_checkpointing.load(sharded, str(ckpt),
                                            strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL)
        own = set(model.state_dict())  # the loaded dict also carries the common state (args, iteration, ...)
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
