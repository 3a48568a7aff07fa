//! The agent's per-input cost against its peers, measured in the same run:
//!
//! 1. inference: edgeloop's `Plan::infer` (input checks, argmax) against a bare tract
//!    plan of the same model, built the way tract's own examples do; and for a tensor
//!    input (the compatibility suite's CNN, 3×32×32 images), everything the agent does
//!    per image (normalisation by channel, the plan, channel statistics counted into a
//!    drift window) against bare tract and against the same plan run bare (its
//!    normalisation folded in; no checks, no drift), and with the images sent channels
//!    last (a transpose more);
//! 2. drift: edgeloop's `DriftWindow` (observe every row, finish the window) against a
//!    straightforward reference that keeps the rows and computes the histogram and PSI
//!    at the end with a linear scan over the bins;
//! 3. drift against numpy and scipy (`drift_scipy.py`, when installed): the same window's
//!    PSI, JS, KS, Wasserstein and moments, the peer's time per window measured in its own
//!    process on the same rows.
//!
//! Run: `cargo bench -p edgeloop-agent --bench inference`

use std::hint::black_box;
use std::time::{Duration, Instant};

use edgeloop_agent::runtime::Plan;
use edgeloop_agent::source::{InputSource, ShiftControl, VibrationGenerator, read_numeric_csv};
use edgeloop_shared::bundle::{Preprocess, RowLayout, TensorSpec};
use edgeloop_shared::drift::{DEFAULT_BINS, DriftWindow, PSI_EPSILON, ReferenceProfile};
use tract_onnx::prelude::*;

const MODEL: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");
const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../controller/assets/vibration/reference_v1.csv"
);
const ROWS: usize = 20_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Per-call latencies of `f` over `rows`, after a warm-up.
fn time_each(rows: &[Vec<f32>], mut f: impl FnMut(&[f32])) -> Vec<Duration> {
    for row in rows.iter().take(1000) {
        f(row);
    }
    let mut times: Vec<Duration> = rows
        .iter()
        .map(|row| {
            let start = Instant::now();
            f(row);
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// Paired latencies: each row through `bare` and through `ours`, one right after the other
/// (which goes first alternates), so that both meet the same moment of a shared machine.
/// Returns both sorted, and the sorted per-row differences `ours − bare` in seconds.
fn time_paired(
    rows: &[Vec<f32>],
    mut bare: impl FnMut(&[f32]),
    mut ours: impl FnMut(&[f32]),
) -> (Vec<Duration>, Vec<Duration>, Vec<f64>) {
    for row in rows.iter().take(1000) {
        bare(row);
        ours(row);
    }
    let (mut bare_times, mut ours_times, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        let mut times = [Duration::ZERO; 2];
        for k in [i % 2, 1 - i % 2] {
            let start = Instant::now();
            if k == 0 {
                bare(row)
            } else {
                ours(row)
            }
            times[k] = start.elapsed();
        }
        bare_times.push(times[0]);
        ours_times.push(times[1]);
        added.push(times[1].as_secs_f64() - times[0].as_secs_f64());
    }
    bare_times.sort();
    ours_times.sort();
    added.sort_by(f64::total_cmp);
    (bare_times, ours_times, added)
}

/// One run of an optimized tract model on `row`, shaped `shape` (the peers' work).
fn run_tract(model: &std::sync::Arc<TypedRunnableModel>, shape: &[usize], row: &[f32]) {
    let input = Tensor::from_shape(shape, row).unwrap();
    black_box(model.run(tvec!(input.into())).unwrap());
}

/// Prints a paired measurement ([`time_paired`]).
fn print_paired(peer: &str, (bare, ours, added): &(Vec<Duration>, Vec<Duration>, Vec<f64>)) {
    let (bare50, ours50) = (percentile(bare, 0.5), percentile(ours, 0.5));
    let added50 = added[added.len() / 2];
    println!(
        "  paired, row by row: {peer} p50 {bare50:>10.2?}, edgeloop p50 {ours50:>10.2?} \
         ({:.3}x); edgeloop adds a median {:.2} µs per row ({:.3}x)",
        ours50.as_secs_f64() / bare50.as_secs_f64(),
        added50 * 1e6,
        1.0 + added50 / bare50.as_secs_f64()
    );
}

fn main() {
    let mut source = VibrationGenerator::new(7, ShiftControl::default());
    let rows: Vec<Vec<f32>> = (0..ROWS).map(|_| source.next_row().unwrap()).collect();
    let names: Vec<String> = source.columns().to_vec();

    // 1. Inference.
    let bare = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(MODEL))
        .and_then(|m| m.with_input_fact(0, f32::fact([1, 4]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("tract loads the example model");
    let plan = Plan::compile(MODEL, 4).expect("edgeloop loads the example model");
    let run_bare = |row: &[f32]| run_tract(&bare, &[1, 4], row);
    let run_ours = |row: &[f32]| {
        black_box(plan.infer(row, &names).unwrap());
    };
    let bare_times = time_each(&rows, run_bare);
    let ours = time_each(&rows, run_ours);
    let (b50, o50) = (percentile(&bare_times, 0.5), percentile(&ours, 0.5));
    let (b99, o99) = (percentile(&bare_times, 0.99), percentile(&ours, 0.99));
    println!("inference (example MLP, 1x4, single thread, {ROWS} rows)");
    println!("  bare tract       p50 {b50:>10.2?}  p99 {b99:>10.2?}");
    println!("  edgeloop Plan    p50 {o50:>10.2?}  p99 {o99:>10.2?}");
    println!(
        "  ratio edgeloop/bare: p50 {:.2}x, p99 {:.2}x",
        o50.as_secs_f64() / b50.as_secs_f64(),
        o99.as_secs_f64() / b99.as_secs_f64()
    );
    print_paired("bare tract", &time_paired(&rows, run_bare, run_ours));
    // The plan's own optimized model run bare: what the checks and the result around it
    // cost, apart from any difference between the two optimized graphs.
    let same_plan = plan.runnable().clone();
    let paired = time_paired(&rows, |row| run_tract(&same_plan, &[1, 4], row), run_ours);
    print_paired("the same plan", &paired);

    tensor_inference();

    // 2. Drift statistics over one window of every row.
    let (columns, reference_rows) = read_numeric_csv(std::path::Path::new(REFERENCE)).unwrap();
    let by_column: Vec<Vec<f64>> = (0..columns.len())
        .map(|c| reference_rows.iter().map(|r| f64::from(r[c])).collect())
        .collect();
    let profile = ReferenceProfile::from_columns(&columns, &by_column, DEFAULT_BINS).unwrap();
    let runs = 20;
    let start = Instant::now();
    let mut ours_psi = 0.0;
    let mut ours = None;
    for _ in 0..runs {
        let mut window = DriftWindow::new(profile.clone(), 0);
        for row in &rows {
            window.observe(row, Some(0)).unwrap();
        }
        let stats = black_box(window.finish(1));
        ours_psi = stats.psi_max;
        ours = Some(stats);
    }
    let ours_drift = start.elapsed() / runs;
    let start = Instant::now();
    let mut naive_psi = 0.0;
    for _ in 0..runs {
        naive_psi = black_box(naive_psi_max(&profile, &rows));
    }
    let naive_drift = start.elapsed() / runs;
    assert!(
        (ours_psi - naive_psi).abs() < 1e-9,
        "both compute the same PSI: {ours_psi} vs {naive_psi}"
    );
    println!("drift window ({ROWS} rows x 4 features, 12 bins, PSI {ours_psi:.4})");
    println!(
        "  naive reference  {naive_drift:>10.2?} per window, {:>8.1} ns/row",
        naive_drift.as_nanos() as f64 / ROWS as f64
    );
    println!(
        "  edgeloop window  {ours_drift:>10.2?} per window, {:>8.1} ns/row",
        ours_drift.as_nanos() as f64 / ROWS as f64
    );
    println!(
        "  ratio edgeloop/naive: {:.2}x",
        ours_drift.as_secs_f64() / naive_drift.as_secs_f64()
    );
    scipy_peer(&profile, &by_column, &rows, &ours.expect("ran"), ours_drift);
}

/// 1b. A tensor input: per image, bare tract against the agent's normalisation by channel,
/// plan and channel statistics counted into a drift window.
fn tensor_inference() {
    const CNN: &[u8] = include_bytes!("../tests/compat/cnn.onnx");
    const IMAGES: usize = 3_000;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u32 << 24) as f32
    };
    let images: Vec<Vec<f32>> = (0..IMAGES)
        .map(|_| (0..3 * 32 * 32).map(|_| uniform()).collect())
        .collect();
    let bare = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(CNN))
        .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, 32, 32]).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("tract loads the CNN");
    let spec = TensorSpec {
        preprocess: Some(Preprocess {
            offset: vec![0.5; 3],
            scale: vec![2.0; 3],
        }),
        ..TensorSpec::f32_tensor("image", &[3, 32, 32])
    };
    let plan = Plan::compile_tensor(CNN, &spec).expect("edgeloop loads the CNN");
    let names = spec.tensor_feature_names();
    let watched: Vec<Vec<f32>> = images[..500]
        .iter()
        .map(|i| spec.tensor_features(i))
        .collect();
    let by_column: Vec<Vec<f64>> = (0..names.len())
        .map(|c| watched.iter().map(|w| f64::from(w[c])).collect())
        .collect();
    let profile = ReferenceProfile::from_columns(&names, &by_column, DEFAULT_BINS).unwrap();
    let mut window = DriftWindow::new(profile, 0);
    let bare_times = time_each(&images, |image| run_tract(&bare, &[1, 3, 32, 32], image));
    // The same plan run bare: the normalisation folded into the graph, no checks, no
    // drift accounting (the peer, "bare tract on the same plan").
    let same_plan = plan.runnable().clone();
    let run_same_plan = |image: &[f32]| run_tract(&same_plan, &[1, 3, 32, 32], image);
    let mut run_ours = |image: &[f32]| {
        let prediction = plan.infer(image, &[]).unwrap();
        window
            .observe(&spec.tensor_features(image), Some(prediction.class))
            .unwrap();
    };
    let same_plan_times = time_each(&images, run_same_plan);
    let ours = time_each(&images, &mut run_ours);
    // Paired, image by image: the same plan bare, and edgeloop.
    let paired = time_paired(&images, run_same_plan, &mut run_ours);
    // Images sent channels last ([32, 32, 3]): the same, after a transpose.
    let last_spec = TensorSpec {
        layout: Some(RowLayout::ChannelsLast),
        ..spec.clone()
    };
    let last_plan = Plan::compile_tensor(CNN, &last_spec).expect("edgeloop loads the CNN");
    let ours_last = time_each(&images, |image| {
        let prediction = last_plan.infer(image, &[]).unwrap();
        window
            .observe(&last_spec.tensor_features(image), Some(prediction.class))
            .unwrap();
    });
    println!("tensor inference (compat CNN, 1x3x32x32, single thread, {IMAGES} images)");
    let p50 = percentile(&same_plan_times, 0.5).as_secs_f64();
    for (name, times) in [
        ("bare tract", &bare_times),
        ("bare tract, the same plan", &same_plan_times),
        ("edgeloop normalise+plan+drift", &ours),
        ("edgeloop, sent channels last", &ours_last),
    ] {
        let (t50, t99) = (percentile(times, 0.5), percentile(times, 0.99));
        println!(
            "  {name:<32}  p50 {t50:>10.2?}  p99 {t99:>10.2?}  ({:.3}x the same plan)",
            t50.as_secs_f64() / p50
        );
    }
    print_paired("the same plan", &paired);
}

/// The same window scored by numpy and scipy (`drift_scipy.py`): PSI, JS, KS against the
/// reference data, normed Wasserstein, moments. Skipped, and said so, without them.
fn scipy_peer(
    profile: &ReferenceProfile,
    reference: &[Vec<f64>],
    rows: &[Vec<f32>],
    ours: &edgeloop_shared::drift::WindowStats,
    ours_time: Duration,
) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/drift_scipy.py");
    let have = std::process::Command::new("python3")
        .args(["-c", "import numpy, scipy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("  numpy/scipy peer skipped: `pip install numpy scipy` to run it");
        return;
    }
    let input = tempfile::NamedTempFile::new().unwrap();
    let profile_json: Vec<serde_json::Value> = profile
        .features
        .iter()
        .map(|f| serde_json::json!({"edges": f.edges, "fractions": f.fractions}))
        .collect();
    serde_json::to_writer(
        std::fs::File::create(input.path()).unwrap(),
        &serde_json::json!({"profile": profile_json, "reference": reference, "rows": rows}),
    )
    .unwrap();
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(input.path())
        .arg("20")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (i, f) in ours.features.iter().enumerate() {
        let (psi, js) = (
            peer["psi"][i].as_f64().unwrap(),
            peer["js"][i].as_f64().unwrap(),
        );
        assert!(
            (f.psi - psi).abs() < 1e-6,
            "PSI of {}: {} vs {psi}",
            f.name,
            f.psi
        );
        assert!(
            (f.js - js).abs() < 1e-6,
            "JS of {}: {} vs {js}",
            f.name,
            f.js
        );
    }
    let peer_ms = peer["per_window_ms"].as_f64().unwrap();
    let ours_ms = ours_time.as_secs_f64() * 1e3;
    println!(
        "  numpy/scipy      {peer_ms:>8.2} ms per window (bins, PSI, JS, exact KS and Wasserstein on the raw values, moments)"
    );
    println!(
        "  edgeloop window  {ours_ms:>8.2} ms per window (observe every row, then every score)"
    );
    println!(
        "  ratio edgeloop/scipy: {:.2}x (same PSI and JS to 1e-6)",
        ours_ms / peer_ms
    );
}

/// The textbook computation: keep the values, count them per bin by scanning the edges,
/// then PSI per feature with the same epsilon.
fn naive_psi_max(profile: &ReferenceProfile, rows: &[Vec<f32>]) -> f64 {
    let mut max: f64 = 0.0;
    for (i, f) in profile.features.iter().enumerate() {
        let values: Vec<f64> = rows.iter().map(|r| f64::from(r[i])).collect();
        let mut counts = vec![0u64; f.fractions.len()];
        let last = f.edges.len() - 1;
        for &x in &values {
            let bin = if x < f.edges[0] {
                0
            } else if x > f.edges[last] {
                counts.len() - 1
            } else {
                let mut b = 1;
                while b < last && x >= f.edges[b] {
                    b += 1;
                }
                b
            };
            counts[bin] += 1;
        }
        let n = values.len() as f64;
        let psi: f64 = f
            .fractions
            .iter()
            .zip(&counts)
            .map(|(&e, &c)| {
                let (e, a) = (e.max(PSI_EPSILON), (c as f64 / n).max(PSI_EPSILON));
                (a - e) * (a / e).ln()
            })
            .sum();
        max = max.max(psi);
    }
    max
}
