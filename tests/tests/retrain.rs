//! The closed loop: a fleet of real agents, a covariate shift injected at t0, and nothing
//! else. The retraining policy sees the drift, fires one retraining, the trainer's candidate
//! passes the quality gate, waves roll it out, drift falls and accuracy recovers — with no
//! operator action. Also: no false alarm without a shift, and a webhook trainer that is
//! retried, signed and alerted on.
//!
//! The trainer here is a shell script that hands over the model the example pipeline trained
//! on the shifted regime (`model_v2.onnx`): the trainer is an external program by design, and
//! the script stands in for it at that seam. Everything around it is the real controller.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeloop_agent::now_ms;
use edgeloop_agent::runtime::Plan;
use edgeloop_agent::source::{ShiftControl, VibrationGenerator};
use edgeloop_controller::demo::{MODEL_V1, MODEL_V2, REFERENCE_V2};
use edgeloop_controller::registry::{PublishRequest, QualityGate};
use edgeloop_controller::retrain::{RetrainingPolicy, SIGNATURE_HEADER, signature};
use edgeloop_tests::{BrokerChoice, TestAgent, TestController, on_both_brokers, wait_until};
use serde_json::{Value, json};

const HOLDOUT_V2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../controller/assets/vibration/holdout_v2.csv"
);
const WAIT: Duration = Duration::from_secs(90);

/// A policy from TOML, as an operator writes it.
fn policy(toml_text: &str) -> RetrainingPolicy {
    let p: RetrainingPolicy = toml::from_str(toml_text).unwrap();
    p.validate().unwrap();
    p
}

/// A controller with one retraining policy, checked every second, and its fleet.
struct Loop {
    ctl: TestController,
    agents: Vec<TestAgent>,
}

impl Loop {
    /// The controller and `n` agents, every one on model v1.
    async fn on_v1(
        broker: BrokerChoice,
        policy: RetrainingPolicy,
        prefix: &str,
        n: usize,
        window: u64,
        rate_hz: f64,
    ) -> Option<Self> {
        let ctl = TestController::start_with(broker, move |c| {
            c.retraining_check_s = 1;
            c.retraining = vec![policy];
        })
        .await?;
        let agents = spawn_fleet(&ctl, prefix, n, window, rate_hz);
        on_v1(&ctl, n).await;
        every_device_on(&ctl, n, 1).await;
        Some(Loop { ctl, agents })
    }

    async fn stop(self) {
        for agent in self.agents {
            agent.stop().await;
        }
        self.ctl.stop().await;
    }
}

/// `n` agents named `{prefix}-00`…: each test its own prefix, because tests run at once
/// against the one external broker, where a device id is an MQTT client id.
fn spawn_fleet(
    ctl: &TestController,
    prefix: &str,
    n: usize,
    window: u64,
    rate_hz: f64,
) -> Vec<TestAgent> {
    (0..n)
        .map(|i| {
            let mut config = ctl.agent_config(&format!("{prefix}-{i:02}"), window);
            config.source.rate_hz = rate_hz;
            config.source.seed = i as u64;
            config.health.window_s = 4;
            // Far above window noise, far below a model fed the other regime (PSI ~10).
            config.health.max_psi = 0.5;
            ctl.spawn_agent_with(config)
        })
        .collect()
}

/// Waits for the devices to register, then puts them all on v1.
async fn on_v1(ctl: &TestController, n: usize) {
    wait_until(&format!("{n} devices register"), WAIT, || async {
        ctl.get("/api/v1/devices").await.as_array().unwrap().len() == n
    })
    .await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
}

async fn every_device_on(ctl: &TestController, n: usize, version: u64) {
    wait_until(&format!("{n} devices on v{version}"), WAIT, || async {
        let devices = ctl.get("/api/v1/devices").await;
        let devices = devices.as_array().unwrap();
        devices.len() == n
            && devices
                .iter()
                .all(|d| d["online"] == true && d["model_version"] == version)
    })
    .await;
}

async fn retrainings(ctl: &TestController) -> Vec<Value> {
    ctl.get("/api/v1/retrainings?limit=100")
        .await
        .as_array()
        .unwrap()
        .clone()
}

/// A trainer script that records each call and writes the model trained on the shifted
/// regime.
fn trainer_script(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("trained.onnx");
    let reference = dir.join("trained-reference.csv");
    std::fs::write(&model, MODEL_V2).unwrap();
    std::fs::write(&reference, REFERENCE_V2).unwrap();
    let calls = dir.join("trainer-calls.txt");
    let script = dir.join("train.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\necho \"$EDGELOOP_RETRAINING_ID $EDGELOOP_MODEL $EDGELOOP_FROM_VERSION\" >> '{}'\necho training on the drifting devices: $EDGELOOP_DRIFTING_DEVICES\ncp '{}' \"$EDGELOOP_OUTPUT_DIR/model.onnx\"\ncp '{}' \"$EDGELOOP_OUTPUT_DIR/reference.csv\"\n",
            calls.display(),
            model.display(),
            reference.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, calls)
}

/// Accuracy of `onnx` on `n` rows from the same generator the devices read, at `shift`.
fn accuracy(onnx: &[u8], shift: f32, n: usize) -> f64 {
    let plan = Plan::compile(onnx, 4).unwrap();
    let control = ShiftControl::default();
    control.set(shift);
    let mut generator = VibrationGenerator::new(12345, control);
    let names: Vec<String> = ["rms", "peak", "kurtosis", "temperature"]
        .map(String::from)
        .to_vec();
    let hits = (0..n)
        .filter(|_| {
            let (row, label) = generator.labelled_row();
            plan.infer(&row, &names).unwrap().class == label
        })
        .count();
    hits as f64 / n as f64
}

async fn a_covariate_shift_closes_the_loop_with_no_operator(broker: BrokerChoice) {
    const DEVICES: usize = 20;
    const WINDOW: u64 = 200;
    const RATE_HZ: f64 = 100.0;
    let window_ms = WINDOW as f64 / RATE_HZ * 1000.0;
    let scratch = tempfile::tempdir().unwrap();
    let (script, calls) = trainer_script(scratch.path());
    let policy = policy(&format!(
        r#"
model = "vibration"
psi_threshold = 0.25
consecutive_windows = 2
min_devices = 5
min_share = 0.5
holdout = "{HOLDOUT_V2}"
rollout = {{ waves = ["1", "25%", "100%"], failure_threshold = 0.2 }}
trainer = {{ kind = "command", program = "{}", timeout_s = 60 }}
"#,
        script.display()
    ));
    let Some(Loop { ctl, agents }) =
        Loop::on_v1(broker, policy, "loop", DEVICES, WINDOW, RATE_HZ).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // Before the shift: windows flow and nothing fires.
    tokio::time::sleep(Duration::from_millis(3 * window_ms as u64)).await;
    assert!(retrainings(&ctl).await.is_empty(), "fired before the shift");

    let t0 = now_ms();
    for agent in &agents {
        agent.shift.set(1.0);
    }
    wait_until("a retraining fires", WAIT, || async {
        !retrainings(&ctl).await.is_empty()
    })
    .await;
    let fired = retrainings(&ctl).await[0].clone();
    let detected_windows = (fired["fired_ms"].as_u64().unwrap() - t0) as f64 / window_ms;
    assert_eq!(fired["from_version"], 1, "{fired}");
    assert!(
        fired["reason"]
            .as_str()
            .unwrap()
            .contains("devices on v1 drifted"),
        "{fired}"
    );
    // Detected within two windows, counted in windows, not in time: when it fired, the
    // typical device had stored no more than the window the shift fell in and the two the
    // policy asks for.
    let fired_ms = fired["fired_ms"].as_u64().unwrap();
    let mut since_shift = Vec::new();
    for i in 0..DEVICES {
        let windows = ctl
            .get(&format!("/api/v1/devices/loop-{i:02}/telemetry?limit=100"))
            .await;
        since_shift.push(
            windows
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| {
                    w["window_end_ms"].as_u64().unwrap() > t0
                        && w["received_ms"].as_u64().unwrap() <= fired_ms
                })
                .count(),
        );
    }
    since_shift.sort_unstable();
    let median = since_shift[DEVICES / 2];
    assert!(
        (2..=3).contains(&median),
        "windows stored after the shift when it fired: {since_shift:?}"
    );

    wait_until("the retraining completes", WAIT, || async {
        retrainings(&ctl).await[0]["status"] == "completed"
    })
    .await;
    let done = retrainings(&ctl).await[0].clone();
    let completed_windows = (now_ms() - t0) as f64 / window_ms;
    assert_eq!(done["candidate_version"], 2, "{done}");
    assert!(
        done["gate"]
            .as_str()
            .unwrap()
            .starts_with("passed: accuracy"),
        "{done}"
    );
    let rollout = ctl
        .get(&format!("/api/v1/rollouts/{}", done["rollout_id"]))
        .await;
    assert_eq!(rollout["status"], "completed", "{rollout}");
    assert_eq!(rollout["plan"]["waves"].as_array().unwrap().len(), 3);
    every_device_on(&ctl, DEVICES, 2).await;

    // Drift falls: every device's newest window on v2 is calm again.
    wait_until("drift falls on v2", WAIT, || async {
        ctl.get("/api/v1/devices")
            .await
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["model_version"] == 2 && d["last_psi_max"].as_f64().unwrap_or(9.0) < 0.25)
    })
    .await;
    let recovered_windows = (now_ms() - t0) as f64 / window_ms;

    // Accuracy: v1 on the old regime, v1 after the shift, the deployed v2 after it.
    let deployed = ctl.published_bundle("vibration", 2).await.model;
    let before = accuracy(MODEL_V1, 0.0, 3000);
    let decayed = accuracy(MODEL_V1, 1.0, 3000);
    let after = accuracy(&deployed, 1.0, 3000);
    assert!(
        decayed < before - 0.05,
        "the shift hurts v1: {before} → {decayed}"
    );
    assert!(
        after >= before - 0.02,
        "accuracy recovers within 2 points: {before:.3} before, {after:.3} after"
    );

    // Exactly one retraining, one trainer run, and nobody but the controller acted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(retrainings(&ctl).await.len(), 1);
    let runs = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(runs.lines().count(), 1, "{runs}");
    let audit = ctl.get("/api/v1/audit?limit=100").await;
    for entry in audit.as_array().unwrap() {
        assert_eq!(entry["actor"], "controller", "{entry}");
    }
    eprintln!(
        "closed loop ({DEVICES} devices, {window_ms} ms windows): detected after {detected_windows:.1} windows, \
         retraining completed after {completed_windows:.1}, drift recovered after {recovered_windows:.1}; \
         accuracy {before:.3} before the shift, {decayed:.3} after it, {after:.3} on the new model"
    );
    Loop { ctl, agents }.stop().await;
}
on_both_brokers!(a_covariate_shift_closes_the_loop_with_no_operator);

async fn a_fleet_without_a_shift_fires_nothing_in_fifty_windows(broker: BrokerChoice) {
    const DEVICES: usize = 5;
    const WINDOW: u64 = 400;
    let scratch = tempfile::tempdir().unwrap();
    let (script, calls) = trainer_script(scratch.path());
    // More sensitive than the closed-loop policy: one device is enough.
    let policy = policy(&format!(
        r#"
model = "vibration"
psi_threshold = 0.25
consecutive_windows = 2
min_devices = 1
min_share = 0.2
holdout = "{HOLDOUT_V2}"
trainer = {{ kind = "command", program = "{}" }}
"#,
        script.display()
    ));
    let Some(Loop { ctl, agents }) =
        Loop::on_v1(broker, policy, "calm", DEVICES, WINDOW, 500.0).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    for i in 0..DEVICES {
        let device = format!("calm-{i:02}");
        wait_until(&format!("{device} sends 50 windows"), WAIT, || async {
            ctl.get(&format!("/api/v1/devices/{device}/telemetry?limit=100"))
                .await
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["model_version"] == 1)
                .count()
                >= 50
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(retrainings(&ctl).await, Vec::<Value>::new());
    assert!(!calls.exists(), "the trainer never ran");
    Loop { ctl, agents }.stop().await;
}
on_both_brokers!(a_fleet_without_a_shift_fires_nothing_in_fifty_windows);

/// What a pipeline's webhook endpoint received.
#[derive(Default)]
struct Hook {
    calls: Vec<(Option<String>, Vec<u8>)>,
    /// Answers to give, in order; 200 once they run out.
    answers: Vec<u16>,
}

async fn serve_hook(hook: Arc<Mutex<Hook>>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hooks/retrain",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let hook = hook.clone();
            async move {
                let mut h = hook.lock().unwrap();
                let signed = headers
                    .get(SIGNATURE_HEADER)
                    .map(|v| v.to_str().unwrap().to_string());
                h.calls.push((signed, body.to_vec()));
                let code = if h.answers.is_empty() {
                    200
                } else {
                    h.answers.remove(0)
                };
                StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hooks/retrain")
}

async fn a_webhook_trainer_is_signed_retried_and_alerted_on(broker: BrokerChoice) {
    let scratch = tempfile::tempdir().unwrap();
    let secret = scratch.path().join("webhook.key");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let hook = Arc::new(Mutex::new(Hook {
        answers: vec![503, 502],
        ..Hook::default()
    }));
    let url = serve_hook(hook.clone()).await;
    let policy = policy(&format!(
        r#"
model = "vibration"
consecutive_windows = 1
min_devices = 2
cooldown_s = 1
collect_samples = {{ max_rows = 50, wait_s = 30 }}
trainer = {{ kind = "webhook", url = "{url}", secret_file = "{}", retries = 3 }}
"#,
        secret.display()
    ));
    let Some(Loop { ctl, agents }) = Loop::on_v1(broker, policy, "hook", 2, 400, 400.0).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    for agent in &agents {
        agent.shift.set(1.0);
    }

    // Two 5xx answers, then the pipeline accepts: signed, with the evidence.
    wait_until("the webhook accepts", WAIT, || async {
        retrainings(&ctl).await.first().is_some_and(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("the webhook accepted (HTTP 200)"))
        })
    })
    .await;
    let (signed, body) = {
        let h = hook.lock().unwrap();
        assert_eq!(h.calls.len(), 3, "retried twice");
        h.calls[2].clone()
    };
    assert_eq!(
        signed.as_deref(),
        Some(signature(b"s3cret", &body).as_str())
    );
    let payload: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(payload["model"], "vibration");
    assert_eq!(payload["from_version"], 1);
    assert_eq!(payload["drifting_devices"].as_array().unwrap().len(), 2);
    // The devices' samples were collected first: the pipeline fetches exactly that file.
    let samples = &payload["samples"];
    assert_eq!(samples["rows"], 100, "{samples}");
    assert_eq!(samples["devices"].as_array().unwrap().len(), 2, "{samples}");
    let fetched = ctl
        .http
        .get(samples["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        edgeloop_shared::sha256_hex(&fetched),
        samples["sha256"].as_str().unwrap()
    );
    assert_eq!(fetched.iter().filter(|&&b| b == b'\n').count(), 101);

    // The pipeline publishes its candidate through the gate: the controller rolls it out.
    let reference = ctl.dir.path().join("pipeline-reference.csv");
    std::fs::write(&reference, REFERENCE_V2).unwrap();
    ctl.controller
        .publish(PublishRequest {
            label: Some("from the pipeline".into()),
            class_labels: vec!["normal".into(), "fault".into()],
            gate: Some(QualityGate {
                holdout: Path::new(HOLDOUT_V2),
                policy: Default::default(),
                against: None,
            }),
            ..PublishRequest::new("vibration", 2, MODEL_V2, &reference)
        })
        .await
        .unwrap();
    wait_until("the pipeline's candidate is rolled out", WAIT, || async {
        retrainings(&ctl).await[0]["status"] == "completed"
    })
    .await;
    every_device_on(&ctl, 2, 2).await;

    // v2 drifts too when the machines shift back; this time the pipeline is down for good.
    hook.lock().unwrap().answers = vec![500; 10];
    for agent in &agents {
        agent.shift.set(0.0);
    }
    // With a cooldown of a second, the still-drifting fleet fires a third retraining a
    // second after the second fails: any failed one is the alert's.
    let failed_one = async || {
        retrainings(&ctl)
            .await
            .into_iter()
            .find(|r| r["status"] == "failed")
    };
    wait_until("the second retraining fails", WAIT, || async {
        failed_one().await.is_some()
    })
    .await;
    let failed = failed_one().await.unwrap();
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("failed 4 times; last: HTTP 500"),
        "{failed}"
    );
    ctl.assert_audited("of the retraining alert", |e| {
        e["action"] == "retraining.alert" && e["target"] == format!("retraining/{}", failed["id"])
    })
    .await;
    Loop { ctl, agents }.stop().await;
}
on_both_brokers!(a_webhook_trainer_is_signed_retried_and_alerted_on);

async fn a_trainer_that_writes_an_invalid_model_ends_the_retraining_cleanly(broker: BrokerChoice) {
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("bad-train.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho 'not a model' > \"$EDGELOOP_OUTPUT_DIR/model.onnx\"\ncp '{HOLDOUT_V2}' \"$EDGELOOP_OUTPUT_DIR/reference.csv\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = policy(&format!(
        r#"
model = "vibration"
consecutive_windows = 1
holdout = "{HOLDOUT_V2}"
trainer = {{ kind = "command", program = "{}" }}
"#,
        script.display()
    ));
    let Some(Loop { ctl, agents }) = Loop::on_v1(broker, policy, "bad", 1, 400, 400.0).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // The policy as the controller runs it, defaults filled in.
    let policies = ctl.get("/api/v1/retraining-policies").await;
    assert_eq!(policies[0]["model"], "vibration", "{policies}");
    assert_eq!(policies[0]["trainer"]["kind"], "command", "{policies}");
    assert_eq!(policies[0]["cooldown_s"], 3600, "{policies}");
    assert_eq!(policies[0]["rollout"]["waves"], json!(["1", "10%", "100%"]));
    agents[0].shift.set(1.0);
    wait_until("the retraining fails", WAIT, || async {
        retrainings(&ctl)
            .await
            .first()
            .is_some_and(|r| r["status"] == "failed")
    })
    .await;
    let failed = retrainings(&ctl).await[0].clone();
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .starts_with("cannot publish the candidate: the model does not run with tract"),
        "{failed}"
    );
    let models = ctl.get("/api/v1/models").await;
    assert_eq!(
        models.as_array().unwrap().len(),
        1,
        "nothing published: {models}"
    );
    assert_eq!(ctl.device("bad-00").await.unwrap()["model_version"], 1);
    Loop { ctl, agents }.stop().await;
}
on_both_brokers!(a_trainer_that_writes_an_invalid_model_ends_the_retraining_cleanly);

async fn a_schedule_retrains_without_drift_and_a_missing_candidate_is_rejected(
    broker: BrokerChoice,
) {
    let hook = Arc::new(Mutex::new(Hook::default()));
    let url = serve_hook(hook.clone()).await;
    let policy = policy(&format!(
        r#"
model = "vibration"
schedule_s = 3
candidate_timeout_s = 2
trainer = {{ kind = "webhook", url = "{url}" }}
"#
    ));
    let Some(Loop { ctl, agents }) = Loop::on_v1(broker, policy, "cron", 1, 400, 400.0).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // No shift: the schedule fires; no pipeline publishes, so the retraining is rejected
    // after candidate_timeout_s; the schedule fires again once 3 s have passed since.
    wait_until("two scheduled retrainings", WAIT, || async {
        retrainings(&ctl).await.len() >= 2
    })
    .await;
    let rows = retrainings(&ctl).await;
    let (second, first) = (&rows[0], &rows[1]);
    for r in [first, second] {
        assert_eq!(r["reason"], "schedule: none fired in the last 3 s", "{r}");
        assert_eq!(r["from_version"], 1, "{r}");
    }
    assert_eq!(first["status"], "rejected", "{first}");
    assert!(
        first["detail"]
            .as_str()
            .unwrap()
            .starts_with("no candidate was published within candidate_timeout_s"),
        "{first}"
    );
    let gap = second["fired_ms"].as_u64().unwrap() - first["fired_ms"].as_u64().unwrap();
    assert!(gap >= 3000, "fired {gap} ms apart");
    assert!(hook.lock().unwrap().calls.len() >= 2);
    Loop { ctl, agents }.stop().await;
}
on_both_brokers!(a_schedule_retrains_without_drift_and_a_missing_candidate_is_rejected);

/// Devices whose inputs stay in range but whose labelled accuracy falls: a policy with
/// `min_accuracy` fires on the accuracy the devices report from their feedback, where
/// drift alone (a PSI threshold out of reach) would not.
async fn lost_accuracy_fires_a_retraining_where_drift_alone_would_not(broker: BrokerChoice) {
    let policy = policy(&format!(
        r#"
model = "vibration"
psi_threshold = 1000.0
min_accuracy = 0.9
min_labels = 100
consecutive_windows = 2
holdout = "{HOLDOUT_V2}"
trainer = {{ kind = "command", program = "/bin/false" }}
"#
    ));
    let Some(ctl) = TestController::start_with(broker, move |c| {
        c.retraining_check_s = 1;
        c.retraining = vec![policy];
    })
    .await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("acc-00", 400);
    config.source.rate_hz = 400.0;
    config.source.labels = true;
    config.health.window_s = 4;
    let agent = ctl.spawn_agent_with(config);
    on_v1(&ctl, 1).await;
    every_device_on(&ctl, 1, 1).await;

    // Before the shift: accurate windows with labels, and nothing fires.
    wait_until("labelled windows arrive", WAIT, || async {
        let rows = ctl.controller.store.telemetry("acc-00", 5).await.unwrap();
        rows.iter()
            .filter(|r| r.model_version == 1)
            .filter(|r| {
                r.summary["stats"]["accuracy"]
                    .as_f64()
                    .is_some_and(|a| a > 0.95)
            })
            .count()
            >= 3
    })
    .await;
    assert!(retrainings(&ctl).await.is_empty());

    agent.shift.set(1.0);
    wait_until("a retraining fires", WAIT, || async {
        !retrainings(&ctl).await.is_empty()
    })
    .await;
    let fired = retrainings(&ctl).await[0].clone();
    let reason = fired["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("1 of 1 devices on v1 lost accuracy: below 0.9 on at least 100"),
        "{fired}"
    );
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(lost_accuracy_fires_a_retraining_where_drift_alone_would_not);
