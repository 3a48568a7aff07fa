//! The agent actor: one `select!` loop over input ticks, heartbeats, incoming commands and
//! finished installs. It owns the served model and the drift window; the MQTT link and the
//! install task run beside it and talk to it through channels.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeloop_shared::bundle::{BundleError, VerifiedBundle};
use edgeloop_shared::command::{
    CommandAction, CommandError, DeltaOffer, DeployAction, Disposition, SignedCommand, UploadAction,
};
use edgeloop_shared::drift::{DriftWindow, Target};
use edgeloop_shared::protocol::{
    DeployStage, DeviceStatus, DriftSummary, Envelope, MAX_MESSAGE_BYTES, Message, ModelRef,
    OutboxStatus, SampleChunk,
};
use edgeloop_shared::topics::Channel;
use edgeloop_shared::trust::SignedTrust;
use rumqttc::Publish;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{Observation, ServedModel};
use crate::config::AgentConfig;
use crate::config::Compression;
use crate::health::ServiceRecord;
use crate::link::{BrokerAddr, LastWillFn, Link, LinkConfig, Packing};
use crate::outbox::{Outbox, OutboxError, SqliteOutbox};
use crate::report::Reporter;
use crate::reservoir::{Offered, Reservoir, SampledModel};
use crate::runtime::RuntimeError;
use crate::slots::{SlotError, Slots, write_atomic};
use crate::source::InputSource;
use crate::trust::Trust;
use crate::updater::{InstallError, Installed, Installer, Remote};
use crate::{AGENT_VERSION, now_ms};

/// Capacity of the channel from the link to the agent (incoming commands).
const INCOMING_CAPACITY: usize = 16;
/// Capacity of the channel from install tasks to the agent; one install runs at a time.
const INSTALL_CAPACITY: usize = 1;
/// Inputs inferred by the local API waiting to be counted into the drift window.
const OBSERVED_CAPACITY: usize = 4096;
/// How often the sample's batched writes are flushed: the most the reservoir's file lags
/// the inputs the agent kept.
const SAMPLE_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustLoadError),
    #[error("cannot listen on {addr} for the local inference API: {source}")]
    Api {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Counters reported in every heartbeat.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    inferences: u64,
    errors: u64,
    malformed_messages: u64,
}

/// What the model made of one input.
struct Predicted {
    /// Its class, or a regression's value.
    target: Target,
    /// A classifier's top score, as a probability (`None` for a regression).
    confidence: Option<f64>,
    latency_ms: f64,
}

/// The model being served with its drift window.
struct Serving {
    installed: Installed,
    window: DriftWindow,
    window_seq: u64,
    /// For each model feature, its column in the source; or why the source cannot feed it.
    columns: Result<Vec<usize>, String>,
    /// Its latency and labelled accuracy since it began serving: the baseline a model
    /// installed after it is judged against.
    record: ServiceRecord,
    /// What its inputs are kept in the sample as.
    sampled: SampledModel,
}

impl Serving {
    fn new(installed: Installed, source: &SourceLayout) -> Self {
        let reference = installed.model.manifest.reference.clone();
        let model = &installed.model;
        let columns = match (model.is_tensor(), &source.row_shape) {
            (true, shape) => tensor_columns(model.plan.row_shape(), shape.as_deref()),
            (false, Some(shape)) => Err(format!(
                "the input source gives tensors of shape {shape:?}; the model takes rows of \
                 features"
            )),
            (false, None) => map_columns(model.feature_names(), &source.columns),
        };
        // A source without columns or tensors (`api`) feeds no model: nothing to warn about.
        if let Err(reason) = &columns
            && !(source.columns.is_empty() && source.row_shape.is_none())
        {
            warn!(model = %installed.model.manifest.model_ref(), %reason, "inputs cannot feed this model");
        }
        let sampled = SampledModel {
            model: model.manifest.model_ref(),
            features: if model.is_tensor() {
                model
                    .manifest
                    .inputs
                    .iter()
                    .map(|i| i.name.clone())
                    .collect()
            } else {
                model.feature_names().to_vec()
            },
            shape: model.is_tensor().then(|| model.plan.row_shape().to_vec()),
        };
        Serving {
            sampled,
            window: DriftWindow::with_policy(
                reference,
                installed.model.manifest.drift.unwrap_or_default(),
                now_ms(),
            ),
            window_seq: 0,
            columns,
            installed,
            record: ServiceRecord::default(),
        }
    }

    fn model_ref(&self) -> ModelRef {
        self.installed.model.manifest.model_ref()
    }

    /// A ground-truth label for one of its predictions, counted into its drift window, its
    /// record and the health window's record of it when one runs.
    fn observe_label(&mut self, label: Target, predicted: Target, watch: Option<&mut Watch>) {
        match (label, predicted) {
            (Target::Class(label), Target::Class(predicted)) => {
                self.window.observe_label(label, predicted);
                self.record.observe_label(label, predicted);
                if let Some(watch) = watch {
                    watch.observed.observe_label(label, predicted);
                }
            }
            (Target::Value(truth), Target::Value(predicted)) => {
                self.window.observe_residual(predicted, truth);
                self.record.observe_residual(predicted, truth);
                if let Some(watch) = watch {
                    watch.observed.observe_residual(predicted, truth);
                }
            }
            // A class label for a value or the reverse: a source's labels of another kind
            // of model.
            _ => {}
        }
    }
}

/// A source's ground truth for the served model, `None` when it is of another kind of
/// model: a regression takes a number as its true value; a classifier takes a class, or a
/// number that is one of its class indices.
fn source_label(label: Target, regression: bool, classes: usize) -> Result<Option<Target>, String> {
    let class = match (label, regression) {
        (Target::Value(value), true) => return Ok(Some(Target::Value(value))),
        // The machine's condition says nothing of a value.
        (Target::Class(_), true) => return Ok(None),
        (Target::Class(class), false) => Some(class),
        (Target::Value(value), false) => {
            (value >= 0.0 && value.fract() == 0.0).then_some(value as usize)
        }
    };
    match class {
        Some(c) if c < classes => Ok(Some(Target::Class(c))),
        _ => Err(format!(
            "label {} is not a class index of a model of {classes} classes",
            label.number()
        )),
    }
}

/// The highest command sequence this device accepted, from its state file: none when the
/// file does not exist; an error when it cannot be read or parsed.
fn read_last_seq(path: &std::path::Path) -> Result<Option<u64>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|e| {
            format!(
                "{} does not hold a sequence number ({e}); an operator may remove it",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// What an input source gives: rows of named columns, or tensors of a shape.
struct SourceLayout {
    columns: Vec<String>,
    row_shape: Option<Vec<usize>>,
}

/// Which numbers of a source's tensor feed a tensor model: all of them, in order, when
/// the shapes agree.
fn tensor_columns(model: &[usize], source: Option<&[usize]>) -> Result<Vec<usize>, String> {
    match source {
        Some(shape) if shape == model => Ok((0..model.iter().product()).collect()),
        Some(shape) => Err(format!(
            "the input source gives tensors of shape {shape:?}; the model takes {model:?}"
        )),
        None => Err(format!(
            "a model of tensor input {model:?} is fed by the local inference API or an npy \
             source of such tensors"
        )),
    }
}

/// Which source column feeds each model feature, by name.
fn map_columns(features: &[String], columns: &[String]) -> Result<Vec<usize>, String> {
    features
        .iter()
        .map(|f| {
            columns
                .iter()
                .position(|c| c == f)
                .ok_or_else(|| format!("the input source has no column `{f}`"))
        })
        .collect()
}

/// A finished install task.
struct InstallOutcome {
    seq: u64,
    action: DeployAction,
    rollback: bool,
    result: Result<Installed, InstallError>,
}

/// The on-device agent. Build it from a config and an input source, then `run` it.
pub struct Agent {
    config: AgentConfig,
    source: Box<dyn InputSource>,
}

impl Agent {
    pub fn new(config: AgentConfig, source: Box<dyn InputSource>) -> Result<Self, AgentError> {
        config.validate()?;
        Ok(Agent { config, source })
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let config = self.config;
        let state_dir = config.state_dir.clone();
        std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let trust = Trust::load(&state_dir, &config.root_keys, &config.trusted_keys)?;
        if trust.signing().get().is_empty() {
            warn!("no trusted keys: every bundle and command will be refused");
        }
        if trust.version() > 0 {
            info!(version = trust.version(), "trust document in force");
        }
        // Enrollment goes on beside everything else (see `enroll`).
        tokio::spawn({
            let (config, shutdown) = (config.clone(), shutdown.child_token());
            async move {
                if let Err(e) = crate::enroll::run(config, shutdown).await {
                    tracing::error!(error = %e, "enrollment stopped");
                }
            }
        });
        let outbox = Outbox::new(
            SqliteOutbox::open(&state_dir.join("outbox.sqlite"))?,
            config.outbox.budget_bytes,
        );
        let topics = config.topics();
        let reporter = Reporter::new(
            &config.device_id,
            topics.clone(),
            outbox.clone(),
            config.batching.format,
        );
        let slots = Slots::open(&state_dir)?;
        count_restart(
            &state_dir.join(HEALTH_FILE),
            &slots,
            config.health.max_restarts,
        );
        let installer = Installer::new(
            trust.signing().clone(),
            &config.controller_url,
            config.max_bundle_bytes,
            slots.clone(),
            state_dir.join("downloads"),
        )
        .on_board(&config.board)
        .with_transfer(
            config.bundle_transfer,
            crate::transfer::Pieces::new({
                let reporter = reporter.clone();
                Arc::new(move |request| reporter.bundle_request(request))
            }),
        );
        let booted = tokio::task::spawn_blocking({
            let installer = installer.clone();
            move || installer.boot()
        })
        .await
        .unwrap_or(None);
        let seq_path = state_dir.join("command_seq");
        let last_seq = read_last_seq(&seq_path);
        if let Err(reason) = &last_seq {
            warn!(%reason, "replay protection state unreadable: every command will be refused");
        }

        let broker = BrokerAddr::parse(&config.broker_url).expect("validated");
        let tls =
            if broker.tls {
                let tls = config.tls.client_config().map_err(|e| {
                    crate::config::ConfigError::Invalid {
                        key: "tls",
                        reason: e.to_string(),
                    }
                })?;
                Some(tls)
            } else {
                None
            };
        // The API first: a port that cannot be bound stops the agent before it connects.
        let served = ServedModel::default();
        served.set(booted.as_ref().map(|i| i.model.clone()));
        let (observed_tx, observed) = mpsc::channel(OBSERVED_CAPACITY);
        if let Some(addr) = config.api.addr().expect("validated") {
            crate::api::serve(
                addr,
                served.clone(),
                observed_tx,
                config.api.limits(),
                shutdown.child_token(),
            )
            .await
            .map_err(|source| AgentError::Api { addr, source })?;
        }

        let (incoming_tx, incoming) = mpsc::channel(INCOMING_CAPACITY);
        let will_reporter = reporter.clone();
        let last_will: LastWillFn = Arc::new(move || {
            // The will knows nothing of the moment it is published: presence only.
            let offline = will_reporter.envelope(Message::Status(DeviceStatus {
                online: false,
                agent_version: AGENT_VERSION.to_string(),
                ..DeviceStatus::default()
            }));
            (will_reporter.topic(Channel::Status), offline.encode())
        });
        let link = Link::new(
            LinkConfig {
                client_id: config.device_id.clone(),
                device_id: config.device_id.clone(),
                broker,
                keep_alive: Duration::from_secs(config.heartbeat_interval_s.clamp(5, 60) * 3),
                max_inflight: config.max_inflight,
                subscriptions: vec![
                    reporter.topic(Channel::Commands),
                    reporter.topic(Channel::Chunks),
                    topics.trust(),
                ],
                receipts_topic: reporter.topic(Channel::Receipts),
                last_will: Some(last_will),
                tls,
                credentials: Some({
                    let (user, password, state_dir) = (
                        config.broker_username.clone(),
                        config.broker_password.clone(),
                        state_dir.clone(),
                    );
                    Arc::new(move || {
                        if user.is_empty() {
                            crate::enroll::broker_login(&state_dir)
                        } else {
                            Some((user.clone(), password.clone()))
                        }
                    })
                }),
                max_packet_bytes: MAX_MESSAGE_BYTES + 1024,
                receipt_timeout: Duration::from_secs(config.outbox.receipt_timeout_s),
                packing: Packing {
                    max_messages: config.batching.max_messages,
                    max_payload_bytes: config.batching.max_payload_bytes,
                    compress: config.batching.compression == Compression::Zstd,
                },
            },
            outbox,
            incoming_tx,
        );
        let link_task = tokio::spawn(link.run(shutdown.child_token()));

        let (install_tx, installs) = mpsc::channel(INSTALL_CAPACITY);
        let source_layout = SourceLayout {
            columns: self.source.columns().to_vec(),
            row_shape: self.source.row_shape().map(<[usize]>::to_vec),
        };
        // The sample is a convenience for retraining: the agent serves without it.
        let reservoir = match Reservoir::open(
            &state_dir.join(crate::reservoir::FILE),
            config.reservoir_bytes,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "no input sample this run");
                None
            }
        };
        let mut actor = AgentLoop {
            serving: booted.map(|i| Serving::new(i, &source_layout)),
            served,
            source: self.source,
            source_layout,
            source_done: config.source.kind == crate::config::SourceKind::Api,
            reporter,
            installer,
            trust,
            trust_topic: topics.trust(),
            last_seq,
            seq_path,
            installing: None,
            journal_path: state_dir.join(JOURNAL_FILE),
            health_path: state_dir.join(HEALTH_FILE),
            watch: None,
            watch_recorded: Instant::now(),
            install_tx,
            counters: Counters::default(),
            started: Instant::now(),
            reservoir,
            sample_failing: false,
            bad_label_said: false,
            config,
        };
        actor.run(shutdown, incoming, installs, observed).await;
        link_task.abort();
        let _ = link_task.await;
        Ok(())
    }
}

struct AgentLoop {
    config: AgentConfig,
    /// The sample of inputs kept for retraining, and whether keeping the last input in it
    /// failed.
    reservoir: Option<Reservoir>,
    sample_failing: bool,
    /// A source's label that does not fit the served model was warned about.
    bad_label_said: bool,
    source: Box<dyn InputSource>,
    source_layout: SourceLayout,
    source_done: bool,
    serving: Option<Serving>,
    /// The served model as the local API sees it.
    served: ServedModel,
    reporter: Reporter,
    installer: Installer,
    trust: Trust,
    trust_topic: String,
    /// The highest command sequence accepted so far, or why it cannot be known (then every
    /// command is refused rather than risk accepting a replay).
    last_seq: Result<Option<u64>, String>,
    seq_path: PathBuf,
    /// The deployment being carried out, if any.
    installing: Option<ModelRef>,
    /// Where the deployment being carried out is recorded until it ends (see [`Journal`]).
    journal_path: PathBuf,
    /// The health window of the model activated last, while it runs, where it is recorded
    /// and when it was last.
    watch: Option<Watch>,
    health_path: PathBuf,
    watch_recorded: Instant,
    install_tx: mpsc::Sender<InstallOutcome>,
    counters: Counters,
    started: Instant,
}

impl AgentLoop {
    async fn run(
        &mut self,
        shutdown: CancellationToken,
        mut incoming: mpsc::Receiver<Publish>,
        mut installs: mpsc::Receiver<InstallOutcome>,
        mut observed: mpsc::Receiver<Observation>,
    ) {
        let mut sample =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.config.source.rate_hz));
        // A late tick is made up for, so the configured rate holds on average.
        sample.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut heartbeat =
            tokio::time::interval(Duration::from_secs(self.config.heartbeat_interval_s));
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Time-closed windows are checked every second (a tenth of a short window).
        let window_limit_ms = self.config.drift_window_s.saturating_mul(1000);
        let mut window_clock = tokio::time::interval(Duration::from_millis(
            (window_limit_ms / 10).clamp(100, 1000),
        ));
        window_clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut health_clock = tokio::time::interval(Duration::from_secs(1));
        health_clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The sample's writes are batched; this bounds how far the file lags.
        let mut sample_clock = tokio::time::interval(SAMPLE_FLUSH);
        sample_clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(device = %self.config.device_id, model = ?self.serving.as_ref().map(Serving::model_ref), "agent running");
        self.resume_health_window();
        self.resume_interrupted_install();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sample.tick(), if self.serving.is_some() && !self.source_done => self.on_sample(),
                _ = heartbeat.tick() => self.send_status(),
                _ = window_clock.tick(), if window_limit_ms > 0 => self.close_aged_window(window_limit_ms),
                Some(publish) = incoming.recv() => self.on_publish(&publish),
                Some(outcome) = installs.recv() => self.on_install_done(outcome),
                Some(observation) = observed.recv() => self.on_observed(observation),
                _ = health_clock.tick(), if self.watch.is_some() => self.check_health(),
                _ = sample_clock.tick(), if self.reservoir.is_some() => self.flush_sample(),
            }
        }
        // The window's latest counts, for the next start to resume from.
        if self.watch.is_some() {
            self.record_watch();
        }
        info!(device = %self.config.device_id, "agent stopped");
    }

    fn send_status(&self) {
        let outbox = self.reporter.outbox().status().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read outbox state");
            OutboxStatus::default()
        });
        self.reporter.status(DeviceStatus {
            online: true,
            agent_version: AGENT_VERSION.to_string(),
            model: self.serving.as_ref().map(Serving::model_ref),
            uptime_s: self.started.elapsed().as_secs(),
            inferences: self.counters.inferences,
            errors: self.counters.errors,
            malformed_messages: self.counters.malformed_messages,
            outbox,
            trust_version: self.trust.version(),
        });
    }

    /// One input: infer, count it into the drift window, publish the window when full.
    fn on_sample(&mut self) {
        let Some(serving) = self.serving.as_mut() else {
            return;
        };
        let Some(row) = self.source.next_row() else {
            if self.source.finished() {
                info!("input source exhausted");
                self.source_done = true;
            }
            return;
        };
        let columns = match &serving.columns {
            Ok(columns) => columns,
            Err(_) => {
                self.counters.errors += 1;
                if let Some(watch) = self.watch.as_mut() {
                    watch.inferences += 1;
                    watch.errors += 1;
                }
                return;
            }
        };
        let x: Vec<f32> = columns
            .iter()
            .map(|&c| row.get(c).copied().unwrap_or(f32::NAN))
            .collect();
        let started = std::time::Instant::now();
        let result = serving.installed.model.infer(&x);
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        // A gap in the input (NaN, a missing column) is the data's fault, not the model's.
        let input_fault = matches!(
            result,
            Err(RuntimeError::NonFinite { .. }
                | RuntimeError::WidthMismatch { .. }
                | RuntimeError::NotRepresentable { .. })
        );
        if let Some(watch) = self.watch.as_mut()
            && !input_fault
        {
            watch.inferences += 1;
            watch.errors += u64::from(result.is_err());
        }
        let regression = serving.installed.model.is_regression();
        let classes = serving.installed.model.plan.classes();
        let predicted = match result {
            Ok(prediction) => {
                self.counters.inferences += 1;
                Some(Predicted {
                    target: prediction.target(regression),
                    confidence: (!regression).then(|| crate::api::confidence(&prediction.scores)),
                    latency_ms,
                })
            }
            Err(e) => {
                self.counters.errors += 1;
                debug!(error = %e, "inference refused");
                if !input_fault && let Some(serving) = self.serving.as_mut() {
                    serving.window.observe_errors(1);
                }
                None
            }
        };
        let label = match self
            .source
            .label()
            .map(|l| source_label(l, regression, classes))
        {
            Some(Ok(label)) => label,
            Some(Err(why)) => {
                if !self.bad_label_said {
                    warn!(%why, "the source's ground truth does not fit the model: rows without it");
                    self.bad_label_said = true;
                }
                None
            }
            None => None,
        };
        if let (Some(serving), Some(label), Some(p)) = (self.serving.as_mut(), label, &predicted) {
            serving.observe_label(label, p.target, self.watch.as_mut());
        }
        let Some(serving) = self.serving.as_ref() else {
            return;
        };
        // Drift watches a tensor's channel statistics, a table's row itself.
        let watched = serving.installed.model.drift_row(&x);
        self.keep_sample(
            None,
            Some((&x, 1.0)),
            predicted.as_ref().map(|p| p.target),
            label,
        );
        self.count_into_window(&watched, predicted);
    }

    /// Offers an input of the served model to the sample kept for retraining.
    /// Writes the sample's pending inputs (see [`Reservoir::flush`]).
    fn flush_sample(&mut self) {
        if let Some(reservoir) = self.reservoir.as_mut()
            && let Err(e) = reservoir.flush()
            && !self.sample_failing
        {
            warn!(error = %e, "cannot write the sample of inputs");
            self.sample_failing = true;
        }
    }

    /// `input` is the input with the chance it was handed over with; None: the caller's
    /// thinning left it out, and it is only counted.
    fn keep_sample(
        &mut self,
        request_key: Option<&str>,
        input: Option<(&[f32], f64)>,
        predicted: Option<Target>,
        label: Option<Target>,
    ) {
        let Some(serving) = self.serving.as_ref() else {
            return;
        };
        let Some(reservoir) = self.reservoir.as_mut() else {
            // No sample this run: the API need not hand inputs over.
            serving.installed.model.sample_chance.set(0.0);
            return;
        };
        let offered = match input {
            Some((values, chance)) => reservoir.offer(
                &serving.sampled,
                Offered {
                    request_key,
                    values,
                    predicted: predicted.map(Target::number),
                    label: label.map(Target::number),
                    seen_ms: now_ms(),
                    chance,
                },
            ),
            None => reservoir.pass(&serving.sampled),
        };
        let model = &serving.installed.model;
        model
            .sample_chance
            .set(reservoir.chance(&serving.sampled.model));
        // Said once per spell of failures, not once per input.
        match offered {
            Err(e) if !self.sample_failing => {
                warn!(error = %e, "cannot keep inputs in the sample");
                self.sample_failing = true;
            }
            Err(_) => {}
            Ok(()) => self.sample_failing = false,
        }
    }

    /// Counts one input (and what the model predicted for it) into the served model's
    /// drift window, and publishes the window when it is full, or at once when the
    /// model's confidence has fallen (the Page–Hinkley alert).
    fn count_into_window(&mut self, row: &[f32], predicted: Option<Predicted>) {
        let Some(serving) = self.serving.as_mut() else {
            return;
        };
        let class = predicted.as_ref().and_then(|p| match p.target {
            Target::Class(class) => Some(class),
            Target::Value(_) => None,
        });
        if let Err(e) = serving.window.observe(row, class) {
            warn!(error = %e, "drift window refused the input");
            return;
        }
        if let Some(Target::Value(value)) = predicted.as_ref().map(|p| p.target) {
            serving.window.observe_value(value);
        }
        let mut alert = false;
        if let Some(p) = &predicted {
            serving.window.observe_latency(p.latency_ms);
            serving.record.observe_latency(p.latency_ms);
            if let Some(watch) = self.watch.as_mut() {
                watch.observed.observe_latency(p.latency_ms);
            }
            if let Some(confidence) = p.confidence {
                alert = serving.window.observe_confidence(confidence);
            }
        }
        if alert {
            warn!(model = %serving.model_ref(), samples = serving.window.samples(),
                "the model's confidence has fallen (Page-Hinkley): window published early");
        }
        if alert || serving.window.samples() >= self.config.drift_window_samples {
            let psi = Self::publish_window(&self.reporter, serving);
            self.watch_drift(psi);
        }
    }

    /// An input the local API inferred: counted into the window of the model that
    /// inferred it (an input of a model replaced since is dropped).
    fn on_observed(&mut self, observation: Observation) {
        let Some(serving) = self.serving.as_mut() else {
            return;
        };
        match observation {
            Observation::Inferred {
                model,
                row,
                predicted,
                confidence,
                latency_ms,
                request_key,
                tensor,
            } => {
                if serving.model_ref() != model {
                    return;
                }
                // A tensor input arrives as its channel statistics (what drift watches),
                // and itself only when the API handed it over for the sample.
                let input = match &tensor {
                    _ if !serving.installed.model.is_tensor() => Some((&row[..], 1.0)),
                    Some((values, chance)) => Some((&values[..], *chance)),
                    None => None,
                };
                self.keep_sample(Some(&request_key), input, Some(predicted), None);
                self.counters.inferences += 1;
                if let Some(watch) = self.watch.as_mut() {
                    watch.inferences += 1;
                }
                let predicted = Predicted {
                    target: predicted,
                    confidence,
                    latency_ms,
                };
                self.count_into_window(&row, Some(predicted));
            }
            Observation::Failed { model, rows } => {
                if serving.model_ref() != model {
                    return;
                }
                serving.window.observe_errors(rows);
                self.counters.errors += rows;
                if let Some(watch) = self.watch.as_mut() {
                    watch.inferences += rows;
                    watch.errors += rows;
                }
            }
            // A label counts into the window open when it arrives.
            Observation::Labelled {
                model,
                label,
                predicted,
                request_key,
            } => {
                if serving.model_ref() == model {
                    serving.observe_label(label, predicted, self.watch.as_mut());
                    if let Some(reservoir) = self.reservoir.as_mut()
                        && let Err(e) = reservoir.label(&request_key, label.number())
                    {
                        warn!(error = %e, "cannot label the input in the sample");
                    }
                }
            }
        }
    }

    /// Closes the drift window once it is `limit_ms` old: published when it holds inputs,
    /// restarted empty when it holds none (so that a quiet spell does not stretch the next
    /// window).
    fn close_aged_window(&mut self, limit_ms: u64) {
        let Some(serving) = self.serving.as_mut() else {
            return;
        };
        let now = now_ms();
        if now.saturating_sub(serving.window.start_ms()) < limit_ms {
            return;
        }
        if serving.window.samples() > 0 {
            let psi = Self::publish_window(&self.reporter, serving);
            self.watch_drift(psi);
        } else {
            serving.window.finish(now);
        }
    }

    /// Publishes the window; returns its largest PSI and how many inputs it holds.
    fn publish_window(reporter: &Reporter, serving: &mut Serving) -> (f64, u64) {
        let stats = serving.window.finish(now_ms());
        let psi = (stats.psi_max, stats.samples);
        let model = serving.model_ref();
        // The sequence lives in the outbox database, so it goes on across restarts: a
        // window is never numbered twice (a crash may leave a gap).
        serving.window_seq = match reporter
            .outbox()
            .next_sequence(&format!("window/{}/{}", model.name, model.version))
        {
            Ok(seq) => seq,
            Err(e) => {
                warn!(error = %e, "cannot advance the stored window sequence");
                serving.window_seq + 1
            }
        };
        reporter.drift(DriftSummary {
            model,
            window_seq: serving.window_seq,
            stats,
        });
        psi
    }

    /// Counts a published window's PSI into the health window; a window closed by time
    /// with less than half the inputs of a full one is too noisy to judge.
    fn watch_drift(&mut self, (psi, samples): (f64, u64)) {
        if let Some(watch) = self.watch.as_mut()
            && samples * 2 >= self.config.drift_window_samples
        {
            watch.worst_psi = watch.worst_psi.max(psi);
        }
    }

    /// Judges the health window: a breached limit rolls the model back at once; a window
    /// that has passed commits it.
    fn check_health(&mut self) {
        if self.watch_recorded.elapsed() >= HEALTH_RECORD_EVERY {
            self.record_watch();
        }
        let Some(watch) = self.watch.as_ref() else {
            return;
        };
        let limits = &self.config.health;
        let breach = if watch.restarts > limits.max_restarts {
            Some(format!(
                "the agent restarted {} times during the health window, over the limit of {}",
                watch.restarts, limits.max_restarts
            ))
        } else if limits.max_psi > 0.0 && watch.worst_psi > limits.max_psi {
            Some(format!(
                "drift: a window's PSI reached {:.3}, over the limit {}",
                watch.worst_psi, limits.max_psi
            ))
        } else if watch.inferences >= limits.min_inferences.max(1)
            && watch.errors as f64 > limits.max_error_rate * watch.inferences as f64
        {
            Some(format!(
                "{} of {} inferences failed, over the limit of {:.1}%",
                watch.errors,
                watch.inferences,
                limits.max_error_rate * 100.0
            ))
        } else {
            crate::health::compare(&watch.observed, &watch.baseline, &limits.service_limits())
        };
        match breach {
            Some(reason) => self.roll_back(reason),
            // Committed on evidence: the window has passed and enough inferences were judged.
            None if watch.elapsed() >= Duration::from_secs(limits.window_s)
                && watch.inferences >= limits.min_inferences.max(1) =>
            {
                let window_s = limits.window_s;
                let watch = self.watch.take().expect("checked above");
                let mut detail = format!(
                    "healthy for {window_s} s: {} inferences, {} failed, worst PSI {:.3}",
                    watch.inferences, watch.errors, watch.worst_psi
                );
                let service = watch.observed.describe();
                if !service.is_empty() {
                    detail.push_str(&format!(", {service}"));
                }
                info!(model = %watch.model, %detail, "model committed");
                self.reporter.deployment(
                    Some(watch.rollout_id),
                    watch.seq,
                    Some(watch.model),
                    DeployStage::Committed,
                    Some(detail),
                );
                // After the report is queued: a crash before this commits again.
                self.end_watch();
            }
            None => {}
        }
    }

    /// Goes back to the previous model, which the other slot still holds.
    fn roll_back(&mut self, reason: String) {
        // The record stays until the switch back is done and reported: a crash before that
        // resumes the window, with the restart counted.
        let Some(watch) = self.watch.take() else {
            return;
        };
        warn!(model = %watch.model, %reason, "health window breached; rolling back");
        // Rare, and as fast as a start: the previous bundle is verified and loaded here.
        let rolled = self
            .installer
            .roll_back_to(watch.previous, &watch.previous_model);
        let (stage, detail) = match rolled {
            Ok(installed) => {
                self.switch_to(installed);
                (
                    DeployStage::RolledBack,
                    format!("{reason}; back on {}", watch.previous_model),
                )
            }
            // Kept, and so committed: there is nothing better to serve.
            Err(e) => (
                DeployStage::Committed,
                format!("{reason}, but the previous model cannot serve ({e}), so this one stays"),
            ),
        };
        self.reporter.deployment(
            Some(watch.rollout_id),
            watch.seq,
            Some(watch.model),
            stage,
            Some(detail),
        );
        self.end_watch();
    }

    /// Serves `installed` from now on: the current model's inputs go out as a short window,
    /// requests already running finish on it, new ones get the new model.
    fn switch_to(&mut self, installed: Installed) {
        if let Some(old) = self.serving.as_mut()
            && old.window.samples() > 0
        {
            Self::publish_window(&self.reporter, old);
        }
        self.served.set(Some(installed.model.clone()));
        self.serving = Some(Serving::new(installed, &self.source_layout));
        self.send_status();
    }

    fn on_publish(&mut self, publish: &Publish) {
        if publish.topic == self.trust_topic {
            self.on_trust(&publish.payload);
            return;
        }
        let envelope = match Envelope::decode(&publish.payload) {
            Ok(e) if e.device_id == self.config.device_id => e,
            Ok(e) => {
                self.malformed(
                    &publish.topic,
                    &format!("envelope is for device `{}`", e.device_id),
                );
                return;
            }
            Err(e) => {
                self.malformed(&publish.topic, &e.to_string());
                return;
            }
        };
        match envelope.message {
            Message::Command(signed) => self.on_command(&signed),
            // Late or unasked-for pieces are dropped quietly: a transfer asks again.
            Message::BundleChunk(chunk) => {
                if !self.installer.deliver(chunk) {
                    debug!(topic = %publish.topic, "a bundle piece nobody waits for");
                }
            }
            other => self.malformed(
                &publish.topic,
                &format!("`{}` is not a command", other.kind()),
            ),
        }
    }

    /// A trust document on the fleet topic (retained, so it arrives at every connection).
    fn on_trust(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            // A cleared retained message: nothing to apply.
            return;
        }
        let signed: SignedTrust = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                self.malformed(&self.trust_topic.clone(), &format!("trust document: {e}"));
                return;
            }
        };
        // The retained document again, at a reconnection: its signer may no longer be a
        // root (it handed over), so the version is looked at before the signature.
        if let Ok(document) = signed.peek()
            && document.version == self.trust.version()
        {
            debug!(version = document.version, "trust document already applied");
            return;
        }
        match self.trust.apply(&signed) {
            Ok(state) => {
                info!(
                    version = state.version,
                    signing_keys = state.signing_keys.len(),
                    revoked = state.revoked.len(),
                    "trust document applied"
                );
                let active = self.serving.as_ref().map(|s| s.installed.slot);
                for (slot, key_id) in self.installer.slots_signed_by_untrusted() {
                    let which = if Some(slot) == active {
                        "the active"
                    } else {
                        "the other"
                    };
                    warn!(?slot, %key_id, "{which} slot's bundle is signed by a key no longer \
                        trusted: the device refuses it at its next start; roll out a model \
                        signed by a trusted key");
                }
            }
            Err(e) => warn!(error = %e, "trust document refused"),
        }
    }

    fn malformed(&mut self, topic: &str, reason: &str) {
        self.counters.malformed_messages += 1;
        warn!(%topic, %reason, count = self.counters.malformed_messages, "malformed message dropped");
    }

    fn on_command(&mut self, signed: &SignedCommand) {
        let command = match signed.open(&self.trust.signing().get()) {
            Ok(c) => c,
            Err(e) => {
                // Not authentic: nothing in it can be believed, so nothing of it is echoed.
                warn!(error = %e, key_id = %signed.key_id, "command refused");
                self.reporter.deployment(
                    None,
                    signed.claimed_seq().unwrap_or(0),
                    None,
                    DeployStage::Rejected,
                    Some(format!("command refused: {e}")),
                );
                return;
            }
        };
        let about = command
            .action
            .deploy()
            .map(|a| (a.rollout_id, a.model.clone()));
        let checked = match &self.last_seq {
            Ok(last) => command
                .check(&self.config.device_id, now_ms(), *last)
                .map_err(|e| (e.to_string(), matches!(e, CommandError::Replayed { .. }))),
            Err(reason) => Err((
                format!("replay protection state unreadable: {reason}"),
                false,
            )),
        };
        if let Err((reason, replayed)) = checked {
            warn!(%reason, seq = command.seq, "command refused");
            // An authentic command refused for its target, time or sequence names its
            // rollout, so the operator sees why. A replay does not: it may be a duplicate
            // delivery of a command that is being carried out.
            if let CommandAction::UploadSamples(upload) = &command.action {
                if !replayed {
                    self.reporter.sample_chunk(SampleChunk::failed(
                        upload.dataset_id,
                        command.seq,
                        format!("command refused: {reason}"),
                    ));
                }
                return;
            }
            let about = about.filter(|_| !replayed);
            self.reporter.deployment(
                about.as_ref().map(|a| a.0),
                command.seq,
                about.map(|a| a.1),
                DeployStage::Rejected,
                Some(format!("command refused: {reason}")),
            );
            return;
        }
        if let Err(e) = write_atomic(&self.seq_path, command.seq.to_string().as_bytes()) {
            // Without the record a replay after reboot could pass the sequence check;
            // refuse to act rather than weaken it.
            warn!(error = %e, "cannot record command sequence; command not carried out");
            return;
        }
        self.last_seq = Ok(Some(command.seq));
        match command.action {
            CommandAction::UploadSamples(upload) => self.on_upload(command.seq, &upload),
            deploy => self.on_deploy(command.seq, deploy),
        }
    }

    /// Sends the input sample (CSV, or NPY for a tensor model) in chunks on the samples
    /// channel, at the outbox's lowest priority. The file is cut to half the outbox budget,
    /// so that its chunks never evict each other.
    fn on_upload(&mut self, seq: u64, upload: &UploadAction) {
        let max_bytes = self.config.outbox.budget_bytes / 2;
        let exported = match self.reservoir.as_mut() {
            None => Err("this device keeps no input sample".to_string()),
            Some(r) => r
                .export(
                    upload.max_rows,
                    max_bytes,
                    self.serving.as_ref().map(|s| &s.sampled),
                )
                .map_err(|e| e.to_string()),
        };
        match exported {
            Ok(export) => {
                let chunks = SampleChunk::split(
                    upload.dataset_id,
                    seq,
                    export.model,
                    export.rows,
                    &export.bytes,
                );
                info!(
                    dataset = upload.dataset_id,
                    rows = export.rows,
                    bytes = export.bytes.len(),
                    format = ?export.format,
                    chunks = chunks.len(),
                    "uploading the input sample"
                );
                for chunk in chunks {
                    self.reporter.sample_chunk(chunk);
                }
            }
            Err(reason) => {
                warn!(dataset = upload.dataset_id, %reason, "cannot upload the input sample");
                self.reporter
                    .sample_chunk(SampleChunk::failed(upload.dataset_id, seq, reason));
            }
        }
    }

    /// Installs what a deploy or rollback command names. Anti-rollback: a deploy of the
    /// active model's name must raise its version, and no deploy goes below the highest
    /// version of its model the device has run; only a rollback lowers it, and a rollback
    /// must lower it.
    fn on_deploy(&mut self, seq: u64, command: CommandAction) {
        let active = self.serving.as_ref().map(Serving::model_ref);
        let disposition = match command.deploy().filter(|_| !command.is_rollback()) {
            Some(action) => match self.installer.highest_version(&action.model.name) {
                Ok(highest) => command
                    .disposition(active.as_ref(), highest)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("anti-rollback record unreadable: {e}")),
            },
            // A rollback goes back within the active model: the record does not matter.
            None => command
                .disposition(active.as_ref(), None)
                .map_err(|e| e.to_string()),
        };
        let rollback = command.is_rollback();
        let Some(action) = command.deploy().cloned() else {
            return;
        };
        let report = |stage, detail: String| {
            self.reporter.deployment(
                Some(action.rollout_id),
                seq,
                Some(action.model.clone()),
                stage,
                Some(detail),
            )
        };
        match disposition {
            Ok(Disposition::AlreadyActive) => {
                report(DeployStage::Active, "already active".into());
                return;
            }
            Err(e) => {
                warn!(model = %action.model, reason = %e, "deployment refused");
                report(DeployStage::Rejected, e.to_string());
                return;
            }
            Ok(Disposition::Install) => {}
        }
        if let Some(busy) = &self.installing {
            // One install at a time. The controller sends a quiet deployment's command again,
            // so this one is carried out after the current install ends.
            info!(model = %action.model, %busy, "deploy command deferred: an install is running");
            return;
        }
        info!(model = %action.model, rollout = action.rollout_id, "deploying");
        let journal = Journal {
            seq,
            rollback,
            action: action.clone(),
        };
        if let Err(e) = write_atomic(
            &self.journal_path,
            &serde_json::to_vec(&journal).expect("journals serialize"),
        ) {
            // Without the record a crash would not resume; the install still runs.
            warn!(error = %e, "cannot record the install in the journal");
        }
        self.installing = Some(action.model.clone());
        // The install writes the slot the health window would go back to: the model being
        // watched is replaced, so its window ends without a verdict.
        if let Some(watch) = self.end_watch() {
            info!(model = %watch.model, "health window ended by a new install");
        }
        let installer = self.installer.clone();
        let reporter = self.reporter.clone();
        let active = self.serving.as_ref().map(|s| s.installed.slot);
        let done = self.install_tx.clone();
        tokio::spawn(async move {
            let result = deploy(&installer, &reporter, seq, &action, active).await;
            let _ = done
                .send(InstallOutcome {
                    seq,
                    action,
                    rollback,
                    result,
                })
                .await;
        });
    }

    /// An install a crash or power cut interrupted, found in the journal at start: if the
    /// switch had happened the model is active and that is reported; otherwise the install
    /// runs again (its download resumes where it stopped). The previous model serves
    /// meanwhile, as the active slot still names it.
    fn resume_interrupted_install(&mut self) {
        let bytes = match std::fs::read(&self.journal_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(error = %e, "cannot read the install journal");
                return;
            }
        };
        let journal: Journal = match serde_json::from_slice(&bytes) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "install journal unreadable; discarded");
                self.clear_journal();
                return;
            }
        };
        if self.serving.as_ref().map(Serving::model_ref) == Some(journal.action.model.clone()) {
            info!(model = %journal.action.model, "an install interrupted after its switch: active");
            self.reporter.deployment(
                Some(journal.action.rollout_id),
                journal.seq,
                Some(journal.action.model.clone()),
                DeployStage::Active,
                Some("active after a restart".into()),
            );
            if !journal.rollback && self.watch.is_none() {
                self.watch_after_restart(journal.seq, journal.action);
            }
            self.clear_journal();
            return;
        }
        info!(model = %journal.action.model, "resuming an install interrupted by a restart");
        // Cleared first: if the install is refused now, it is not retried at every start.
        // Carrying it out records it again.
        self.clear_journal();
        let command = if journal.rollback {
            CommandAction::Rollback(journal.action)
        } else {
            CommandAction::Deploy(journal.action)
        };
        self.on_deploy(journal.seq, command);
    }

    /// Starts the health window of a model whose install a restart interrupted after the
    /// switch (before its window was recorded), with the restart counted: going back to
    /// the other slot, if it holds a model.
    fn watch_after_restart(&mut self, seq: u64, action: DeployAction) {
        let Some(serving) = &self.serving else {
            return;
        };
        if self.config.health.window_s == 0 {
            return;
        }
        let previous = serving.installed.slot.other();
        match self.installer.verify_slot(previous) {
            Ok(verified) => {
                let previous_model = verified.manifest.model_ref();
                self.start_watch(Watch::new(seq, action, previous, previous_model, 1));
            }
            Err(e) => {
                info!(error = %e, "no health window: the other slot holds no model to go back to")
            }
        }
    }

    /// Starts a health window and records it.
    fn start_watch(&mut self, watch: Watch) {
        self.watch = Some(watch);
        self.record_watch();
    }

    /// Records the running health window, for a restart to resume.
    fn record_watch(&mut self) {
        self.watch_recorded = Instant::now();
        if let Some(watch) = &self.watch
            && let Err(e) = write_atomic(&self.health_path, &watch.record())
        {
            warn!(error = %e, "cannot record the health window; a restart would not resume it");
        }
    }

    /// Ends the health window, if one runs, and deletes its record.
    fn end_watch(&mut self) -> Option<Watch> {
        let watch = self.watch.take();
        if let Err(e) = std::fs::remove_file(&self.health_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %e, "cannot delete the health window's record");
        }
        watch
    }

    /// A health window a restart interrupted, found at start. It goes on where it was
    /// recorded, with the restart counted, if the model it watches is still served. If the
    /// device came back on the previous model instead (the new one's slot did not load),
    /// the deployment is reported rolled back.
    fn resume_health_window(&mut self) {
        let bytes = match std::fs::read(&self.health_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(error = %e, "cannot read the health window's record");
                return;
            }
        };
        let mut watch: Watch = match serde_json::from_slice(&bytes) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "health window record unreadable; discarded");
                self.end_watch();
                return;
            }
        };
        let serving = self.serving.as_ref().map(Serving::model_ref);
        if serving.as_ref() == Some(&watch.model) {
            info!(model = %watch.model, restarts = watch.restarts,
                watched_s = watch.elapsed_before_ms / 1000, "health window resumed after a restart");
            watch.since = Instant::now();
            self.start_watch(watch);
            return;
        }
        if serving.as_ref() == Some(&watch.previous_model) {
            let limit = self.config.health.max_restarts;
            let reason = if watch.restarts > limit {
                format!(
                    "the agent restarted {} times during the health window, over the limit of {limit}",
                    watch.restarts
                )
            } else {
                "the model could not be served after a restart".to_string()
            };
            warn!(model = %watch.model, %reason, "back on the previous model");
            self.reporter.deployment(
                Some(watch.rollout_id),
                watch.seq,
                Some(watch.model),
                DeployStage::RolledBack,
                Some(format!("{reason}; back on {}", watch.previous_model)),
            );
        }
        self.end_watch();
    }

    fn clear_journal(&self) {
        if let Err(e) = std::fs::remove_file(&self.journal_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %e, "cannot clear the install journal");
        }
    }

    fn on_install_done(&mut self, outcome: InstallOutcome) {
        self.installing = None;
        // The journal goes last: a crash before it is cleared finds the install done at the
        // next start and starts its health window then (see `resume_interrupted_install`).
        self.on_install_outcome(outcome);
        self.clear_journal();
    }

    fn on_install_outcome(&mut self, outcome: InstallOutcome) {
        let InstallOutcome {
            seq,
            action,
            rollback,
            result,
        } = outcome;
        match result {
            Ok(installed) => {
                info!(model = %action.model, slot = ?installed.slot, "model active");
                let previous = self
                    .serving
                    .as_ref()
                    .map(|s| (s.installed.slot, s.model_ref(), s.record.clone()));
                self.switch_to(installed);
                self.reporter.deployment(
                    Some(action.rollout_id),
                    seq,
                    Some(action.model.clone()),
                    DeployStage::Active,
                    None,
                );
                // Watched when there is a model to go back to. An operator's rollback is not:
                // going back from it would undo the operator's decision.
                self.end_watch();
                match previous {
                    Some((previous, previous_model, baseline))
                        if self.config.health.window_s > 0 && !rollback =>
                    {
                        // Latency and accuracy are compared within one model's versions:
                        // another model may be heavier, or label other classes.
                        let same_model = previous_model.name == action.model.name;
                        let mut watch = Watch::new(seq, action, previous, previous_model, 0);
                        if same_model {
                            watch.baseline = baseline;
                        }
                        self.start_watch(watch);
                    }
                    _ => self.reporter.deployment(
                        Some(action.rollout_id),
                        seq,
                        Some(action.model),
                        DeployStage::Committed,
                        Some(
                            "no health window: nothing to go back to, a rollback, or window_s = 0"
                                .into(),
                        ),
                    ),
                }
            }
            Err(e) => {
                warn!(model = %action.model, error = %e, "deployment failed; previous model keeps serving");
                self.reporter.deployment(
                    Some(action.rollout_id),
                    seq,
                    Some(action.model),
                    DeployStage::Failed,
                    Some(e.to_string()),
                );
            }
        }
    }
}

/// The health window of a newly activated model. It is recorded in [`HEALTH_FILE`] when it
/// starts and every [`HEALTH_RECORD_EVERY`] while it runs, so that a restart resumes it
/// (what was counted since the last record is lost with the process), and deleted when it
/// ends.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Watch {
    /// Time watched before this process took over; downtime does not count.
    elapsed_before_ms: u64,
    /// When this process took over.
    #[serde(skip, default = "Instant::now")]
    since: Instant,
    seq: u64,
    rollout_id: u64,
    model: ModelRef,
    /// The slot holding the model to go back to, and that model.
    previous: crate::slots::Slot,
    previous_model: ModelRef,
    inferences: u64,
    errors: u64,
    worst_psi: f64,
    /// Restarts of the agent during the window.
    restarts: u32,
    /// The previous model's latency and accuracy before the switch (empty when the window
    /// did not start at an install in this process), and the new model's since.
    #[serde(default)]
    baseline: ServiceRecord,
    #[serde(default)]
    observed: ServiceRecord,
}

impl Watch {
    /// A window starting now for the model `action` installed, going back to `previous`
    /// (holding `previous_model`), with `restarts` already counted.
    fn new(
        seq: u64,
        action: DeployAction,
        previous: crate::slots::Slot,
        previous_model: ModelRef,
        restarts: u32,
    ) -> Self {
        Watch {
            elapsed_before_ms: 0,
            since: Instant::now(),
            seq,
            rollout_id: action.rollout_id,
            model: action.model,
            previous,
            previous_model,
            inferences: 0,
            errors: 0,
            worst_psi: 0.0,
            restarts,
            baseline: ServiceRecord::default(),
            observed: ServiceRecord::default(),
        }
    }

    fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_before_ms) + self.since.elapsed()
    }

    /// The record a restart resumes from.
    fn record(&self) -> Vec<u8> {
        let mut record = self.clone();
        record.elapsed_before_ms = self.elapsed().as_millis() as u64;
        serde_json::to_vec(&record).expect("a health window serializes")
    }
}

/// Where the running health window is recorded (see [`Watch`]).
const HEALTH_FILE: &str = "health.json";
/// Counts a restart into the health window that was running when the process stopped,
/// before any model loads, so that a model that brings the process down while loading
/// counts too. Past `max_restarts` the slot the window would go back to is made active, so
/// that the start serves the previous model (reported in `resume_health_window`).
fn count_restart(path: &std::path::Path, slots: &Slots, max_restarts: u32) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    // An unreadable record is reported and discarded when the window would resume.
    let Ok(mut watch) = serde_json::from_slice::<Watch>(&bytes) else {
        return;
    };
    watch.restarts += 1;
    let record = serde_json::to_vec(&watch).expect("a health window serializes");
    if let Err(e) = write_atomic(path, &record) {
        warn!(error = %e, "cannot count the restart into the health window");
    }
    if watch.restarts > max_restarts && slots.active() != Some(watch.previous) {
        warn!(model = %watch.model, restarts = watch.restarts,
            "restarted too often during the health window; starting on the previous model");
        if let Err(e) = slots.reactivate(watch.previous) {
            warn!(error = %e, "cannot go back to the previous slot");
        }
    }
}

/// How often a running health window's counts are recorded.
const HEALTH_RECORD_EVERY: Duration = Duration::from_secs(5);

/// The install journal: the deployment being carried out, written (fsync, rename) before it
/// starts and removed when it ends, so that a restart in between resumes it.
const JOURNAL_FILE: &str = "install.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Journal {
    /// The sequence of the authentic command that asked for it.
    seq: u64,
    rollback: bool,
    action: DeployAction,
}

/// Downloads, verifies and installs, reporting each stage.
async fn deploy(
    installer: &Installer,
    reporter: &Reporter,
    seq: u64,
    action: &DeployAction,
    active: Option<crate::slots::Slot>,
) -> Result<Installed, InstallError> {
    let stage = |stage, detail| {
        reporter.deployment(
            Some(action.rollout_id),
            seq,
            Some(action.model.clone()),
            stage,
            detail,
        )
    };
    let mut keep = vec![action.bundle_sha256.as_str()];
    keep.extend(action.delta.as_ref().map(|d| d.bundle_sha256.as_str()));
    installer.keep_only_downloads(&keep).await;
    let (bytes, verified) = fetch(installer, &stage, action, active).await?;
    stage(DeployStage::Installing, None);
    let result = blocking({
        let installer = installer.clone();
        move || installer.install(&bytes, &verified, active)
    })
    .await;
    // Installed (the slot holds it now) or refused (downloading it again would not help).
    installer.discard_download(&action.bundle_sha256);
    if let Some(delta) = &action.delta {
        installer.discard_download(&delta.bundle_sha256);
    }
    result
}

/// The bundle to install, downloaded and verified: the delta the command offers when the
/// active slot holds its base, or else (or when the delta cannot be had) the full bundle.
async fn fetch(
    installer: &Installer,
    stage: &impl Fn(DeployStage, Option<String>),
    action: &DeployAction,
    active: Option<crate::slots::Slot>,
) -> Result<(Vec<u8>, VerifiedBundle), InstallError> {
    let mut why_full = None;
    if let (Some(offer), Some(slot)) = (&action.delta, active) {
        match fetch_delta(installer, stage, action, offer, slot).await {
            Ok(got) => return Ok(got),
            Err(e) => {
                info!(model = %action.model, reason = %e, "not using the delta bundle; downloading the full bundle");
                // A transfer cut short is kept for the next attempt; anything else would
                // fail again.
                if !matches!(
                    e,
                    InstallError::Download { .. } | InstallError::SizeMismatch { .. }
                ) {
                    installer.discard_download(&offer.bundle_sha256);
                }
                why_full = Some(format!(
                    "full bundle of {} bytes: the delta bundle cannot be used: {e}",
                    action.bundle_size
                ));
            }
        }
    }
    stage(DeployStage::Downloading, why_full);
    let bytes = installer.download(Remote::bundle(action)).await?;
    stage(DeployStage::Verifying, None);
    let (installer, action) = (installer.clone(), action.clone());
    blocking(move || {
        let verified = installer.verify(&bytes, &action, None)?;
        Ok((bytes, verified))
    })
    .await
}

async fn fetch_delta(
    installer: &Installer,
    stage: &impl Fn(DeployStage, Option<String>),
    action: &DeployAction,
    offer: &DeltaOffer,
    slot: crate::slots::Slot,
) -> Result<(Vec<u8>, VerifiedBundle), InstallError> {
    let base = blocking({
        let installer = installer.clone();
        move || installer.verify_slot(slot)
    })
    .await?;
    let holds = &base.manifest.artifact.raw_sha256;
    if holds != &offer.base_sha256 {
        return Err(InstallError::Verify(BundleError::DeltaBase {
            expected: offer.base_sha256.clone(),
            found: format!("the active model is {holds}"),
        }));
    }
    stage(
        DeployStage::Downloading,
        Some(format!(
            "delta bundle of {} bytes against {} (the full bundle is {} bytes)",
            offer.bundle_size,
            base.manifest.model_ref(),
            action.bundle_size
        )),
    );
    let bytes = installer.download(Remote::delta(offer)).await?;
    stage(DeployStage::Verifying, None);
    let (installer, action) = (installer.clone(), action.clone());
    blocking(move || {
        let verified = installer.verify(&bytes, &action, Some(&base.model))?;
        Ok((bytes, verified))
    })
    .await
}

/// Runs CPU-bound install work (decompression, digests, loading) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InstallError> + Send + 'static,
) -> Result<T, InstallError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| InstallError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sources_ground_truth_is_a_value_or_a_class_index_of_the_model() {
        let value = Target::Value;
        assert_eq!(source_label(value(39.5), true, 0), Ok(Some(value(39.5))));
        assert_eq!(
            source_label(Target::Class(1), true, 0),
            Ok(None),
            "a machine's condition is no true value"
        );
        assert_eq!(
            source_label(value(1.0), false, 2),
            Ok(Some(Target::Class(1)))
        );
        assert_eq!(
            source_label(Target::Class(1), false, 2),
            Ok(Some(Target::Class(1)))
        );
        assert!(source_label(Target::Class(2), false, 2).is_err());
        for bad in [2.0, 0.5, -1.0] {
            let err = source_label(value(bad), false, 2).unwrap_err();
            assert!(
                err.contains(&format!(
                    "label {bad} is not a class index of a model of 2 classes"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn the_sequence_file_is_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("command_seq");
        assert_eq!(read_last_seq(&path), Ok(None));
        std::fs::write(&path, "42\n").unwrap();
        assert_eq!(read_last_seq(&path), Ok(Some(42)));
        std::fs::write(&path, "").unwrap();
        assert!(
            read_last_seq(&path).is_err(),
            "a damaged file does not reset replay protection"
        );
    }

    #[test]
    fn columns_map_by_name_and_missing_ones_are_named() {
        let cols: Vec<String> = ["b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let feats: Vec<String> = ["a", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(map_columns(&feats, &cols), Ok(vec![1, 2]));
        let err = map_columns(&["z".to_string()], &cols).unwrap_err();
        assert!(err.contains("`z`"));
    }

    #[test]
    fn a_tensor_model_takes_a_sources_tensors_of_its_shape_whole() {
        assert_eq!(tensor_columns(&[2, 3], Some(&[2, 3])), Ok((0..6).collect()));
        let err = tensor_columns(&[2, 3], Some(&[3, 2])).unwrap_err();
        assert!(err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
        let err = tensor_columns(&[2, 3], None).unwrap_err();
        assert!(
            err.contains("local inference API or an npy source"),
            "{err}"
        );
    }
}
