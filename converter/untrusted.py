"""Reading checkpoints from elsewhere without running their code.

torch DCP reads a checkpoint's `.metadata` with a plain `pickle.load`, and every byte item (megatron-core's common
state, which holds Megatron-LM's `args`) with `torch.load(weights_only=False)`: a crafted file runs its payload.
While `reading()` is active both go through allow-lists instead: DCP's own metadata classes for `.metadata`, and
torch's weights_only unpickler for byte items, with megatron-core's SAFE_GLOBALS (argparse.Namespace, its enums).
Anything else stops the read with a ConversionError that names the class.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from unittest import mock

import torch

from .errors import ConversionError, causes, one_line

# What DCP's Metadata pickles to (torch 2.14), and nothing that can run code: dataclasses of sizes and offsets,
# enums, torch.Size, dtypes, layouts by name, paths.
_DCP = "torch.distributed.checkpoint."
METADATA_CLASSES = frozenset({
    *((_DCP + "metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                         "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                         "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("collections", "OrderedDict"),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
})


_REFUSED: list[ConversionError] = []  # DCP re-raises a metadata error as text: the refusal itself is kept here


def _refuse(message: str) -> ConversionError:
    _REFUSED.append(ConversionError(message))
    return _REFUSED[-1]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_CLASSES:
            raise ConversionError(f"refusing to unpickle {module}.{name} from a checkpoint's .metadata: it holds "
                                  "only torch DCP's own classes, and this one could run code")
        return super().find_class(module, name)


def _read_metadata(self, *args, **kwargs):
    """FileSystemReader.read_metadata, with the allow-listed unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except ConversionError as exc:
            raise _refuse(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise _refuse(f"{path} is not torch DCP metadata: {exc}") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def load_plain(f, what: str):
    """torch.load through torch's weights_only unpickler with megatron-core's safe globals, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says; a refused class stops the read naming it and `what`."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        found = f"the global {m.group(1)}" if m else str(exc).splitlines()[0][:200]
        raise _refuse(f"refusing to unpickle {found} in {what} of the checkpoint: only plain data and "
                      "megatron-core's safe classes are read (a crafted checkpoint would run code)") from None


def _load_bytes(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes through load_plain."""
    obj = load_plain(value, read_item.dest_index.fqn)
    if self.flatten_state_dict:
        from torch.distributed.checkpoint._nested_dict import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def refusal(exc: BaseException) -> ConversionError | None:
    """The ConversionError a read raised, where DCP or megatron-core wrapped it (CheckpointException keeps each
    rank's exception in `failures`)."""
    found = next((e for e in causes(exc) if isinstance(e, ConversionError)), None)
    return found or (_REFUSED[-1] if _REFUSED else None)


@contextlib.contextmanager
def reading(what: str | None = None):
    """Every DCP metadata and byte item read inside goes through the allow-lists. With `what` (the thing read),
    a failed read becomes one ConversionError: the refusal behind it, else its root failure."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    _REFUSED.clear()
    with mock.patch.object(FileSystemReader, "read_metadata", _read_metadata), \
            mock.patch.object(DefaultLoadPlanner, "load_bytes", _load_bytes):
        try:
            yield
        except ConversionError:
            raise
        except (Exception, CheckpointException) as exc:  # (DCP's is a BaseException, not an Exception)
            if what is None:
                raise
            raise refusal(exc) or ConversionError(f"cannot read {what}: {one_line(exc, 300)}") from exc
