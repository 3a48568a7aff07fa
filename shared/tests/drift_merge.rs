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
