//! Two controller replicas on one external broker and one PostgreSQL database: the shared
//! subscription splits device messages between them, the dispatch lease lets one of them
//! send commands, and nothing is lost or stored twice. Needs both external services
//! (`EDGELOOP_TEST_MQTT_URL` and `EDGELOOP_TEST_PG_URL`); skipped when they are not named.

use std::time::Duration;

use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::demo::{CLASS_LABELS, MODEL_NAME, MODEL_V1, REFERENCE_V1};
use edgeloop_controller::registry::PublishRequest;
use edgeloop_controller::server::Controller;
use edgeloop_tests::{
    BrokerChoice, ControllerEndpoints, Database, TestAgent, agent_config, agent_window_seq,
    test_services, wait_until,
};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_split_ingest_and_one_dispatches() {
    edgeloop_tests::init_tracing();
    let Some((mqtt_url, root, database)) = test_services(BrokerChoice::External).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    if matches!(database, Database::Sqlite) {
        eprintln!("skipped: {} is not set", edgeloop_tests::PG_URL_VAR);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = edgeloop_controller::keys::generate().unwrap();
    let shutdown = CancellationToken::new();
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let config = ControllerConfig {
            data_dir: dir.path().join("shared"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            mqtt_url: mqtt_url.clone(),
            database_url: database.url(),
            mqtt_client_id: format!("{root}-replica-{name}"),
            topic_root: root.clone(),
            resend_after_s: 5,
            ..ControllerConfig::default()
        };
        replicas.push(
            Controller::start(config, key.clone(), shutdown.clone())
                .await
                .unwrap(),
        );
    }
    let (a, b) = (&replicas[0], &replicas[1]);
    let endpoints = ControllerEndpoints {
        mqtt_url: mqtt_url.clone(),
        http_url: a.http_url(),
        trusted_key: key.public().to_text(),
        root: root.clone(),
    };
    let devices = ["r-1", "r-2", "r-3"];
    let agents: Vec<TestAgent> = devices
        .iter()
        .map(|id| {
            TestAgent::spawn(
                agent_config(id, 10, &endpoints, &dir.path().join(id)),
                &shutdown,
            )
        })
        .collect();
    wait_until("devices register", Duration::from_secs(30), || async {
        b.store.devices().await.unwrap().len() == devices.len()
    })
    .await;
    let csv = dir.path().join("reference.csv");
    std::fs::write(&csv, REFERENCE_V1).unwrap();
    a.publish(PublishRequest {
        class_labels: CLASS_LABELS.iter().map(|s| s.to_string()).collect(),
        ..PublishRequest::new(MODEL_NAME, 1, MODEL_V1, &csv)
    })
    .await
    .unwrap();
    // Created through one replica, carried out by whichever holds the dispatch lease.
    let rollout = b.rollout(MODEL_NAME, 1, None).await.unwrap();
    wait_until("the rollout completes", Duration::from_secs(60), || async {
        a.store.rollout(rollout.id).await.unwrap().unwrap().status
            == edgeloop_controller::store::RolloutStatus::Completed
    })
    .await;
    for id in devices {
        let mut seqs: Vec<u64> = a
            .store
            .deployment_events(id, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.command_seq)
            .collect();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            1,
            "{id} got one command, not one per replica: {seqs:?}"
        );
    }

    wait_until("both replicas ingest", Duration::from_secs(30), || async {
        a.stats.snapshot().stored > 20 && b.stats.snapshot().stored > 20
    })
    .await;
    for agent in &agents {
        let id = agent.config.device_id.clone();
        let target = agent_window_seq(&agent.config.state_dir, 1) + 2;
        wait_until(
            &format!("{id} complete up to {target}"),
            Duration::from_secs(30),
            || async {
                let rows = a.store.telemetry(&id, 1000).await.unwrap();
                (1..=target).all(|s| rows.iter().any(|r| r.window_seq == s))
            },
        )
        .await;
        let rows = a.store.telemetry(&id, 1000).await.unwrap();
        let mut seqs: Vec<u64> = rows.iter().map(|r| r.window_seq).collect();
        seqs.sort_unstable();
        let unique = seqs.len();
        seqs.dedup();
        assert_eq!(unique, seqs.len(), "a window stored twice");
    }
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    assert_eq!(sa.malformed + sb.malformed, 0);
    // Each message went to one replica: without the shared subscription both would get
    // everything, and one of them would see every message as a duplicate.
    assert!(
        (sa.duplicates + sb.duplicates) * 10 < sa.stored + sb.stored,
        "{sa:?} {sb:?}"
    );
    for agent in agents {
        agent.stop().await;
    }
    shutdown.cancel();
    for r in replicas {
        r.stop().await;
    }
    database.drop_schema().await;
}
