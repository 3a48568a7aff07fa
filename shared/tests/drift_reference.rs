//! edgeloop's drift scores against numpy and scipy on fixed data
//! (`tests/scripts/drift_reference.py` made the fixture): PSI and Jensen–Shannon on the
//! same bins within 1e-6; the KS statistic within the sketch's stated error bound of
//! scipy's exact one; the KS p-value of the binned statistic within 1e-6; the normed
//! Wasserstein distance within 4% of scipy's on the raw data (the sketch takes values as
//! uniform within each of its 100 bins; the largest difference here is 3.2%). Categorical
//! features: the categories, counts, PSI and JS as numpy's, and the chi-square statistic
//! and p-value as scipy's `chisquare` within 1e-9.

use edgeloop_shared::drift::{DEFAULT_BINS, DriftWindow, ReferenceProfile, WindowStats};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    categorical: Vec<CategoricalCase>,
}

#[derive(Deserialize)]
struct CategoricalCase {
    name: String,
    reference: Vec<f64>,
    current: Vec<f64>,
    categories: Vec<f64>,
    counts: Vec<u64>,
    psi: f64,
    js: f64,
    chi2_statistic: f64,
    chi2_p: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    reference: Vec<f64>,
    current: Vec<f64>,
    edges: Vec<f64>,
    counts: Vec<u64>,
    psi: f64,
    js: f64,
    sketch_counts: Vec<u64>,
    ks_binned: f64,
    ks_binned_p: f64,
    ks_exact: f64,
    wasserstein_normed: f64,
    mean: f64,
    variance: f64,
}

fn fixture() -> Fixture {
    let text = include_str!("fixtures/drift_reference.json");
    serde_json::from_str(text).expect("fixture parses")
}

/// The case's reference profile, and its window of live inputs finished.
fn profile_and_window(case: &Case) -> (ReferenceProfile, WindowStats) {
    let profile = ReferenceProfile::from_columns(
        &["x".into()],
        std::slice::from_ref(&case.reference),
        DEFAULT_BINS,
    )
    .unwrap();
    let stats = window_over(&profile, &case.current);
    (profile, stats)
}

/// A finished window of one feature's live inputs against `profile`.
fn window_over(profile: &ReferenceProfile, current: &[f64]) -> WindowStats {
    let mut window = DriftWindow::new(profile.clone(), 0);
    for &x in current {
        window.observe(&[x as f32], Some(0)).unwrap();
    }
    window.finish(1)
}

#[test]
fn scores_match_numpy_and_scipy() {
    let cases = fixture().cases;
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = &case.name;
        let (profile, stats) = profile_and_window(&case);
        let reference = &profile.features[0];
        assert_eq!(reference.edges.len(), case.edges.len(), "{name}: edges");
        for (a, b) in reference.edges.iter().zip(&case.edges) {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{name}: edge {a} vs {b}"
            );
        }
        let f = &stats.features[0];
        assert_eq!(f.counts, case.counts, "{name}: bin counts");
        assert_eq!(f.sketch, case.sketch_counts, "{name}: sketch counts");
        assert!(
            (f.psi - case.psi).abs() < 1e-6,
            "{name}: PSI {} vs {}",
            f.psi,
            case.psi
        );
        assert!(
            (f.js - case.js).abs() < 1e-6,
            "{name}: JS {} vs {}",
            f.js,
            case.js
        );

        let ks = f.ks.unwrap();
        let bound = f.ks_error.unwrap();
        assert!(
            (ks - case.ks_binned).abs() < 1e-9,
            "{name}: binned KS {ks} vs {}",
            case.ks_binned
        );
        // 1/100 for a continuous feature; a discrete one's atoms make it loose (its
        // binned statistic is exact: every atom is a bin boundary).
        if !name.contains("discrete") {
            assert!(bound <= 0.02, "{name}: KS error bound {bound}");
        }
        assert!(
            ks <= case.ks_exact + 1e-12 && case.ks_exact - ks <= bound,
            "{name}: KS {ks} is not within {bound} below scipy's exact {}",
            case.ks_exact
        );
        let p = f.ks_p.unwrap();
        assert!(
            (p - case.ks_binned_p).abs() < 1e-6,
            "{name}: KS p {p} vs {}",
            case.ks_binned_p
        );

        let w = f.wasserstein.unwrap();
        let off = (w - case.wasserstein_normed).abs();
        assert!(
            off <= 0.04 * case.wasserstein_normed.max(0.1),
            "{name}: normed Wasserstein {w} vs scipy's {}",
            case.wasserstein_normed
        );

        assert_eq!(f.moments.count, case.current.len() as u64);
        assert!((f.moments.mean - case.mean).abs() < 1e-9, "{name}: mean");
        let variance = f.moments.variance().unwrap();
        assert!(
            (variance - case.variance).abs() < 1e-9 * case.variance.max(1.0),
            "{name}: variance"
        );
    }
}

#[test]
fn drift_decisions_follow_the_usual_thresholds() {
    for case in fixture().cases {
        let (_, stats) = profile_and_window(&case);
        // The default policy: PSI at or above 0.25; one feature, so its drift is the
        // dataset's.
        let drifted = case.psi >= 0.25;
        assert_eq!(stats.features[0].drifted, drifted, "{}", case.name);
        assert_eq!(stats.dataset_drift, drifted, "{}", case.name);
        assert_eq!(stats.drift_share, if drifted { 1.0 } else { 0.0 });
    }
}

#[test]
fn categorical_scores_match_scipy() {
    let cases = fixture().categorical;
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = &case.name;
        let mut profile = ReferenceProfile::from_columns(
            &["site".into()],
            std::slice::from_ref(&case.reference),
            DEFAULT_BINS,
        )
        .unwrap();
        profile.set_categorical("site", &case.reference).unwrap();
        assert_eq!(profile.features[0].edges, case.categories, "{name}");
        let stats = window_over(&profile, &case.current);
        let f = &stats.features[0];
        assert_eq!(f.counts, case.counts, "{name}");
        assert!(
            (f.psi - case.psi).abs() < 1e-6,
            "{name}: PSI {} vs {}",
            f.psi,
            case.psi
        );
        assert!(
            (f.js - case.js).abs() < 1e-6,
            "{name}: JS {} vs {}",
            f.js,
            case.js
        );
        let (statistic, p) =
            edgeloop_shared::stats::chi_square(&profile.features[0].fractions, &f.counts).unwrap();
        assert!(
            (statistic - case.chi2_statistic).abs() <= 1e-9 * case.chi2_statistic.max(1.0),
            "{name}: chi-square {statistic} vs {}",
            case.chi2_statistic
        );
        assert!(
            (p - case.chi2_p).abs() <= 1e-9 * case.chi2_p.max(1e-300),
            "{name}: p {p} vs {}",
            case.chi2_p
        );
        assert_eq!(
            f.chi2_p,
            Some(p),
            "{name}: the window reports the same p-value"
        );
    }
}
