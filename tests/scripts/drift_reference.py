#!/usr/bin/env python3
"""Reference drift scores for shared/tests/drift_reference.rs, computed with numpy and scipy.

Regenerate with:
    pip install numpy scipy
    python3 tests/scripts/drift_reference.py > shared/tests/fixtures/drift_reference.json

For each case: reference data (float64), a window of live inputs (float32, as the agent
sees them), and the scores:
  - on the profile's bins (10 quantile bins with underflow and overflow, edges by
    numpy's linear quantiles, the edges edgeloop computes): PSI with empty bins floored at
    1e-4, and scipy's Jensen-Shannon distance;
  - on the 100-bin sketch: the KS statistic read at the bin boundaries, and its p-value
    from scipy's kstwobign (the asymptotic two-sample distribution);
  - on the raw data: scipy's exact two-sample KS statistic (ks_2samp) and the Wasserstein
    distance over the reference's standard deviation (Evidently's normed Wasserstein).
"""
import json

import numpy as np
from scipy import stats
from scipy.spatial import distance

BINS = 10
SKETCH_BINS = 100
PSI_EPSILON = 1e-4


def edges_of(sorted_ref, bins):
    qs = np.quantile(sorted_ref, np.arange(bins + 1) / bins)
    edges = [qs[0]]
    for q in qs[1:]:
        if q > edges[-1]:
            edges.append(q)
    return np.array(edges)


def bin_counts(edges, values):
    k = max(len(edges), 2) + 1
    counts = np.zeros(k, dtype=np.int64)
    for x in values:
        if x < edges[0]:
            i = 0
        elif x > edges[-1]:
            i = k - 1
        elif len(edges) == 1:
            i = 1
        else:
            i = min(int(np.searchsorted(edges, x, side="right")), len(edges) - 1)
        counts[i] += 1
    return counts


def psi(expected, counts):
    a = np.maximum(counts / counts.sum(), PSI_EPSILON)
    e = np.maximum(expected, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def case(name, reference, current):
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float32).astype(np.float64)
    ref_sorted = np.sort(reference)
    edges = edges_of(ref_sorted, BINS)
    expected = bin_counts(edges, ref_sorted) / len(reference)
    counts = bin_counts(edges, current)
    sketch_edges = edges_of(ref_sorted, SKETCH_BINS)
    sketch_expected = bin_counts(sketch_edges, ref_sorted) / len(reference)
    sketch = bin_counts(sketch_edges, current)
    ks_binned = float(np.max(np.abs(np.cumsum(sketch / sketch.sum()) - np.cumsum(sketch_expected))))
    n, m = len(reference), len(current)
    en = n * m / (n + m)
    return {
        "name": name,
        "reference": [float(x) for x in reference],
        "current": [float(x) for x in current],
        "edges": [float(x) for x in edges],
        "counts": [int(c) for c in counts],
        "psi": psi(expected, counts),
        "js": float(distance.jensenshannon(expected, counts / counts.sum())),
        "sketch_counts": [int(c) for c in sketch],
        "ks_binned": ks_binned,
        "ks_binned_p": float(stats.kstwobign.sf(np.sqrt(en) * ks_binned)),
        "ks_exact": float(stats.ks_2samp(reference, current).statistic),
        "ks_exact_p": float(stats.ks_2samp(reference, current, method="asymp").pvalue),
        "wasserstein_normed": float(stats.wasserstein_distance(reference, current) / np.std(reference)),
        "mean": float(np.mean(current)),
        "variance": float(np.var(current)),
    }


def categorical_case(name, reference, current):
    """A categorical feature: one bin per reference category plus "other"; PSI, JS and
    Pearson's chi-square test (expected fractions floored at PSI_EPSILON, k - 1 degrees of
    freedom) with scipy."""
    categories = np.unique(reference)
    expected = np.array([np.mean(reference == c) for c in categories] + [0.0])
    counts = np.array([np.sum(current == c) for c in categories] + [np.sum(~np.isin(current, categories))])
    floored = np.maximum(expected, PSI_EPSILON)
    chi2 = stats.chisquare(counts, counts.sum() * floored / floored.sum())
    return {
        "name": name,
        "reference": [float(x) for x in reference],
        "current": [float(x) for x in current],
        "categories": [float(x) for x in categories],
        "counts": [int(c) for c in counts],
        "psi": psi(expected, counts),
        "js": float(distance.jensenshannon(expected, counts / counts.sum())),
        "chi2_statistic": float(chi2.statistic),
        "chi2_p": float(chi2.pvalue),
    }


def main():
    rng = np.random.default_rng(20261129)
    ref = lambda: np.round(rng.normal(0.0, 1.0, 2000), 6)
    cases = [
        case("same distribution", ref(), rng.normal(0.0, 1.0, 500)),
        case("mean shift of half a deviation", ref(), rng.normal(0.5, 1.0, 500)),
        case("wider spread", ref(), rng.normal(0.0, 1.6, 500)),
        case("shift out of the reference range", ref(), rng.normal(3.5, 0.5, 300)),
        case("skewed feature", np.round(rng.lognormal(0.0, 0.8, 2000), 6), rng.lognormal(0.3, 0.8, 400)),
        case("discrete feature", rng.poisson(3.0, 2000).astype(np.float64), rng.poisson(4.0, 400)),
    ]
    # A generator of its own, so that the cases above keep their data.
    cat = np.random.default_rng(7)
    codes = lambda p, n: cat.choice(np.arange(len(p)), size=n, p=p).astype(np.float64)
    categorical = [
        categorical_case("same categories", codes([0.5, 0.3, 0.2], 1000), codes([0.5, 0.3, 0.2], 300)),
        categorical_case("shifted categories", codes([0.5, 0.3, 0.2], 1000), codes([0.2, 0.3, 0.5], 300)),
        categorical_case(
            "an unseen category",
            codes([0.4, 0.4, 0.1, 0.1], 1000),
            np.concatenate([codes([0.4, 0.4, 0.1, 0.1], 280), np.full(20, 9.0)]),
        ),
    ]
    print(json.dumps({"generator": "tests/scripts/drift_reference.py", "cases": cases, "categorical": categorical}))


if __name__ == "__main__":
    main()
