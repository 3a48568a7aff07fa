//! A broker outage loses nothing: agents keep producing into their outboxes while the
//! broker is down, and every drift window arrives exactly once after it returns, also when
//! the devices are back before the controller has subscribed again (Mosquitto 2.0 does not
//! keep shared subscriptions across a restart, so the broker drops what arrives meanwhile,
//! and only the devices' resends recover it).
//!
//! The tests run their own Mosquitto (the `mosquitto` binary, as on the development and CI
//! machines) on a free port, with persistence, so that they can stop and restart it.
//! Without the binary they are skipped, unless `EDGELOOP_TEST_MQTT_URL` says real services
//! are expected: then they fail.

use std::path::PathBuf;
use std::time::Duration;

use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::server::Controller;
use edgeloop_shared::signing::SecretKey;
use edgeloop_tests::{Mosquitto, TestAgent, free_port, wait_for_port, wait_until};
use tokio_util::sync::CancellationToken;

const WINDOW: u64 = 20;
/// The agent's receipt timeout: a message the broker accepted but dropped goes again after
/// this (the default is 30 s).
const RECEIPT_TIMEOUT_S: u64 = 10;

/// A private broker, a controller using it with a shared subscription (the default for an
/// external broker), and one agent whose v1 windows flow.
struct Fleet {
    dir: tempfile::TempDir,
    port: u16,
    broker_config: PathBuf,
    broker: Option<Mosquitto>,
    key: SecretKey,
    controller: Option<Controller>,
    agent: TestAgent,
    shutdown: CancellationToken,
}

impl Fleet {
    async fn start() -> Option<Self> {
        edgeloop_tests::init_tracing();
        if !Mosquitto::available() {
            eprintln!("skipped: no mosquitto binary");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let store_dir = Mosquitto::writable_dir(dir.path(), "mosquitto");
        let broker_config = Mosquitto::write_config(
            dir.path(),
            port,
            &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                store_dir.display()
            ),
        );
        let broker = Mosquitto::start(&broker_config);
        wait_for_port(port).await;
        let shutdown = CancellationToken::new();
        let key = edgeloop_controller::keys::generate().unwrap();
        let controller = Self::controller(dir.path(), port, &key, &shutdown).await;
        let csv = dir.path().join("reference.csv");
        std::fs::write(&csv, edgeloop_controller::demo::REFERENCE_V1).unwrap();
        controller
            .publish(edgeloop_controller::registry::PublishRequest::new(
                "vibration",
                1,
                edgeloop_controller::demo::MODEL_V1,
                &csv,
            ))
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
        agent_config.outbox.receipt_timeout_s = RECEIPT_TIMEOUT_S;
        agent_config.api.listen.clear();
        let agent = TestAgent::spawn(agent_config, &shutdown);
        let store = controller.store.clone();
        wait_until("device registers", Duration::from_secs(20), || async {
            store.devices().await.unwrap().len() == 1
        })
        .await;
        controller.rollout("vibration", 1, None).await.unwrap();
        let fleet = Fleet {
            dir,
            port,
            broker_config,
            broker: Some(broker),
            key,
            controller: Some(controller),
            agent,
            shutdown,
        };
        wait_until("windows flow", Duration::from_secs(20), || async {
            fleet.windows().await.len() >= 3
        })
        .await;
        Some(fleet)
    }

    /// A controller on the fleet's data directory, broker and client id.
    async fn controller(
        dir: &std::path::Path,
        port: u16,
        key: &SecretKey,
        shutdown: &CancellationToken,
    ) -> Controller {
        Controller::start(
            ControllerConfig {
                data_dir: dir.join("controller"),
                http_addr: "127.0.0.1:0".parse().unwrap(),
                mqtt_url: format!("mqtt://127.0.0.1:{port}"),
                mqtt_client_id: "outage-controller".into(),
                resend_after_s: 2,
                ..ControllerConfig::default()
            },
            key.clone(),
            shutdown.child_token(),
        )
        .await
        .unwrap()
    }

    fn controller_ref(&self) -> &Controller {
        self.controller.as_ref().expect("a controller runs")
    }

    /// The stored v1 window sequence numbers, sorted.
    async fn windows(&self) -> Vec<u64> {
        let rows = self
            .controller_ref()
            .store
            .telemetry("pump-1", 1000)
            .await
            .unwrap();
        let mut seqs: Vec<u64> = rows
            .iter()
            .filter(|r| r.model_version == 1)
            .map(|r| r.window_seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    fn stop_broker(&mut self) {
        self.broker.take().expect("the broker runs").stop();
    }

    async fn start_broker(&mut self) {
        self.broker = Some(Mosquitto::start(&self.broker_config));
        wait_for_port(self.port).await;
    }

    /// Waits until at least `target` windows are stored with no hole, then checks that each
    /// was stored once and whole. On failure, says what is missing and where it is.
    async fn expect_complete(&self, target: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seqs = self.windows().await;
            if seqs.len() >= target && seqs.iter().copied().eq(1..=seqs.len() as u64) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let missing: Vec<u64> = (1..=seqs.last().copied().unwrap_or(0))
                    .filter(|s| seqs.binary_search(s).is_err())
                    .take(20)
                    .collect();
                panic!(
                    "the backlog did not arrive whole within {within:?}: {} windows stored \
                     (want {target}), first missing {missing:?}; agent outbox holds {} \
                     telemetry entries; controller ingest {:?}",
                    seqs.len(),
                    edgeloop_tests::agent_outbox(&self.agent.config.state_dir, "telemetry").len(),
                    self.controller_ref().stats.snapshot(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seqs = self.windows().await;
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "every window exactly once, none missing");
        assert!(
            self.controller_ref()
                .store
                .telemetry("pump-1", 1000)
                .await
                .unwrap()
                .iter()
                .all(|r| r.samples == WINDOW),
            "every window whole"
        );
    }

    async fn stop(mut self) {
        self.agent.stop().await;
        self.shutdown.cancel();
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
        drop(self.broker.take());
        drop(self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_no_drift_window_and_stores_none_twice() {
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    // Down for a minute: about three hundred windows are produced meanwhile.
    fleet.stop_broker();
    let before = fleet.windows().await.len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    fleet.start_broker().await;

    // Everything produced during the outage arrives, and keeps arriving. Resent messages
    // may arrive after newer ones, so completeness is awaited, not assumed at a count.
    // The agent may take up to its 30 s backoff ceiling to reconnect.
    fleet
        .expect_complete(before + 300, Duration::from_secs(150))
        .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_the_broker_drops_before_the_controller_resubscribes_are_sent_again() {
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    // The controller goes, then the broker restarts without its shared subscription; the
    // agent is back at once and publishes for 15 s into a broker that drops everything.
    let controller = fleet.controller.take().unwrap();
    let before = {
        let rows = controller.store.telemetry("pump-1", 1000).await.unwrap();
        rows.iter().filter(|r| r.model_version == 1).count()
    };
    controller.stop().await;
    fleet.stop_broker();
    fleet.start_broker().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    fleet.controller =
        Some(Fleet::controller(fleet.dir.path(), fleet.port, &fleet.key, &fleet.shutdown).await);

    // Each dropped window goes again once its own receipt is overdue, whatever became of
    // the others. A window dropped twice (before and while the controller was away) waits
    // twice the timeout for its third send: all of them within four receipt timeouts.
    fleet
        .expect_complete(before + 60, Duration::from_secs(4 * RECEIPT_TIMEOUT_S))
        .await;
    fleet.stop().await;
}
