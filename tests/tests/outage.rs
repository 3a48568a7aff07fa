//! A broker outage of a minute loses nothing: agents keep producing into their outboxes
//! while the broker is down, and every drift window arrives exactly once after it returns.
//!
//! The test runs its own Mosquitto (the `mosquitto` binary, as on the development and CI
//! machines) on a free port, with persistence, so that it can stop and restart it. Without
//! the binary it is skipped, unless `EDGELOOP_TEST_MQTT_URL` says real services are
//! expected: then it fails.

use std::time::Duration;

use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::server::Controller;
use edgeloop_tests::{Mosquitto, TestAgent, free_port, wait_for_port, wait_until};
use tokio_util::sync::CancellationToken;

const WINDOW: u64 = 20;
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_no_drift_window_and_stores_none_twice() {
    edgeloop_tests::init_tracing();
    if !Mosquitto::available() {
        eprintln!("skipped: no mosquitto binary");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let store_dir = Mosquitto::writable_dir(dir.path(), "mosquitto");
    let config = Mosquitto::write_config(
        dir.path(),
        port,
        &format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\n",
            store_dir.display()
        ),
    );
    let broker = Mosquitto::start(&config);
    wait_for_port(port).await;

    let shutdown = CancellationToken::new();
    let key = edgeloop_controller::keys::generate().unwrap();
    let controller = Controller::start(
        ControllerConfig {
            data_dir: dir.path().join("controller"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            mqtt_url: format!("mqtt://127.0.0.1:{port}"),
            mqtt_client_id: "outage-controller".into(),
            resend_after_s: 2,
            ..ControllerConfig::default()
        },
        key,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let csv = dir.path().join("reference.csv");
    std::fs::write(&csv, edgeloop_controller::demo::REFERENCE_V1).unwrap();
    controller
        .publish(edgeloop_controller::registry::PublishRequest {
            name: "vibration",
            version: 1,
            label: None,
            onnx: edgeloop_controller::demo::MODEL_V1,
            reference_csv: &csv,
            label_column: None,
            class_labels: vec![],
            created_ms: edgeloop_agent::now_ms(),
        })
        .await
        .unwrap();

    let mut agent_config = edgeloop_agent::AgentConfig {
        device_id: "pump-1".into(),
        broker_url: controller.mqtt_url.clone(),
        controller_url: controller.http_url(),
        trusted_keys: vec![controller.signing_key().public().to_text()],
        state_dir: dir.path().join("agent"),
        heartbeat_interval_s: 1,
        drift_window_samples: WINDOW,
        ..edgeloop_agent::AgentConfig::default()
    };
    agent_config.source.rate_hz = 100.0;
    // A publish the broker accepted but lost across its restart is recovered by the
    // agent's resend: after 10 s, then 20 s, 40 s (the default starts at 30 s).
    agent_config.outbox.receipt_timeout_s = 10;
    agent_config.api.listen.clear();
    let agent = TestAgent::spawn(agent_config, &shutdown);
    let store = controller.store.clone();
    wait_until("device registers", Duration::from_secs(20), || async {
        store.devices().await.unwrap().len() == 1
    })
    .await;
    controller.rollout("vibration", 1, None).await.unwrap();
    let windows = || async {
        let rows = store.telemetry("pump-1", 1000).await.unwrap();
        let mut seqs: Vec<u64> = rows
            .iter()
            .filter(|r| r.model_version == 1)
            .map(|r| r.window_seq)
            .collect();
        seqs.sort_unstable();
        seqs
    };
    wait_until("windows flow", Duration::from_secs(20), || async {
        windows().await.len() >= 3
    })
    .await;

    // Down for a minute: about three hundred windows are produced meanwhile.
    broker.stop();
    let before = windows().await.len();
    tokio::time::sleep(OUTAGE).await;
    let broker = Mosquitto::start(&config);
    wait_for_port(port).await;

    // Everything produced during the outage arrives, and keeps arriving. Resent messages
    // may arrive after newer ones, so completeness is awaited, not assumed at a count.
    // The agent may take up to its 30 s backoff ceiling to reconnect.
    let target = before + 300;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        let seqs = windows().await;
        if seqs.len() >= target && seqs.iter().copied().eq(1..=seqs.len() as u64) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<u64> = (1..=seqs.last().copied().unwrap_or(0))
                .filter(|s| seqs.binary_search(s).is_err())
                .take(20)
                .collect();
            panic!(
                "the backlog did not arrive whole: {} windows stored (want {target}), \
                 first missing {missing:?}; agent outbox holds {} telemetry entries; \
                 controller ingest {:?}",
                seqs.len(),
                edgeloop_tests::agent_outbox(&agent.config.state_dir, "telemetry").len(),
                controller.stats.snapshot(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seqs = windows().await;
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every window exactly once, none missing");
    assert!(
        store
            .telemetry("pump-1", 1000)
            .await
            .unwrap()
            .iter()
            .all(|r| r.samples == WINDOW),
        "every window whole"
    );

    agent.stop().await;
    shutdown.cancel();
    controller.stop().await;
    drop(broker);
}
