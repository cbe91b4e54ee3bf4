"""byol_nb: the helper package of the BYOL Workbook (BYOL, PixPro and the multi-GPU machinery)."""

__version__ = "0.1.0"

from byol_nb.launch import launch

__all__ = ["launch"]
