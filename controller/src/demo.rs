//! `edgeloop demo`: the whole loop on one machine, on embedded defaults.
//!
//! One process runs the controller with its embedded broker and SQLite store, and N
//! simulated devices that are the real agent code. The demo publishes the example model
//! v1 and rolls it out, lets the devices stream drift summaries, shifts every sensor's
//! distribution halfway through so drift rises, then publishes v2 (trained on the shifted
//! regime) and rolls it out, after which drift falls again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeloop_agent::AgentConfig;
use edgeloop_agent::sim::Fleet;
use edgeloop_agent::{now_ms, source::ShiftControl};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::with_presence;
use crate::config::ControllerConfig;
use crate::registry::PublishRequest;
use crate::server::Controller;
use crate::store::{ModelRow, RolloutRow};

pub const MODEL_NAME: &str = "vibration";
pub const CLASS_LABELS: [&str; 2] = ["normal", "fault"];
pub const MODEL_V1: &[u8] = include_bytes!("../assets/vibration/model_v1.onnx");
pub const MODEL_V2: &[u8] = include_bytes!("../assets/vibration/model_v2.onnx");
pub const REFERENCE_V1: &str = include_str!("../assets/vibration/reference_v1.csv");
pub const REFERENCE_V2: &str = include_str!("../assets/vibration/reference_v2.csv");

/// The schedule used when the demo runs until Ctrl-C.
const OPEN_ENDED_SCHEDULE: Duration = Duration::from_secs(60);
pub const MIN_DURATION: Duration = Duration::from_secs(15);
/// How often the demo checks whether the next phase is due.
const PHASE_CHECK: Duration = Duration::from_millis(250);
/// Inputs per second on each simulated device.
const RATE_HZ: f64 = 50.0;

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
    V2RolledOut,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Starting => "starting devices",
            Phase::V1RolledOut => "model v1 rolled out; devices stream drift summaries",
            Phase::ShiftInjected => "covariate shift injected: machines run hotter and louder",
            Phase::V2RolledOut => "model v2 (trained on the shifted regime) rolled out",
        }
    }
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

    let schedule = options.duration.unwrap_or(OPEN_ENDED_SCHEDULE);
    let mut template = AgentConfig {
        broker_url: controller.mqtt_url.clone(),
        controller_url: controller.http_url(),
        trusted_keys: vec![controller.signing_key().public().to_text()],
        heartbeat_interval_s: 2,
        // About six windows per run: large enough for a steady PSI (its noise floor is
        // roughly bins / samples), small enough to see v2's first figure before the end.
        drift_window_samples: ((RATE_HZ * schedule.as_secs_f64() / 6.0) as u64).clamp(100, 1000),
        ..AgentConfig::default()
    };
    template.source.rate_hz = RATE_HZ;
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
        schedule,
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

#[allow(clippy::too_many_arguments)]
async fn drive(
    controller: &Controller,
    options: &DemoOptions,
    shift: &ShiftControl,
    schedule: Duration,
    started: Instant,
    data_dir: &Path,
    shutdown: &CancellationToken,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut phase = Phase::Starting;
    let mut status = tokio::time::interval(
        (schedule / 12).clamp(Duration::from_secs(2), Duration::from_secs(5)),
    );
    loop {
        let elapsed = started.elapsed();
        if options.duration.is_some_and(|d| elapsed >= d) {
            return Ok(());
        }
        match phase {
            Phase::Starting => {
                let known = controller.store.devices().await?.len();
                if known >= options.devices || elapsed > schedule / 4 {
                    publish(controller, 1, REFERENCE_V1, MODEL_V1, data_dir).await?;
                    controller.rollout(MODEL_NAME, 1, None).await?;
                    phase = Phase::V1RolledOut;
                    writeln!(out, "[{:>3}s] {}", elapsed.as_secs(), phase.describe())?;
                }
            }
            Phase::V1RolledOut if elapsed >= schedule.mul_f64(0.45) => {
                shift.set(1.0);
                phase = Phase::ShiftInjected;
                writeln!(out, "[{:>3}s] {}", elapsed.as_secs(), phase.describe())?;
            }
            Phase::ShiftInjected if elapsed >= schedule.mul_f64(0.6) => {
                publish(controller, 2, REFERENCE_V2, MODEL_V2, data_dir).await?;
                controller.rollout(MODEL_NAME, 2, None).await?;
                phase = Phase::V2RolledOut;
                writeln!(out, "[{:>3}s] {}", elapsed.as_secs(), phase.describe())?;
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
            name: MODEL_NAME,
            version,
            label: Some(format!("example vibration classifier v{version}")),
            onnx,
            reference_csv: &path,
            label_column: None,
            class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
            created_ms: now_ms(),
            requirements: Default::default(),
            lineage: None,
            gate: None,
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
    })
}
