//! `edgeloop demo`: the whole loop on one machine, on embedded defaults.
//!
//! One process runs the controller with its embedded broker and SQLite store, and N
//! simulated devices that are the real agent code. The demo publishes the example model
//! v1 and rolls it out, lets the devices stream drift summaries, then shifts every sensor's
//! distribution (the machines run hotter and louder). From there the loop runs by itself:
//! the retraining policy sees the drift and fires, the built-in trainer fits a new model to
//! labelled data from the new regime, the quality gate compares it with v1 on a holdout,
//! and the candidate rolls out in waves, after which drift falls again.
//!
//! The labelled data stands in for what a fleet's owner collects after a shift (inspection
//! results, maintenance logs): the demo draws it from the simulator's ground truth at the
//! moment of the shift.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeloop_agent::AgentConfig;
use edgeloop_agent::sim::Fleet;
use edgeloop_agent::source::VibrationGenerator;
use edgeloop_agent::{now_ms, source::ShiftControl};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::with_presence;
use crate::config::ControllerConfig;
use crate::registry::PublishRequest;
use crate::retrain::RetrainingPolicy;
use crate::server::Controller;
use crate::store::{ModelRow, RetrainingRow, RetrainingStatus, RolloutRow};

pub const MODEL_NAME: &str = "vibration";
pub const CLASS_LABELS: [&str; 2] = ["normal", "fault"];
pub const MODEL_V1: &[u8] = include_bytes!("../assets/vibration/model_v1.onnx");
pub const MODEL_V2: &[u8] = include_bytes!("../assets/vibration/model_v2.onnx");
pub const REFERENCE_V1: &str = include_str!("../assets/vibration/reference_v1.csv");
pub const REFERENCE_V2: &str = include_str!("../assets/vibration/reference_v2.csv");

/// Long enough for the whole loop on a small fleet: v1, the shift, detection, training,
/// the gate and three waves of health windows.
pub const MIN_DURATION: Duration = Duration::from_secs(30);
/// How often the demo checks whether the next phase is due.
const PHASE_CHECK: Duration = Duration::from_millis(250);
/// Inputs per second on each simulated device.
const RATE_HZ: f64 = 100.0;
/// Inputs per drift window: a window every 2 s, PSI noise well under the policy's 0.25.
const WINDOW: u64 = 200;
/// v1 windows streamed before the shift.
const WINDOWS_BEFORE_SHIFT: u32 = 3;
/// The devices' health window for a new model, short for the demo (default 300 s).
const HEALTH_WINDOW_S: u64 = 2;
/// Labelled rows the built-in trainer fits, and rows the quality gate holds out.
const FIELD_ROWS: usize = 3000;
const HOLDOUT_ROWS: usize = 600;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub duration: Option<Duration>,
    pub http_addr: std::net::SocketAddr,
    /// Where to keep the database, artifacts and device state; a temporary directory if none.
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct DemoDevice {
    pub id: String,
    pub online: bool,
    pub model_version: Option<u64>,
    pub last_psi_max: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub devices: Vec<DemoDevice>,
    pub models: Vec<ModelRow>,
    pub rollouts: Vec<RolloutRow>,
    /// What the retraining policy fired: the trigger's reason, the gate's verdict, the
    /// candidate and its rollout.
    pub retrainings: Vec<RetrainingRow>,
}

impl DemoReport {
    /// True when every simulated device is online on `version` and has a drift figure.
    pub fn converged(&self, version: u64, devices: usize) -> bool {
        self.devices.len() == devices
            && self
                .devices
                .iter()
                .all(|d| d.online && d.model_version == Some(version) && d.last_psi_max.is_some())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Starting,
    V1RolledOut,
    ShiftInjected,
    RetrainingFired,
    CandidateRollingOut,
    Recovered,
    /// The retraining ended without shipping (the gate refused, or the rollout failed).
    Stuck,
}

/// The retraining policy the demo's controller runs: the built-in trainer on the field
/// data, gated on the holdout, three waves.
fn policy(devices: usize, data_dir: &Path) -> RetrainingPolicy {
    let text = format!(
        r#"
model = "{MODEL_NAME}"
psi_threshold = 0.25
consecutive_windows = 2
min_devices = {}
min_share = 0.5
candidate_timeout_s = 600
dataset = "{}"
holdout = "{}"
gate = {{ metric = "accuracy", tolerance = 0.01, parity = 0.8, segments = {{ buckets = {{ feature = "temperature", buckets = 4 }} }} }}
rollout = {{ waves = ["1", "50%", "100%"], failure_threshold = 0.5 }}
trainer = {{ kind = "builtin", label_column = "label" }}
"#,
        devices.div_ceil(2),
        data_dir.join("field-data.csv").display(),
        data_dir.join("holdout.csv").display(),
    );
    toml::from_str(&text).expect("the demo's policy parses")
}

/// Writes `rows` labelled rows of the machines' current regime, as the field would label
/// them after the shift.
fn write_labelled(
    path: &Path,
    shift: &ShiftControl,
    seed: u64,
    rows: usize,
) -> std::io::Result<()> {
    let mut generator = VibrationGenerator::new(seed, shift.clone());
    let mut csv = String::from("rms,peak,kurtosis,temperature,label\n");
    for _ in 0..rows {
        let (row, label) = generator.labelled_row();
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        csv.push_str(&format!("{},{label}\n", cells.join(",")));
    }
    std::fs::write(path, csv)
}

/// Runs the demo; returns the final report. Progress goes to `out`.
pub async fn run(
    options: DemoOptions,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> anyhow::Result<DemoReport> {
    let temp;
    let data_dir = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("edgeloop-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let key = crate::keys::generate()?;
    let config = ControllerConfig {
        data_dir: data_dir.clone(),
        http_addr: options.http_addr,
        mqtt_listen: "127.0.0.1:0".parse().expect("valid address"),
        mqtt_url: String::new(),
        offline_after_s: 10,
        resend_after_s: 10,
        retraining_check_s: 1,
        retraining: vec![policy(options.devices, &data_dir)],
        ..ControllerConfig::default()
    };
    let controller = Controller::start(config, key, shutdown.child_token()).await?;
    writeln!(
        out,
        "edgeloop demo: controller on {} (dashboard), embedded broker on {}, data in {}",
        controller.http_url(),
        controller.mqtt_url,
        data_dir.display()
    )?;

    let mut template = AgentConfig {
        broker_url: controller.mqtt_url.clone(),
        controller_url: controller.http_url(),
        trusted_keys: vec![controller.signing_key().public().to_text()],
        heartbeat_interval_s: 2,
        drift_window_samples: WINDOW,
        ..AgentConfig::default()
    };
    template.source.rate_hz = RATE_HZ;
    template.health.window_s = HEALTH_WINDOW_S;
    let fleet = Fleet::spawn(
        &template,
        options.devices,
        "sim",
        &data_dir.join("devices"),
        &shutdown,
    )?;
    let shift = fleet.shift.clone();

    let started = Instant::now();
    let result = drive(
        &controller,
        &options,
        &shift,
        started,
        &data_dir,
        &shutdown,
        out,
    )
    .await;
    let report = report(&controller).await;
    shutdown.cancel();
    fleet.join().await;
    controller.stop().await;
    result?;
    report
}

async fn drive(
    controller: &Controller,
    options: &DemoOptions,
    shift: &ShiftControl,
    started: Instant,
    data_dir: &Path,
    shutdown: &CancellationToken,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut phase = Phase::Starting;
    let mut v1_at = Instant::now();
    let mut status = tokio::time::interval(Duration::from_secs(3));
    let window = Duration::from_secs_f64(WINDOW as f64 / RATE_HZ);
    loop {
        let elapsed = started.elapsed();
        if options.duration.is_some_and(|d| elapsed >= d) {
            return Ok(());
        }
        let mut say = |what: String| writeln!(out, "[{:>3}s] {what}", elapsed.as_secs());
        match phase {
            Phase::Starting => {
                let known = controller.store.devices().await?.len();
                if known >= options.devices || elapsed > Duration::from_secs(10) {
                    publish(controller, 1, REFERENCE_V1, MODEL_V1, data_dir).await?;
                    controller.rollout(MODEL_NAME, 1, None).await?;
                    v1_at = Instant::now();
                    phase = Phase::V1RolledOut;
                    say("model v1 rolled out; devices stream drift summaries".into())?;
                }
            }
            Phase::V1RolledOut if v1_at.elapsed() >= window * WINDOWS_BEFORE_SHIFT => {
                // The owner's labelled data from the new regime: what the trainer fits and
                // the gate holds out.
                let shifted = ShiftControl::default();
                shifted.set(1.0);
                write_labelled(&data_dir.join("field-data.csv"), &shifted, 101, FIELD_ROWS)?;
                write_labelled(&data_dir.join("holdout.csv"), &shifted, 202, HOLDOUT_ROWS)?;
                shift.set(1.0);
                phase = Phase::ShiftInjected;
                say("covariate shift injected: machines run hotter and louder".into())?;
            }
            Phase::ShiftInjected | Phase::RetrainingFired | Phase::CandidateRollingOut => {
                if let Some(r) = controller.store.retrainings(1).await?.into_iter().next() {
                    let next = match r.status {
                        RetrainingStatus::Training => Phase::RetrainingFired,
                        RetrainingStatus::RollingOut => Phase::CandidateRollingOut,
                        RetrainingStatus::Completed => Phase::Recovered,
                        RetrainingStatus::Rejected | RetrainingStatus::Failed => Phase::Stuck,
                    };
                    if next > phase && phase < Phase::RetrainingFired {
                        say(format!("retraining {} fired: {}", r.id, r.reason))?;
                    }
                    if next >= Phase::CandidateRollingOut && phase < Phase::CandidateRollingOut {
                        say(format!(
                            "built-in trainer fitted v{}; quality gate {}; rolling out in waves (rollout {})",
                            r.candidate_version.unwrap_or(0),
                            r.gate.as_deref().unwrap_or("?"),
                            r.rollout_id.unwrap_or(0)
                        ))?;
                    }
                    if next == Phase::Recovered {
                        say(format!(
                            "every device committed v{}: the loop closed with no operator; drift falls",
                            r.candidate_version.unwrap_or(0)
                        ))?;
                    }
                    if next == Phase::Stuck {
                        say(format!(
                            "retraining {} ended {}: {}",
                            r.id,
                            r.status.as_str(),
                            r.detail.as_deref().unwrap_or("")
                        ))?;
                    }
                    phase = next;
                }
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = status.tick() => print_status(controller, started, out).await?,
            _ = tokio::time::sleep(PHASE_CHECK) => {}
        }
    }
}

async fn publish(
    controller: &Controller,
    version: u64,
    reference: &str,
    onnx: &[u8],
    data_dir: &Path,
) -> anyhow::Result<()> {
    let path = data_dir.join(format!("reference_v{version}.csv"));
    std::fs::write(&path, reference)?;
    let row = controller
        .publish(PublishRequest {
            label: Some(format!("example vibration classifier v{version}")),
            class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
            ..PublishRequest::new(MODEL_NAME, version, onnx, &path)
        })
        .await?;
    tracing::info!(model = %row.name, version = row.version, sha256 = %row.bundle_sha256, "published");
    Ok(())
}

async fn print_status(
    controller: &Controller,
    started: Instant,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let now = now_ms();
    let offline_after = Duration::from_secs(controller.config.offline_after_s);
    for device in controller.store.devices().await? {
        let d = with_presence(device, offline_after, now);
        let model = match (&d.model_name, d.model_version) {
            (Some(name), Some(version)) => format!("{name} v{version}"),
            _ => "no model".to_string(),
        };
        let psi = d
            .last_psi_max
            .map_or("–".to_string(), |p| format!("{p:.3}"));
        let flag = match d.last_psi_max {
            Some(p) if p >= edgeloop_shared::drift::PSI_ALERT => " DRIFT",
            Some(p) if p >= edgeloop_shared::drift::PSI_WARN => " drift?",
            _ => "",
        };
        writeln!(
            out,
            "[{:>3}s] {:<8} {:<7} {:<13} psi_max {:>6}{:<7} inferences {:>6} errors {}",
            started.elapsed().as_secs(),
            d.id,
            if d.online { "online" } else { "offline" },
            model,
            psi,
            flag,
            d.inferences,
            d.errors
        )?;
    }
    out.flush()?;
    Ok(())
}

async fn report(controller: &Controller) -> anyhow::Result<DemoReport> {
    let now = now_ms();
    let offline_after = Duration::from_secs(controller.config.offline_after_s);
    let devices = controller
        .store
        .devices()
        .await?
        .into_iter()
        .map(|d| {
            let d = with_presence(d, offline_after, now);
            DemoDevice {
                id: d.id,
                online: d.online,
                model_version: d.model_version,
                last_psi_max: d.last_psi_max,
            }
        })
        .collect();
    Ok(DemoReport {
        devices,
        models: controller.store.models().await?,
        rollouts: controller.store.rollouts().await?,
        retrainings: controller.store.retrainings(100).await?,
    })
}
