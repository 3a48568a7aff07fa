//! Condition-monitoring features of a window of raw vibration samples.

/// What a window of acceleration samples says about a machine's vibration. The window's
/// mean (gravity, sensor offset) is removed first, so the features describe the
/// vibration alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VibrationFeatures {
    /// Root mean square, in the samples' unit.
    pub rms: f32,
    /// Largest absolute deviation from the mean, in the samples' unit.
    pub peak: f32,
    /// Pearson's kurtosis, E[(x-μ)⁴] / σ⁴: 3 for Gaussian vibration, higher when the
    /// signal is impulsive (bearing defects, impacts). NaN for a constant window.
    pub kurtosis: f32,
}

impl VibrationFeatures {
    /// The features of `window`; `None` when it is empty or holds a non-finite sample.
    pub fn of(window: &[f32]) -> Option<VibrationFeatures> {
        if window.is_empty() || window.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let n = window.len() as f64;
        let mean = window.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let (mut m2, mut m4, mut peak) = (0.0, 0.0, 0.0f64);
        for &x in window {
            let d = f64::from(x) - mean;
            let d2 = d * d;
            m2 += d2;
            m4 += d2 * d2;
            peak = peak.max(libm::fabs(d));
        }
        m2 /= n;
        m4 /= n;
        let kurtosis = if m2 > 0.0 { m4 / (m2 * m2) } else { f64::NAN };
        Some(VibrationFeatures {
            rms: libm::sqrt(m2) as f32,
            peak: peak as f32,
            kurtosis: kurtosis as f32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_known_windows() {
        // ±1 around an offset of 1 g: rms 1, peak 1, kurtosis 1 (a square wave).
        let square: [f32; 8] = [2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0];
        let f = VibrationFeatures::of(&square).unwrap();
        assert!((f.rms - 1.0).abs() < 1e-6, "{f:?}");
        assert!((f.peak - 1.0).abs() < 1e-6, "{f:?}");
        assert!((f.kurtosis - 1.0).abs() < 1e-6, "{f:?}");

        // A sine: rms 1/√2 of the amplitude, kurtosis 1.5.
        let sine: [f32; 1000] = core::array::from_fn(|i| {
            3.0 * libm::sinf(i as f32 * 2.0 * core::f32::consts::PI / 100.0)
        });
        let f = VibrationFeatures::of(&sine).unwrap();
        assert!(
            (f.rms - 3.0 / core::f32::consts::SQRT_2).abs() < 1e-3,
            "{f:?}"
        );
        assert!((f.peak - 3.0).abs() < 1e-3, "{f:?}");
        assert!((f.kurtosis - 1.5).abs() < 1e-3, "{f:?}");

        // One impulse in silence, the most impulsive signal: n - 2 + 1/(n - 1) for n samples.
        let mut impulse = [0.0f32; 64];
        impulse[10] = 5.0;
        let f = VibrationFeatures::of(&impulse).unwrap();
        assert!((f.kurtosis - 62.0 - 1.0 / 63.0).abs() < 1e-3, "{f:?}");

        assert!(VibrationFeatures::of(&[]).is_none());
        assert!(VibrationFeatures::of(&[1.0, f32::NAN]).is_none());
        assert!(
            VibrationFeatures::of(&[1.0, 1.0])
                .unwrap()
                .kurtosis
                .is_nan()
        );
    }
}
