#!/usr/bin/env python3
"""The drift benchmark's peer: the same window scored with numpy and scipy.

Called by `agent/benches/inference.rs` with a JSON file holding the reference profile's
edges and fractions, the reference columns and the window's rows; prints one JSON line:
the time per window (median of RUNS) and the scores, so that the Rust side can check that
both computed the same PSI and JS.

Per feature, as edgeloop's window does: counts on the profile's bins (np.searchsorted),
PSI with empty bins floored at 1e-4, Jensen-Shannon distance (scipy), the two-sample KS
statistic and p-value against the reference data (scipy.stats.ks_2samp), the Wasserstein
distance over the reference's standard deviation (scipy.stats.wasserstein_distance), and
mean, variance, min and max.
"""
import json
import sys
import time

import numpy as np
from scipy import stats
from scipy.spatial import distance


def bins(edges, values):
    k = max(len(edges), 2) + 1
    idx = np.searchsorted(edges, values, side="right")
    idx = np.minimum(idx, len(edges) - 1)
    idx = np.where(values < edges[0], 0, idx)
    idx = np.where(values > edges[-1], k - 1, idx)
    return np.bincount(idx, minlength=k)


def score(profile, reference, rows):
    out = []
    for i, f in enumerate(profile):
        edges = np.asarray(f["edges"])
        expected = np.asarray(f["fractions"])
        x = rows[:, i]
        x = x[~np.isnan(x)]
        counts = bins(edges, x)
        a = np.maximum(counts / counts.sum(), 1e-4)
        e = np.maximum(expected, 1e-4)
        psi = float(np.sum((a - e) * np.log(a / e)))
        js = float(distance.jensenshannon(expected, counts / counts.sum()))
        ks = stats.ks_2samp(reference[i], x)
        w = stats.wasserstein_distance(reference[i], x) / np.std(reference[i])
        out.append((psi, js, ks.statistic, ks.pvalue, w, x.mean(), x.var(), x.min(), x.max()))
    return out


def main():
    data = json.load(open(sys.argv[1]))
    runs = int(sys.argv[2])
    profile = data["profile"]
    reference = [np.asarray(c) for c in data["reference"]]
    rows = np.asarray(data["rows"], dtype=np.float32).astype(np.float64)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        scores = score(profile, reference, rows)
        times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({
        "per_window_ms": times[len(times) // 2] * 1e3,
        "psi": [s[0] for s in scores],
        "js": [s[1] for s in scores],
    }))


if __name__ == "__main__":
    main()
