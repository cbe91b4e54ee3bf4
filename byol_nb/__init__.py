"""byol_nb: the helper package of the BYOL Workbook (BYOL, PixPro and the multi-GPU machinery).

``import byol_nb`` does not import torch: ``byol_nb.launch`` must be able to set up processes and
thread counts before torch starts. ``load_backbone`` and ``save_backbone`` load on first use.

It does make ``torch.cuda.is_available()`` answer through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK``,
which torch reads at each call): asked the usual way, the question initialises the CUDA driver in
this process, and a notebook kernel that asked it can no longer fork its training processes
(``ddp_notebook``).
"""

import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

__version__ = "0.1.0"

from byol_nb.launch import launch

__all__ = ["launch", "load_backbone", "save_backbone"]


def __getattr__(name: str):
    if name in ("load_backbone", "save_backbone"):
        from byol_nb import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'byol_nb' has no attribute {name!r}")
