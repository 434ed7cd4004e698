"""The 4D DCE series record every reader produces (files or a Slicer sequence) and the chain consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Series4D:
    """A DCE series: ``signal`` float32 (K, J, I, T); frame times ``t_s`` (s) from the first frame; the
    IJK->RAS matrix (mm); TR (s) and flip angle (degrees) from the header when known (else None);
    where the frame times came from; and the source (a path or a sequence node's name)."""

    signal: np.ndarray
    t_s: np.ndarray
    ijk_to_ras: np.ndarray
    tr_s: float | None
    flip_angle_deg: float | None
    time_source: str
    source: str

    @property
    def shape_kji(self) -> tuple:
        return tuple(self.signal.shape[:-1])
