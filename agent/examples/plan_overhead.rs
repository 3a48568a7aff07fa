//! What `Plan::infer` adds to a bare tract run of the same optimized model, counted where a
//! clock cannot see it: run each under cachegrind and compare the totals (the model's load
//! is the same in both).
//!
//! ```sh
//! cargo build --release -p edgeloop-agent --example plan_overhead
//! for w in bare plan; do
//!   valgrind --tool=cachegrind --cache-sim=yes target/release/examples/plan_overhead $w 20000
//! done
//! ```
//!
//! Without valgrind it prints the mean time per row (a bulk loop, noisier than the paired
//! measure of `benches/inference.rs`).

use std::hint::black_box;

use edgeloop_agent::runtime::Plan;
use tract_onnx::prelude::*;

const MODEL: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "plan".into());
    let n: usize = args
        .next()
        .map_or(2_000_000, |s| s.parse().expect("a count"));
    let plan = Plan::compile(MODEL, 4).expect("the example model loads");
    let model = plan.runnable().clone();
    let names: Vec<String> = ["rms", "peak", "kurtosis", "temperature"]
        .map(String::from)
        .to_vec();
    let rows: Vec<[f32; 4]> = (0..1000)
        .map(|i| [1.0 + i as f32 * 0.001, 4.0, 3.0, 45.0])
        .collect();
    let start = std::time::Instant::now();
    for i in 0..n {
        let row = &rows[i % rows.len()];
        match which.as_str() {
            "bare" => {
                let input = Tensor::from_shape(&[1, 4], row).expect("a 1x4 tensor");
                black_box(model.run(tvec!(input.into())).expect("tract runs"));
            }
            _ => {
                black_box(plan.infer(row, &names).expect("the plan runs"));
            }
        }
    }
    println!(
        "{which}: {:.3} µs per row",
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
