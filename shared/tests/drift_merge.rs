//! Property: the summary of two windows merged (and rescored against the profile) equals
//! the summary of one window over both windows' inputs. Counts, sketches, labels and
//! latencies are equal exactly; moments and scores (of numeric and categorical features,
//! and of the predictions) up to floating-point rounding.

use edgeloop_shared::drift::{
    DriftMethod, DriftPolicy, DriftWindow, ReferenceProfile, WindowStats,
};
use proptest::prelude::*;

fn profile() -> ReferenceProfile {
    // Two features: a continuous one and a categorical one (codes 0 to 6); and the
    // classes the model predicts on the reference.
    let a: Vec<f64> = (0..500)
        .map(|i| ((i * 37) % 500) as f64 / 50.0 - 5.0)
        .collect();
    let b: Vec<f64> = (0..500).map(|i| (i % 7) as f64).collect();
    let mut profile =
        ReferenceProfile::from_columns(&["a".into(), "b".into()], &[a, b.clone()], 10).unwrap();
    profile.set_categorical("b", &b).unwrap();
    profile.set_predictions((0..500).map(|i| [0, 0, 1, 2][i % 4]), 3);
    profile
}

/// One input: two feature values (sometimes NaN or out of range), a predicted class, a
/// label (or none), a latency in milliseconds.
fn input() -> impl Strategy<Value = ([f32; 2], usize, Option<usize>, f64)> {
    (
        prop_oneof![8 => -8.0f32..8.0, 1 => Just(f32::NAN)],
        prop_oneof![0.0f32..9.0, (0u8..10).prop_map(f32::from)],
        0usize..3,
        proptest::option::of(0usize..3),
        0.01f64..3000.0,
    )
        .prop_map(|(a, b, class, label, ms)| ([a, b], class, label, ms))
}

fn window_of(policy: DriftPolicy, inputs: &[([f32; 2], usize, Option<usize>, f64)]) -> WindowStats {
    let mut window = DriftWindow::with_policy(profile(), policy, 1_000);
    for (row, class, label, ms) in inputs {
        window.observe(row, Some(*class)).unwrap();
        if *ms > 2000.0 {
            window.observe_errors(1);
        }
        window.observe_latency(*ms);
        if let Some(label) = label {
            window.observe_label(*label, *class);
        }
    }
    window.finish(2_000)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn close_opt(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn merged_summaries_equal_the_summary_of_the_union(
        inputs in proptest::collection::vec(input(), 0..120),
        split in any::<proptest::sample::Index>(),
        method in prop_oneof![
            Just(DriftMethod::Psi), Just(DriftMethod::Js),
            Just(DriftMethod::Wasserstein), Just(DriftMethod::Ks),
        ],
    ) {
        let policy = DriftPolicy { method, ..DriftPolicy::default() };
        let cut = if inputs.is_empty() { 0 } else { split.index(inputs.len() + 1) };
        let whole = window_of(policy, &inputs);
        let mut merged = window_of(policy, &inputs[..cut]);
        merged.merge(&window_of(policy, &inputs[cut..])).unwrap();
        merged.rescore(&profile(), &policy).unwrap();

        prop_assert_eq!(merged.samples, whole.samples);
        prop_assert_eq!(&merged.predictions, &whole.predictions);
        prop_assert_eq!(merged.errors, whole.errors);
        prop_assert_eq!(&merged.latency_ms, &whole.latency_ms);
        prop_assert_eq!(&merged.confusion, &whole.confusion);
        prop_assert!(close_opt(merged.accuracy, whole.accuracy));
        prop_assert_eq!(merged.latency_quantile_ms(0.99), whole.latency_quantile_ms(0.99));
        for (m, w) in merged.features.iter().zip(&whole.features) {
            prop_assert_eq!(&m.counts, &w.counts);
            prop_assert_eq!(&m.sketch, &w.sketch);
            prop_assert_eq!(m.nan, w.nan);
            prop_assert_eq!(m.moments.count, w.moments.count);
            prop_assert_eq!((m.moments.min, m.moments.max), (w.moments.min, w.moments.max));
            prop_assert!(close(m.moments.mean, w.moments.mean));
            prop_assert!(close(m.moments.m2, w.moments.m2), "{} vs {}", m.moments.m2, w.moments.m2);
            prop_assert!(close(m.below, w.below) && close(m.above, w.above));
            prop_assert!(close(m.psi, w.psi) && close(m.js, w.js));
            prop_assert!(close_opt(m.ks, w.ks) && close_opt(m.ks_p, w.ks_p));
            prop_assert!(close_opt(m.wasserstein, w.wasserstein));
            prop_assert!(close_opt(m.chi2_p, w.chi2_p));
            prop_assert_eq!(m.drifted, w.drifted);
        }
        prop_assert!(close_opt(merged.prediction_psi, whole.prediction_psi));
        prop_assert!(close_opt(merged.prediction_js, whole.prediction_js));
        prop_assert!(close_opt(merged.prediction_chi2_p, whole.prediction_chi2_p));
        prop_assert_eq!(merged.prediction_drift, whole.prediction_drift);
        prop_assert!(close(merged.psi_max, whole.psi_max));
        prop_assert_eq!(merged.drift_share, whole.drift_share);
        prop_assert_eq!(merged.dataset_drift, whole.dataset_drift);
        prop_assert_eq!((merged.start_ms, merged.end_ms), (whole.start_ms, whole.end_ms));
    }
}

#[test]
fn a_policy_names_its_bad_field() {
    let bad = DriftPolicy {
        ks_alpha: 1.5,
        ..DriftPolicy::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("ks_alpha"), "{e}");
    let bad = DriftPolicy {
        psi_warn: 0.3,
        ..DriftPolicy::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("psi_warn"));
    DriftPolicy::default().validate().unwrap();
    let parsed: DriftPolicy = serde_json::from_str(r#"{"method":"ks","ks_alpha":0.01}"#).unwrap();
    assert_eq!(parsed.method, DriftMethod::Ks);
    assert_eq!(parsed.psi_alert, 0.25, "unset fields keep their defaults");
    assert!(serde_json::from_str::<DriftPolicy>(r#"{"metod":"ks"}"#).is_err());
}

#[test]
fn a_fall_in_confidence_raises_the_alert_in_its_window() {
    let mut window = DriftWindow::new(profile(), 0);
    let mut fired = false;
    for i in 0..400 {
        window.observe(&[0.0, 1.0], Some(0)).unwrap();
        let confidence = if i < 200 { 0.95 } else { 0.55 };
        if window.observe_confidence(confidence) {
            fired = true;
            break;
        }
    }
    assert!(fired);
    let stats = window.finish(10);
    assert!(stats.confidence_alert);
    assert!(
        !window.finish(20).confidence_alert,
        "the next window starts clear"
    );
}

/// A regression's profile: one feature, and the values the model predicts on the
/// reference.
fn regression_profile() -> ReferenceProfile {
    let a: Vec<f64> = (0..400).map(|i| ((i * 13) % 400) as f64 / 40.0).collect();
    let predicted: Vec<f64> = a.iter().map(|x| 2.0 * x + 1.0).collect();
    let mut profile = ReferenceProfile::from_columns(&["a".into()], &[a], 10).unwrap();
    profile.set_predicted_values(&predicted).unwrap();
    profile
}

/// One input of a regression: a feature value, the predicted value (sometimes beyond the
/// reference's), and the true value when feedback gave it.
fn regression_input() -> impl Strategy<Value = (f32, f64, Option<f64>)> {
    (
        -2.0f32..12.0,
        prop_oneof![8 => -5.0f64..30.0, 1 => Just(f64::NAN)],
        proptest::option::of(-5.0f64..30.0),
    )
}

fn regression_window(policy: DriftPolicy, inputs: &[(f32, f64, Option<f64>)]) -> WindowStats {
    let mut window = DriftWindow::with_policy(regression_profile(), policy, 1_000);
    for (x, predicted, truth) in inputs {
        window.observe(&[*x], None).unwrap();
        window.observe_value(*predicted);
        if let Some(truth) = truth {
            window.observe_residual(*predicted, *truth);
        }
    }
    window.finish(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The same for a regression: its predicted values' bins, sketch and scores, and the
    /// errors on its true values.
    #[test]
    fn merged_regression_summaries_equal_the_summary_of_the_union(
        inputs in proptest::collection::vec(regression_input(), 0..120),
        split in any::<proptest::sample::Index>(),
        method in prop_oneof![
            Just(DriftMethod::Psi), Just(DriftMethod::Js),
            Just(DriftMethod::Wasserstein), Just(DriftMethod::Ks),
        ],
    ) {
        let policy = DriftPolicy { method, ..DriftPolicy::default() };
        let cut = if inputs.is_empty() { 0 } else { split.index(inputs.len() + 1) };
        let whole = regression_window(policy, &inputs);
        let mut merged = regression_window(policy, &inputs[..cut]);
        merged.merge(&regression_window(policy, &inputs[cut..])).unwrap();
        merged.rescore(&regression_profile(), &policy).unwrap();

        let (m, w) = (merged.predicted_value.as_ref().unwrap(), whole.predicted_value.as_ref().unwrap());
        prop_assert_eq!(&m.counts, &w.counts);
        prop_assert_eq!(&m.sketch, &w.sketch);
        prop_assert_eq!(m.nan, w.nan);
        prop_assert!(close(m.moments.mean, w.moments.mean));
        prop_assert!(close(m.psi, w.psi) && close(m.js, w.js));
        prop_assert!(close_opt(m.ks_p, w.ks_p) && close_opt(m.wasserstein, w.wasserstein));
        prop_assert!(close_opt(merged.prediction_psi, whole.prediction_psi));
        prop_assert!(close_opt(merged.prediction_js, whole.prediction_js));
        prop_assert_eq!(merged.prediction_drift, whole.prediction_drift);
        prop_assert_eq!(merged.residuals.map(|r| r.count), whole.residuals.map(|r| r.count));
        prop_assert!(close_opt(merged.mae, whole.mae) && close_opt(merged.rmse, whole.rmse));
        prop_assert_eq!(merged.labelled(), whole.labelled());
        prop_assert!(merged.predictions.is_empty() && merged.confusion.is_empty());
    }
}

#[test]
fn a_regression_window_scores_its_values_and_errors() {
    let profile = regression_profile();
    let policy = DriftPolicy::default();
    // Predictions as the reference made them, two of them labelled: errors 0.5 and −1.5.
    let mut window = DriftWindow::with_policy(profile.clone(), policy, 0);
    for i in 0..400 {
        let x = ((i * 13) % 400) as f64 / 40.0;
        window.observe(&[x as f32], None).unwrap();
        window.observe_value(2.0 * x + 1.0);
    }
    window.observe_residual(3.5, 3.0);
    window.observe_residual(1.5, 3.0);
    let stats = window.finish(10);
    assert_eq!(stats.labelled(), 2);
    assert_eq!(stats.mae, Some(1.0));
    assert!((stats.rmse.unwrap() - (1.25f64).sqrt()).abs() < 1e-12);
    assert_eq!(stats.residuals.unwrap().bias(), Some(-0.5));
    assert_eq!(stats.accuracy, None);
    assert!(stats.prediction_psi.unwrap() < 0.01, "{stats:?}");
    assert!(!stats.prediction_drift);

    // Predictions shifted by a reference deviation: prediction drift, by every method.
    for method in [
        DriftMethod::Psi,
        DriftMethod::Js,
        DriftMethod::Wasserstein,
        DriftMethod::Ks,
    ] {
        let policy = DriftPolicy {
            method,
            ..DriftPolicy::default()
        };
        let mut window = DriftWindow::with_policy(profile.clone(), policy, 0);
        for i in 0..400 {
            let x = ((i * 13) % 400) as f64 / 40.0;
            window.observe(&[x as f32], None).unwrap();
            window.observe_value(2.0 * x + 1.0 + 6.0);
        }
        let stats = window.finish(10);
        assert!(stats.prediction_drift, "{method:?}: {stats:?}");
        assert!(stats.prediction_psi.unwrap() > 0.25);
        assert!(stats.features[0].psi < 0.01, "the inputs did not move");
    }

    // A summary of a regression does not merge with a classifier's of the same features.
    let mut classifier_profile = regression_profile();
    classifier_profile.predicted_value = None;
    classifier_profile.set_predictions([0, 1], 2);
    let mut classifier = DriftWindow::new(classifier_profile, 0);
    classifier.observe(&[1.0], Some(0)).unwrap();
    let classifier = classifier.finish(10);
    let regression = regression_window(DriftPolicy::default(), &[(1.0, 3.0, None)]);
    let e = regression
        .clone()
        .merge(&classifier)
        .unwrap_err()
        .to_string();
    assert!(e.contains("classifier"), "{e}");
    assert!(classifier.clone().merge(&regression).is_err());
}
