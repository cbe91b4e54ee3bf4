"""The files a run leaves behind that other code reads: the exported backbone.

``backbone.pt`` is a plain dictionary of tensors and strings (no pickled classes), so it loads
with ``torch.load(weights_only=True)``: opening a file from someone else cannot run their code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from byol_nb.models import Backbone

BACKBONE_FORMAT = "byol_nb.backbone/1"


def save_backbone(backbone: Backbone, path: str | Path, **extra: object) -> Path:
    """Write the backbone's weights with what is needed to rebuild it."""
    path = Path(path)
    payload = {"format": BACKBONE_FORMAT, "backbone": backbone.name, "small_stem": backbone.small_stem,
               "dim": backbone.dim, "state_dict": backbone.state_dict(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_backbone(path: str | Path, dense: bool = False, map_location: str = "cpu") -> nn.Module:
    """The trained backbone of ``path`` in eval mode.

    It maps a *normalised* image batch (see :func:`byol_nb.augment.normalize`) to pooled features
    (B, dim), or with ``dense=True`` to the last feature map (B, dim, H, W).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no backbone file at {str(path)!r}: train first (it is written as "
                                f"OUT/backbone.pt) or check the path")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a byol_nb backbone file (expected format "
                         f"{BACKBONE_FORMAT!r}); export one with byol_nb.checkpoint.save_backbone")
    backbone = Backbone(payload["backbone"], small_stem=bool(payload["small_stem"]))
    backbone.load_state_dict(payload["state_dict"])
    backbone.eval()
    return backbone.body if dense else backbone
