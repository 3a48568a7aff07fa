//! The health window: a model that passes its smoke test but degrades live metrics is rolled
//! back by the device itself, which reports why; a healthy one is committed once the window
//! has passed. The window survives restarts, and too many of them roll the model back.

use std::time::Duration;

use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};

/// 200 inputs a window at 100 a second: a window every 2 s, PSI noise well under the limit.
const WINDOW: u64 = 200;
const MAX_PSI: f64 = 0.3;

async fn a_model_that_degrades_live_metrics_is_rolled_back(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("guard-1", WINDOW);
    config.health.window_s = 8;
    config.health.max_psi = MAX_PSI;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("guard-1", None).await;

    // The first model has nothing to go back to: committed at once.
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("guard-1", Some(1)).await;
    ctl.wait_for_report("guard-1", "committed", "nothing to go back to")
        .await;

    // v2 was trained on shifted data (its reference profile says so) and passes its smoke
    // test and golden vectors, but what this device sees drifts far from its reference:
    // the health window rolls it back to v1 by itself.
    ctl.publish_example(2).await;
    let v2 = ctl.controller.rollout("vibration", 2, None).await.unwrap();
    ctl.wait_for_report("guard-1", "rolled_back", "drift: a window's PSI reached")
        .await;
    ctl.wait_for_model("guard-1", Some(1)).await;
    let path = format!("/api/v1/rollouts/{}", v2.id);
    wait_until(
        "the rollout shows the rollback",
        Duration::from_secs(10),
        || async {
            let rollout = ctl.get(&path).await;
            rollout["status"] == "failed" && rollout["deployments"][0]["status"] == "rolled_back"
        },
    )
    .await;

    // v3 is trained on what the device sees: it passes the window and is committed.
    ctl.publish_example(3).await;
    let v3 = ctl.controller.rollout("vibration", 3, None).await.unwrap();
    ctl.wait_for_model("guard-1", Some(3)).await;
    ctl.wait_for_report("guard-1", "committed", "healthy for 8 s")
        .await;
    let rollout = ctl.get(&format!("/api/v1/rollouts/{}", v3.id)).await;
    assert_eq!(rollout["status"], "completed", "{rollout}");
    assert_eq!(
        rollout["deployments"][0]["status"], "committed",
        "{rollout}"
    );
    assert_eq!(ctl.device("guard-1").await.unwrap()["model_version"], 3);

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(a_model_that_degrades_live_metrics_is_rolled_back);

/// The health window's record: what a restart resumes from.
fn health_record(state_dir: &std::path::Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(state_dir.join("health.json")).ok()?;
    Some(serde_json::from_slice(&bytes).expect("a health record is JSON"))
}

async fn the_health_window_survives_restarts_and_too_many_roll_back(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("guard-2", WINDOW);
    config.health.window_s = 3600;
    config.health.max_restarts = 1;
    let state_dir = config.state_dir.clone();
    let agent = ctl.spawn_agent_with(config.clone());
    ctl.wait_for_model("guard-2", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("guard-2", Some(1)).await;
    // v3 fits what the device sees (v2's reference data is shifted): only restarts can
    // end its window early.
    ctl.publish_example(2).await;
    ctl.publish_example(3).await;
    let v3 = ctl.controller.rollout("vibration", 3, None).await.unwrap();
    ctl.wait_for_model("guard-2", Some(3)).await;
    wait_until(
        "the window's counts are recorded",
        Duration::from_secs(20),
        || async { health_record(&state_dir).is_some_and(|r| r["inferences"].as_u64() > Some(0)) },
    )
    .await;

    // A restart resumes the window where it was, with the restart counted.
    agent.stop().await;
    let before = health_record(&state_dir).expect("recorded at shutdown");
    assert_eq!(before["restarts"], 0);
    assert_eq!(before["model"]["version"], 3);
    let agent = ctl.spawn_agent_with(config.clone());
    wait_until("the window resumed", Duration::from_secs(20), || async {
        health_record(&state_dir).is_some_and(|r| r["restarts"] == 1)
    })
    .await;
    let resumed = health_record(&state_dir).unwrap();
    assert!(resumed["inferences"].as_u64() >= before["inferences"].as_u64());
    assert!(resumed["elapsed_before_ms"].as_u64() >= before["elapsed_before_ms"].as_u64());
    ctl.wait_for_model("guard-2", Some(3)).await;
    let rollout = ctl.get(&format!("/api/v1/rollouts/{}", v3.id)).await;
    assert_eq!(
        rollout["deployments"][0]["status"], "active",
        "still watched: {rollout}"
    );

    // One restart more than allowed: the device goes back to v1 by itself.
    agent.stop().await;
    let agent = ctl.spawn_agent_with(config.clone());
    ctl.wait_for_report(
        "guard-2",
        "rolled_back",
        "the agent restarted 2 times during the health window, over the limit of 1",
    )
    .await;
    ctl.wait_for_model("guard-2", Some(1)).await;
    assert!(health_record(&state_dir).is_none(), "the window ended");

    // Killed after the switch to v3 and before its window was recorded: the install
    // journal still names v3, which the device serves at start. The window starts then,
    // with the restart counted.
    let again = ctl.controller.rollout("vibration", 3, None).await.unwrap();
    ctl.wait_for_model("guard-2", Some(3)).await;
    wait_until("v3 watched", Duration::from_secs(20), || async {
        health_record(&state_dir).is_some_and(|r| r["rollout_id"] == again.id)
    })
    .await;
    agent.stop().await;
    std::fs::remove_file(state_dir.join("health.json")).unwrap();
    let v3 = ctl
        .controller
        .store
        .model("vibration", 3)
        .await
        .unwrap()
        .unwrap();
    let journal = serde_json::json!({
        "seq": edgeloop_agent::now_ms(),
        "rollback": false,
        "action": {
            "rollout_id": again.id,
            "model": {"name": "vibration", "version": 3},
            "bundle_url": "/artifacts/vibration/3",
            "bundle_sha256": v3.bundle_sha256,
            "bundle_size": v3.bundle_size,
        },
    });
    std::fs::write(
        state_dir.join("install.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    let agent = ctl.spawn_agent_with(config.clone());
    ctl.wait_for_report("guard-2", "active", "active after a restart")
        .await;
    let started = health_record(&state_dir).expect("a window for the install found active");
    assert_eq!(started["restarts"], 1);
    assert_eq!(started["model"]["version"], 3);
    assert_eq!(started["previous_model"]["version"], 1);
    assert!(!state_dir.join("install.json").exists());

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(the_health_window_survives_restarts_and_too_many_roll_back);

/// Trains the vibration classifier on `rows` inputs of the synthetic sensor (seed `seed`),
/// with every label flipped when `inverted`, and publishes it as `version`.
async fn publish_trained(ctl: &TestController, version: u64, seed: u64, inverted: bool) {
    use edgeloop_agent::source::{ShiftControl, VibrationGenerator};
    let mut sensor = VibrationGenerator::new(seed, ShiftControl::default());
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let (row, label) = sensor.labelled_row();
        rows.push(row.iter().map(|&v| f64::from(v)).collect());
        labels.push(if inverted { 1 - label } else { label });
    }
    let features: Vec<String> = edgeloop_agent::source::VIBRATION_FEATURES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let trained = edgeloop_controller::trainer::fit(&features, &rows, &labels, &Default::default())
        .expect("the sensor's data trains");
    let csv = ctl.dir.path().join(format!("trained-{version}.csv"));
    std::fs::write(&csv, &trained.reference_csv).unwrap();
    ctl.controller
        .publish(edgeloop_controller::registry::PublishRequest {
            class_labels: vec!["normal".into(), "fault".into()],
            ..edgeloop_controller::registry::PublishRequest::new(
                "vibration",
                version,
                &trained.onnx,
                &csv,
            )
        })
        .await
        .expect("publish");
}

async fn a_model_less_accurate_on_the_devices_labels_is_rolled_back(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("guard-3", WINDOW);
    config.source.labels = true;
    config.health.window_s = 6;
    config.health.max_accuracy_drop = 0.3;
    config.health.min_labels = 100;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("guard-3", None).await;
    publish_trained(&ctl, 1, 1, false).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("guard-3", Some(1)).await;
    // v1 labels a few hundred inputs at 100 a second: the baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // v2 learnt the labels the wrong way round: same inputs, so no drift, and its smoke
    // test passes (its golden vectors are its own outputs), but the labels the device sees
    // say it is wrong.
    publish_trained(&ctl, 2, 2, true).await;
    ctl.controller.rollout("vibration", 2, None).await.unwrap();
    ctl.wait_for_report("guard-3", "rolled_back", "below the previous model's")
        .await;
    ctl.wait_for_model("guard-3", Some(1)).await;

    // v3 learnt them right: committed, with its latency and accuracy in the report.
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_trained(&ctl, 3, 3, false).await;
    ctl.controller.rollout("vibration", 3, None).await.unwrap();
    ctl.wait_for_report("guard-3", "committed", "labels").await;
    assert_eq!(ctl.device("guard-3").await.unwrap()["model_version"], 3);

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(a_model_less_accurate_on_the_devices_labels_is_rolled_back);
