//! The reservoir's cost per input, measured in one run against two peers: the served
//! model's own inference on the same rows (what the agent already spends per input), and
//! bare SQLite logging every input (one insert per input in its own transaction, WAL,
//! `synchronous = NORMAL`: what keeping inputs without sampling costs).
//!
//! The reservoir samples with a 1 MiB budget (about 13 000 rows of the example model's 4
//! features); the run offers 200 000 inputs, so the first 13 000 fill it (each is kept) and
//! the rest are sampled (each kept with probability capacity / seen).
//!
//! Then images: 20 000 inputs of the compatibility suite's CNN (3×32×32) offered to a
//! reservoir of the agent's default budget (4 MiB, 339 images), against the CNN's own
//! inference, once with every image handed over (a replayed source) and once thinned as the
//! local API hands them over (each with the chance that the sample keeps the next one).
//!
//! Run: `cargo bench -p edgeloop-agent --bench reservoir`

use std::time::{Duration, Instant};

use edgeloop_agent::reservoir::{Offered, Reservoir, SampledModel, SharedChance};
use edgeloop_agent::runtime::Plan;
use edgeloop_shared::bundle::TensorSpec;
use edgeloop_shared::protocol::ModelRef;
use rusqlite::{Connection, params};

const MODEL: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");
const N: usize = 200_000;
const BUDGET: u64 = 1 << 20;

fn rows() -> Vec<[f32; 4]> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..N)
        .map(|_| {
            [
                0.8 + next(),
                2.0 + 6.0 * next(),
                2.5 + 4.0 * next(),
                40.0 + 16.0 * next(),
            ]
        })
        .collect()
}

fn per_input(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let rows = rows();
    let names: Vec<String> = ["rms", "peak", "kurtosis", "temperature"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();

    // Peer 1: inference of the same rows.
    let plan = Plan::compile(MODEL, 4).unwrap();
    let mut predicted = Vec::with_capacity(N);
    let start = Instant::now();
    for row in &rows {
        predicted.push(plan.infer(row, &names).unwrap().class);
    }
    let inference = start.elapsed();

    // Peer 2: bare SQLite keeping every input.
    let conn = Connection::open(dir.path().join("bare.sqlite")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(
        "CREATE TABLE inputs (id INTEGER PRIMARY KEY, seen_ms INTEGER, predicted INTEGER, vals BLOB)",
    )
    .unwrap();
    let start = Instant::now();
    for (i, row) in rows.iter().enumerate() {
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        conn.prepare_cached("INSERT INTO inputs (seen_ms, predicted, vals) VALUES (?1, ?2, ?3)")
            .unwrap()
            .execute(params![i as i64, predicted[i] as i64, bytes])
            .unwrap();
    }
    let bare = start.elapsed();

    // edgeloop's reservoir.
    let model = SampledModel {
        model: ModelRef {
            name: "vibration".into(),
            version: 1,
        },
        features: names.clone(),
        shape: None,
    };
    let mut reservoir = Reservoir::open(&dir.path().join("reservoir.sqlite"), BUDGET).unwrap();
    let mut offer = |i: usize| {
        let input = Offered {
            request_key: None,
            values: &rows[i],
            predicted: Some(predicted[i] as f64),
            label: None,
            seen_ms: i as u64,
            chance: 1.0,
        };
        reservoir.offer(&model, input).unwrap()
    };
    let start = Instant::now();
    offer(0);
    let filled_at = reservoir_capacity(dir.path());
    for i in 1..filled_at {
        offer(i);
    }
    let fill = start.elapsed();
    for i in filled_at..N {
        offer(i);
    }
    let total = start.elapsed();
    let steady = total - fill;
    let status = reservoir.status().unwrap();
    assert_eq!(status.seen, N as u64);
    assert_eq!(status.kept, status.capacity);

    let inference_us = per_input(inference, N);
    let bare_us = per_input(bare, N);
    let total_us = per_input(total, N);
    println!(
        "reservoir: {N} inputs of 4 features, budget {BUDGET} B, capacity {} rows",
        status.capacity
    );
    println!("  inference (peer)               {inference_us:8.2} µs per input");
    println!("  bare SQLite, every input kept  {bare_us:8.2} µs per input");
    println!(
        "  reservoir, filling             {:8.2} µs per input ({filled_at} inputs)",
        per_input(fill, filled_at.max(1))
    );
    println!(
        "  reservoir, sampling            {:8.2} µs per input ({} inputs)",
        per_input(steady, N - filled_at),
        N - filled_at
    );
    println!(
        "  reservoir, whole run           {total_us:8.2} µs per input: {:.2}× inference, {:.2}× bare SQLite",
        total_us / inference_us,
        total_us / bare_us
    );
    images();
}

/// The reservoir's cost per image of a tensor model, handed over always or thinned.
fn images() {
    const CNN: &[u8] = include_bytes!("../tests/compat/cnn.onnx");
    const IMAGES: usize = 20_000;
    const BUDGET: u64 = 4 << 20;
    // A hundred distinct images, cycled: what is kept costs the same whatever it shows.
    let images: Vec<Vec<f32>> = (0..100)
        .map(|seed| {
            edgeloop_shared::pseudo_random_bytes(3 * 32 * 32, seed)
                .into_iter()
                .map(|b| f32::from(b) / 255.0)
                .collect()
        })
        .collect();
    let spec = TensorSpec::f32_tensor("image", &[3, 32, 32]);
    let plan = Plan::compile_tensor(CNN, &spec).unwrap();
    let start = Instant::now();
    let predicted: Vec<usize> = (0..IMAGES)
        .map(|i| plan.infer(&images[i % 100], &[]).unwrap().class)
        .collect();
    let inference_us = per_input(start.elapsed(), IMAGES);
    let model = SampledModel {
        model: ModelRef {
            name: "camera".into(),
            version: 1,
        },
        features: vec!["image".into()],
        shape: Some(vec![3, 32, 32]),
    };
    let dir = tempfile::tempdir().unwrap();
    let input = |i: usize, chance: f64| Offered {
        request_key: None,
        values: &images[i % 100],
        predicted: Some(predicted[i] as f64),
        label: None,
        seen_ms: i as u64,
        chance,
    };
    // Every image handed over, as a replayed source does.
    let mut every = Reservoir::open(&dir.path().join("every.sqlite"), BUDGET).unwrap();
    let start = Instant::now();
    for i in 0..IMAGES {
        every.offer(&model, input(i, 1.0)).unwrap();
    }
    every.flush().unwrap();
    let every_us = per_input(start.elapsed(), IMAGES);
    // Thinned as the API does: the draw happens on the API's side, the offer on the loop's.
    let mut thinned = Reservoir::open(&dir.path().join("thinned.sqlite"), BUDGET).unwrap();
    let chance = SharedChance::default();
    let mut handed = 0;
    let start = Instant::now();
    for i in 0..IMAGES {
        match chance.draw() {
            Some(c) => {
                handed += 1;
                thinned.offer(&model, input(i, c)).unwrap();
            }
            None => thinned.pass(&model).unwrap(),
        }
        chance.set(thinned.chance(&model.model));
    }
    thinned.flush().unwrap();
    let thinned_us = per_input(start.elapsed(), IMAGES);
    let status = thinned.status().unwrap();
    assert_eq!((status.seen, status.kept), (IMAGES as u64, status.capacity));
    println!(
        "reservoir: {IMAGES} images of 3x32x32, budget {BUDGET} B, capacity {} images",
        status.capacity
    );
    println!("  CNN inference (peer)           {inference_us:8.2} µs per image");
    println!(
        "  reservoir, every image handed  {every_us:8.2} µs per image: {:.3}× inference",
        every_us / inference_us
    );
    println!(
        "  reservoir, thinned as the API  {thinned_us:8.2} µs per image: {:.3}× inference; \
         {handed} of {IMAGES} images handed over ({:.1} MB instead of {:.1} MB)",
        thinned_us / inference_us,
        handed as f64 * 12288.0 / 1e6,
        IMAGES as f64 * 12288.0 / 1e6
    );
}

/// The capacity the reservoir chose, read from its own file.
fn reservoir_capacity(dir: &std::path::Path) -> usize {
    let conn = Connection::open(dir.join("reservoir.sqlite")).unwrap();
    conn.query_row("SELECT capacity FROM reservoir_state", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as usize
}
