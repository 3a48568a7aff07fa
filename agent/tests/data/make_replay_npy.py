"""Write the NPY replay fixtures the agent's tests read (`agent/src/source.rs`, tests).

    replay_f8_fortran.npy  float64, Fortran order, 6 rows x 4 columns, with one NaN
    replay_i4.npy          int32, C order, 3 rows x 2 columns
    replay_f4.npy          float32, C order, 5 rows (one column)

Run with numpy installed: python3 agent/tests/data/make_replay_npy.py
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

rows = np.array(
    [[1.0, 3.0, 3.0, 45.0],
     [1.1, 3.2, 2.9, 46.0],
     [1.9, 8.5, 6.5, 56.0],
     [0.9, np.nan, 3.1, 44.5],
     [1.0, 2.9, 3.0, 45.2],
     [2.0, 8.8, 6.9, 57.5]],
    dtype=np.float64,
)
np.save(HERE / "replay_f8_fortran.npy", np.asfortranarray(rows))
np.save(HERE / "replay_i4.npy", np.array([[1, -2], [300, 4], [-5, 60000]], dtype=np.int32))
np.save(HERE / "replay_f4.npy", np.arange(5, dtype=np.float32) / 4)
