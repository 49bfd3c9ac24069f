"""Loading files without running code: ``torch.load`` with ``weights_only=True`` and
torch.distributed.checkpoint folders checked before DCP opens them (DCP unpickles its
index and its non-tensor entries freely). Core's loaders use these; a plugin that
reads a checkpoint should too."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from ..errors import CheckpointError


def safe_torch_load(path: str | Path | IO[bytes], map_location: Any = "cpu", mmap: bool = False,
                    where: Any = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain types only, never pickled
    code. A file that needs more, or a truncated one, is one clear CheckpointError
    naming ``where`` (default: the path)."""
    import pickle
    import zipfile

    if where is None:
        where = path
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(f"{where}: refused: loading it needs pickle, which can run code ({why}); llmzoo loads "
                              "only tensors and plain values (weights_only=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{where}: no such file") from None
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


# (_get_layout builds a layout from its name, e.g. "torch.strided")
_PLAIN_GLOBALS = {("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                  ("torch.serialization", "_get_layout")}
_DCP_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner")


def check_dcp_metadata(folder: Path) -> None:
    """torch.distributed.checkpoint reads a folder's ``.metadata`` with plain pickle; read
    it first with an unpickler that only builds DCP's own metadata records, dtypes and
    sizes, so that a crafted folder is refused before DCP opens it."""
    import dataclasses
    import enum
    import importlib
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _PLAIN_GLOBALS:
                return super().find_class(module, name)
            if module == "torch":
                obj = getattr(torch, name, None)
                if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    return obj
            if module in _DCP_SAFE_MODULES:
                obj = getattr(importlib.import_module(module), name, None)
                if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                    return obj
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    meta = folder / ".metadata"
    if not meta.exists():
        raise CheckpointError(f"{folder}: a folder, but not a sharded checkpoint (no .metadata)")
    try:
        with open(meta, "rb") as fh:
            index = Restricted(fh).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{meta}: refused: {e} (loading it could run code)") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt
        raise CheckpointError(f"{meta}: not a readable checkpoint index (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    check_dcp_entries(folder, index)


def check_dcp_entries(folder: Path, index: Any) -> None:
    """DCP stores each non-tensor entry (optimizer settings, loop state) as a
    ``torch.save`` blob inside a shard file and loads it with ``weights_only=False``:
    every such blob is read here first with ``weights_only=True``, so a shard carrying
    pickled code is refused before DCP opens it. Tensors DCP already loads safely."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if not isinstance(index, Metadata):
        raise CheckpointError(f"{folder / '.metadata'}: not a torch.distributed.checkpoint index")
    blobs = {fqn for fqn, md in index.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    root = folder.resolve()
    for key, info in (index.storage_data or {}).items():
        if getattr(key, "fqn", None) not in blobs:
            continue
        shard = (folder / str(info.relative_path)).resolve()
        if shard.parent != root:
            raise CheckpointError(f"{folder}: refused: entry {key.fqn!r} points outside the folder "
                                  f"({info.relative_path!r})")
        if info.transform_descriptors:
            raise CheckpointError(f"{folder}: refused: entry {key.fqn!r} is stored with transforms "
                                  f"{list(info.transform_descriptors)}, which llmzoo cannot check")
        try:
            with open(shard, "rb") as fh:
                fh.seek(int(info.offset))
                blob = fh.read(int(info.length))
        except OSError as e:
            raise CheckpointError(f"{shard}: a shard cannot be read ({e.strerror or e})") from None
        safe_torch_load(io.BytesIO(blob), where=f"{shard} (entry {key.fqn!r})")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is ``weights_only=True``, even where a library passes
    ``False`` (DCP does for its non-tensor entries): torch's own override switch, set for
    this block only. A second fence behind ``check_dcp_entries``."""
    key, before = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
