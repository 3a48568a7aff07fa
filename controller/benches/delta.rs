//! Delta bundle size against the full bundle, for models whose last layer was retrained.
//!
//! Each model is an MLP (MatMul → Relu per hidden layer, then a MatMul head and Softmax)
//! with pseudo-random float weights, which compress about as badly as trained ones. The
//! "retrained" version keeps every layer but the head, whose weights are drawn again; a
//! "fully retrained" version draws every layer again (the worst case: the delta has nothing
//! to reuse). Both are packed as a full bundle (`bundle::pack`, the peer) and as a delta
//! against the base (`bundle::pack_delta`), in the same run; the delta is checked to verify
//! back to the exact model. Target: delta ≤ 0.3 × full for a retrained head.
//!
//! Run: `cargo bench -p edgeloop-controller --bench delta`.

use std::time::Instant;

use edgeloop_controller::trainer::mlp;
use edgeloop_shared::bundle::{self, Limits, Manifest};
use edgeloop_shared::signing::{SecretKey, TrustedKeys};

fn manifest(dims: &[i64], version: u64) -> Manifest {
    let features: Vec<String> = (0..dims[0]).map(|i| format!("f{i}")).collect();
    let columns: Vec<Vec<f64>> = (0..dims[0])
        .map(|c| (0..20).map(|r| ((r * 7 + c) % 11) as f64).collect())
        .collect();
    let classes = *dims.last().unwrap() as u64;
    Manifest::classifier("bench", version, &features, &columns, classes).unwrap()
}

fn main() {
    let key = SecretKey::from_seed([7; 32]);
    let trusted = TrustedKeys::new([key.public().clone()]);
    let cases: [(&str, Vec<i64>); 4] = [
        ("sensor MLP 16-256-256-8", vec![16, 256, 256, 8]),
        ("tabular MLP 64-512-512-512-10", vec![64, 512, 512, 512, 10]),
        (
            "embedding head 128-1024-1024-100",
            vec![128, 1024, 1024, 100],
        ),
        ("wide head 32-256-1000", vec![32, 256, 1000]),
    ];
    println!(
        "{:<36} {:>10} {:>11} {:>11} {:>7} {:>9} {:>9}",
        "model (retrained head)", "raw", "full", "delta", "ratio", "pack ms", "verify ms"
    );
    for (name, dims) in &cases {
        let layers = dims.len() - 1;
        let base_seeds: Vec<u64> = (1..=layers as u64).collect();
        let mut head_seeds = base_seeds.clone();
        *head_seeds.last_mut().unwrap() += 100;
        let all_seeds: Vec<u64> = base_seeds.iter().map(|s| s + 1000).collect();
        let base = mlp(dims, &base_seeds);
        for (what, seeds) in [("head", &head_seeds), ("every layer", &all_seeds)] {
            let model = mlp(dims, seeds);
            let full = bundle::pack(manifest(dims, 2), &model, &key).unwrap();
            let started = Instant::now();
            let delta = bundle::pack_delta(manifest(dims, 2), &model, &base, &key).unwrap();
            let pack_ms = started.elapsed().as_secs_f64() * 1e3;
            let started = Instant::now();
            let verified =
                bundle::verify_delta(&delta, &trusted, &Limits::default(), Some(&base)).unwrap();
            let verify_ms = started.elapsed().as_secs_f64() * 1e3;
            assert_eq!(verified.model, model, "the delta gives the model back");
            println!(
                "{:<36} {:>10} {:>11} {:>11} {:>6.3}x {:>9.1} {:>9.1}",
                format!("{name}, {what}"),
                model.len(),
                full.len(),
                delta.len(),
                delta.len() as f64 / full.len() as f64,
                pack_ms,
                verify_ms
            );
        }
    }
}
