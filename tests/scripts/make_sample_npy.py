"""Writes shared/tests/fixtures/sample_numpy.npy: a tensor model's input sample as numpy
itself saves one (a structured array of records `x`, `predicted`, `label`), which
`shared::npy`'s writer must reproduce byte for byte.

    python -m venv /tmp/venv && /tmp/venv/bin/pip install numpy
    /tmp/venv/bin/python tests/scripts/make_sample_npy.py
"""

from pathlib import Path

import numpy as np

RECORD = np.dtype([("x", "<f4", (3,)), ("predicted", "<f8"), ("label", "<f8")])


def main() -> None:
    sample = np.array([([1, 2, 3], 0, np.nan), ([4, 5, 6], 1, 1)], dtype=RECORD)
    out = Path(__file__).resolve().parents[2] / "shared/tests/fixtures/sample_numpy.npy"
    np.save(out, sample)
    back = np.load(out)
    assert back["x"].shape == (2, 3) and np.isnan(back["label"][0])
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
