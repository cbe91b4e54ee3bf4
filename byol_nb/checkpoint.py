"""The files a run leaves behind and reads back: Lightning checkpoints and the exported backbone.

Both are written atomically (a temporary file beside the target, flushed to disk, then
``os.replace``): a process killed while saving leaves the previous file complete and loadable.
Both are read with ``torch.load(weights_only=True)``: a file holds tensors and plain values or it
is refused, so opening a file from someone else cannot run their code. ``backbone.pt`` is a plain
dictionary of tensors and strings (no pickled classes) for the same reason.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from byol_nb.models import Backbone

BACKBONE_FORMAT = "byol_nb.backbone/1"
# TrainConfig fields that decide the networks' shapes: a checkpoint written with other values
# cannot be resumed. Other fields may differ, but then the resumed run is no longer exact.
ARCHITECTURE_FIELDS = ("method", "backbone", "small_stem", "proj_hidden", "proj_dim")


class CheckpointError(ValueError):
    """A checkpoint or backbone file that cannot be used; the message names the file, what differs
    and the fix."""


class DiskFullError(OSError):
    """A save that failed because its disk is full; the previous file is intact."""


# Below this much free space a failed write is put down to a full disk: torch.save reports a short
# write as "unexpected pos", without the OSError's errno.
FULL_DISK_BYTES = 64 * 2**20


def atomic_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` that never leaves a half-written ``path``.

    The bytes go to a temporary file in the same folder (so the rename stays on one filesystem),
    are flushed to disk, then ``os.replace`` swaps it in: a reader, or a run resumed after a crash,
    sees either the previous complete file or the new one. Temporaries left by a process killed
    while writing are removed by the next save. A full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except Exception as error:
        free = shutil.disk_usage(path.parent).free
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_DISK_BYTES:
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise DiskFullError(
                f"could not write {path}: its disk is full ({free // 2**20} MB free); {kept}. Free space there "
                f"or give --out a folder on another disk, then run again (with --resume to continue training)"
            ) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file.

    Raises :class:`CheckpointError` for a file that would import code (a malicious or foreign
    pickle) and for one that is truncated, empty or not a torch file; FileNotFoundError when absent.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:
        culprit = re.search(r"GLOBAL (\S+)", str(error))
        if culprit:
            raise CheckpointError(
                f"refused to load {str(path)!r}: it asks Python to import {culprit.group(1)}, which could run "
                f"code on this machine, and byol_nb files hold only tensors and plain values; open files only "
                f"from sources you trust") from None
        raise CheckpointError(f"{str(path)!r} is not a readable torch file (corrupt or not written by "
                              f"torch.save); re-create it or choose another file") from None
    except Exception as error:  # noqa: BLE001 - parsing hostile bytes fails in many ways (IndexError...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{str(path)!r} cannot be read ({reason}): the file is empty, truncated or not "
                              f"a torch file; re-create it or choose another file") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_save` and :func:`safe_load`.

    Lightning's own writer goes through an fsspec transaction that builds the file in the system
    temporary folder and moves it: on another filesystem that move is a copy a kill can cut short.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        return safe_load(path, map_location=map_location or "cpu")


def describe_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str | None:
    """What keeps ``found`` from loading into a model whose state dict is ``expected``, or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], Tensor) and found[k].shape != v.shape]
    parts = [f"{len(items)} {label} (e.g. {items[0]})" for label, items in
             (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape differences", shapes))
             if items]
    return "; ".join(parts) or None


def check_resume(path: str | Path, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
                 ) -> tuple[list[str], int]:
    """Check that the Lightning checkpoint ``path`` can continue a run with ``config``.

    Raises :class:`CheckpointError` naming what differs when it cannot (another architecture,
    another program's checkpoint, an older layout of the networks). Returns the settings that
    differ but still load (``"lr: 2.0 in the checkpoint, 1.0 now"``): the caller warns, because
    the continuation is then no longer the run that was interrupted. Also returns the checkpoint's
    global step.
    """
    checkpoint = safe_load(path, mmap=True)
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a byol_nb training checkpoint (no hyper-parameters or "
                              f"weights in it); choose a new --out to start fresh")
    changed = {k: (saved.get(k), v) for k, v in config.items() if k in saved and saved[k] != v}
    wrong = [f"{k}={old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items()
             if k in ARCHITECTURE_FIELDS]
    if wrong:
        raise CheckpointError(f"{str(path)!r} cannot be resumed with these settings: {'; '.join(wrong)}. "
                              f"Pass the checkpoint's values to resume, or choose a new --out to start fresh")
    mismatch = describe_mismatch(state_dict, checkpoint["state_dict"])
    if mismatch:
        raise CheckpointError(f"the weights in {str(path)!r} do not fit this version's networks ({mismatch}); "
                              f"it was written by an older byol_nb: start fresh with a new --out")
    return ([f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items()],
            int(checkpoint.get("global_step", 0)))


def save_backbone(backbone: Backbone, path: str | Path, **extra: object) -> Path:
    """Write the backbone's weights (as CPU tensors, wherever it lives) with what is needed to rebuild it."""
    path = Path(path)
    weights = {name: tensor.detach().cpu() for name, tensor in backbone.state_dict().items()}
    payload = {"format": BACKBONE_FORMAT, "backbone": backbone.name, "small_stem": backbone.small_stem,
               "dim": backbone.dim, "state_dict": weights, **extra}
    return atomic_save(payload, path)


def read_backbone_file(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The checked contents of a ``backbone.pt``: format, architecture, weights and extras such as
    ``image_size``. Raises :class:`CheckpointError` naming what is wrong with any other file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no backbone file at {str(path)!r}: train first (it is written as "
                                f"OUT/backbone.pt) or check the path")
    payload = safe_load(path, map_location=map_location)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found == BACKBONE_FORMAT:
        return payload
    if isinstance(found, str) and found.startswith("byol_nb.backbone/"):
        what = f"format {found!r}, but this version reads {BACKBONE_FORMAT!r}"
    elif isinstance(payload, dict) and "pytorch-lightning_version" in payload:
        what = "a Lightning training checkpoint, not an exported backbone (use OUT/backbone.pt)"
    elif isinstance(payload, dict) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        what = "a bare state_dict without the architecture it belongs to"
    else:
        what = f"not a byol_nb backbone file (expected format {BACKBONE_FORMAT!r})"
    raise CheckpointError(f"{str(path)!r} is {what}; export one with byol_nb.checkpoint.save_backbone")


def load_backbone(path: str | Path, dense: bool = False, map_location: str = "cpu") -> nn.Module:
    """The trained backbone of ``path``, in eval mode, made of torch and torchvision modules only.

    It maps a *normalised* image batch (see :func:`byol_nb.augment.normalize`) to pooled features
    (B, dim): the ResNet's layers, global average pooling and a flatten. With ``dense=True`` it stops
    before the pooling and returns the last feature map (B, dim, H, W).

    >>> import tempfile
    >>> path = save_backbone(Backbone("resnet18", small_stem=True), Path(tempfile.mkdtemp()) / "backbone.pt")
    >>> load_backbone(path)(torch.randn(2, 3, 32, 32)).shape  # pooled features
    torch.Size([2, 512])
    >>> load_backbone(path, dense=True)(torch.randn(2, 3, 32, 32)).shape  # feature maps, stride 8
    torch.Size([2, 512, 4, 4])
    """
    payload = read_backbone_file(path, map_location)
    name, small_stem = payload.get("backbone"), bool(payload.get("small_stem"))
    try:
        backbone = Backbone(name, small_stem=small_stem)
    except ValueError as error:
        raise CheckpointError(f"{str(path)!r}: {error}") from None
    mismatch = describe_mismatch(backbone.state_dict(), payload.get("state_dict") or {})
    if mismatch:
        raise CheckpointError(f"the weights in {str(path)!r} do not fit a {name} backbone "
                              f"(small_stem={small_stem}): {mismatch}; the file is damaged or was "
                              f"written by another program")
    backbone.load_state_dict(payload["state_dict"])
    layers = backbone.body if dense else nn.Sequential(*backbone.body, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return layers.eval()
