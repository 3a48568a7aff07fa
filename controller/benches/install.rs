//! Verify + install + smoke time per MB of model, against the bare work in the same run.
//!
//! For models of 1, 4 and 16 MiB of weights (a 4-input MLP with one wide hidden layer and
//! random weights, so that zstd cannot shrink them), published through the registry as
//! any model is:
//!
//! - edgeloop: `bundle::verify` (signature, SHA-256, bounded zstd decompression), then
//!   `Installer::install`: write the inactive slot and fsync, read it back and verify it
//!   again, load and optimize with tract, run the golden vectors, switch the slot
//!   atomically;
//! - the peer, the least any installer must do: SHA-256 of the bundle once, write it to a
//!   file and fsync, load and optimize the ONNX with tract once.
//!
//! Run: `cargo bench -p edgeloop-controller --bench install`.

use std::time::{Duration, Instant};

use edgeloop_agent::runtime::Plan;
use edgeloop_agent::slots::Slots;
use edgeloop_agent::trust::SigningKeys;
use edgeloop_agent::updater::Installer;
use edgeloop_controller::registry::{self, ArtifactStore, PublishRequest};
use edgeloop_controller::store::SqliteStore;
use edgeloop_controller::trainer::random_mlp;
use edgeloop_shared::bundle::{self, Limits};
use edgeloop_shared::signing::TrustedKeys;
use sha2::{Digest, Sha256};
use std::io::Write as _;

const FEATURES: i64 = 4;
const CLASSES: i64 = 2;
const RUNS: usize = 3;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = edgeloop_controller::keys::generate().unwrap();
    let store = SqliteStore::open(&dir.path().join("registry.sqlite")).unwrap();
    let artifacts = ArtifactStore::new(dir.path().join("artifacts"));
    let reference = dir.path().join("reference.csv");
    std::fs::write(&reference, edgeloop_controller::demo::REFERENCE_V1).unwrap();
    let trusted = TrustedKeys::new([key.public().clone()]);

    println!(
        "{:>9} {:>9} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "weights", "bundle", "verify", "install", "per MiB", "peer per MiB", "ratio"
    );
    for (version, mib) in [1u64, 4, 16].into_iter().enumerate() {
        let onnx = random_mlp(FEATURES, CLASSES, (mib as usize) << 20);
        let row = registry::publish(
            &store,
            &artifacts,
            &key,
            PublishRequest::new("bench", version as u64 + 1, &onnx, &reference),
        )
        .await
        .unwrap();
        let bytes =
            std::fs::read(artifacts.path("bench", row.version, &row.bundle_sha256)).unwrap();
        let megabytes = onnx.len() as f64 / f64::from(1 << 20);

        let (mut verify, mut install, mut peer) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            let slots_dir = dir.path().join(format!("agent-{mib}-{run}"));
            let installer = Installer::new(
                SigningKeys::new(trusted.clone()),
                "http://127.0.0.1:1",
                1 << 30,
                Slots::open(&slots_dir).unwrap(),
                slots_dir.join("downloads"),
            );
            let start = Instant::now();
            let verified = bundle::verify(&bytes, &trusted, &Limits::default()).unwrap();
            verify.push(start.elapsed());
            let start = Instant::now();
            installer.install(&bytes, &verified, None).unwrap();
            install.push(start.elapsed());

            let start = Instant::now();
            let digest = Sha256::digest(&bytes);
            std::hint::black_box(digest);
            let path = slots_dir.join("peer.bin");
            let mut file = std::fs::File::create(&path).unwrap();
            file.write_all(&bytes).unwrap();
            file.sync_all().unwrap();
            let plan = Plan::compile(&onnx, FEATURES as usize).unwrap();
            std::hint::black_box(plan);
            peer.push(start.elapsed());
        }
        let (verify, install, peer) = (median(verify), median(install), median(peer));
        let total = verify + install;
        println!(
            "{:>7.1} MiB {:>5.1} MiB {:>9.1} ms {:>9.1} ms {:>9.1} ms {:>9.1} ms {:>7.2}x",
            megabytes,
            bytes.len() as f64 / f64::from(1 << 20),
            verify.as_secs_f64() * 1e3,
            install.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3 / megabytes,
            peer.as_secs_f64() * 1e3 / megabytes,
            total.as_secs_f64() / peer.as_secs_f64()
        );
    }
}
