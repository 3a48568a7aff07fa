//! How bundles reach devices, end to end.
//!
//! Delta bundles: the controller makes one against the previous version at publish, a
//! rollout offers it to devices that report running that version, they install it (also
//! after a restart, and as the base of the next delta), and a device whose model is not
//! the delta's base downloads the full bundle instead.
//!
//! MQTT transfer: a device that cannot reach the controller's HTTP endpoint fetches its
//! bundles, full and delta, in pieces through the broker.

use std::time::Duration;

use edgeloop_agent::now_ms;
use edgeloop_shared::command::{CommandAction, DeltaOffer};
use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};
use serde_json::{Value, json};

const WINDOW: u64 = 50;

/// The device's reports of `stage` in `rollout`.
async fn reports(ctl: &TestController, device: &str, rollout: u64, stage: &str) -> Vec<Value> {
    ctl.get(&format!("/api/v1/devices/{device}/deployments?limit=100"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["rollout_id"] == rollout && e["stage"] == stage)
        .cloned()
        .collect()
}

async fn rollout(ctl: &TestController, body: Value) -> u64 {
    let (status, rollout) = ctl.post_rollout(body).await;
    assert_eq!(status, 201, "{rollout}");
    rollout["id"].as_u64().unwrap()
}

async fn a_device_running_the_base_takes_the_delta(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let based = ctl.spawn_agent("delta-a", WINDOW);
    let fresh = ctl.spawn_agent("delta-b", WINDOW);
    ctl.wait_for_model("delta-a", None).await;
    ctl.wait_for_model("delta-b", None).await;

    ctl.publish_mlp(1, 3).await;
    rollout(
        &ctl,
        json!({"model": "vibration", "version": 1, "devices": ["delta-a"]}),
    )
    .await;
    ctl.wait_for_model("delta-a", Some(1)).await;

    // v2 retrains the head: a delta against v1 is made at publish and served.
    let v2 = ctl.publish_mlp(2, 4).await;
    let delta_v2 = ctl
        .controller
        .store
        .model_deltas("vibration", 2)
        .await
        .unwrap();
    assert_eq!(delta_v2.len(), 1, "{delta_v2:?}");
    assert!(delta_v2[0].bundle_size * 10 < v2.bundle_size);
    let served = ctl
        .http
        .get(ctl.url("/artifacts/vibration/2/delta/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(
        served.bytes().await.unwrap().len() as u64,
        delta_v2[0].bundle_size
    );
    let missing = ctl
        .http
        .get(ctl.url("/artifacts/vibration/2/delta/7"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The device on v1 takes the delta; the device with no model the full bundle.
    let second = rollout(&ctl, json!({"model": "vibration", "version": 2})).await;
    ctl.wait_for_model("delta-a", Some(2)).await;
    ctl.wait_for_model("delta-b", Some(2)).await;
    let downloading = reports(&ctl, "delta-a", second, "downloading").await;
    assert!(
        downloading.iter().all(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("delta bundle of")
                && d.contains(&format!("{} bytes", delta_v2[0].bundle_size))
                && d.contains("against vibration v1"))),
        "{downloading:?}"
    );
    assert!(!downloading.is_empty());
    let downloading = reports(&ctl, "delta-b", second, "downloading").await;
    assert!(
        !downloading.is_empty() && downloading.iter().all(|e| e["detail"].is_null()),
        "{downloading:?}"
    );

    // Restarted, the device serves v2 from its slot without v1, and v2 is the base of the
    // next delta.
    let config = based.config.clone();
    based.stop().await;
    wait_until("delta-a offline", Duration::from_secs(30), || async {
        ctl.device("delta-a").await.unwrap()["online"] == false
    })
    .await;
    let based = ctl.spawn_agent_with(config);
    ctl.wait_for_model("delta-a", Some(2)).await;
    ctl.publish_mlp(3, 5).await;
    let third = rollout(
        &ctl,
        json!({"model": "vibration", "version": 3, "devices": ["delta-a"]}),
    )
    .await;
    ctl.wait_for_model("delta-a", Some(3)).await;
    let downloading = reports(&ctl, "delta-a", third, "downloading").await;
    assert!(
        !downloading.is_empty()
            && downloading.iter().all(|e| e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("against vibration v2"))),
        "{downloading:?}"
    );

    // A command that offers a genuine, signed delta against another model (v3; the device
    // runs v2) while naming the device's own model as its base: the signed manifest names
    // the real base, so the device refuses the delta and installs the full bundle.
    ctl.publish_mlp(4, 6).await;
    let delta_v4 = ctl
        .controller
        .store
        .model_deltas("vibration", 4)
        .await
        .unwrap();
    let mut bases: Vec<u64> = delta_v4.iter().map(|d| d.base_version).collect();
    bases.sort_unstable();
    assert_eq!(
        bases,
        [2, 3],
        "the newest earlier version, and v2, which delta-b runs"
    );
    let against_v3 = delta_v4.iter().find(|d| d.base_version == 3).unwrap();
    let v2_model = ctl.published_bundle("vibration", 2).await;
    let v4 = ctl
        .controller
        .store
        .model("vibration", 4)
        .await
        .unwrap()
        .unwrap();
    let mut command = TestController::deploy_command(
        "delta-b",
        now_ms(),
        4242,
        4,
        &v4.bundle_sha256,
        v4.bundle_size,
    );
    let CommandAction::Deploy(action) = &mut command.action else {
        unreachable!()
    };
    action.delta = Some(DeltaOffer {
        base_sha256: v2_model.manifest.artifact.raw_sha256.clone(),
        bundle_url: "/artifacts/vibration/4/delta/3".into(),
        bundle_sha256: against_v3.bundle_sha256.clone(),
        bundle_size: against_v3.bundle_size,
    });
    let _sender = ctl
        .send_command(&command, ctl.controller.signing_key(), "lying-offer")
        .await;
    ctl.wait_for_report(
        "delta-b",
        "downloading",
        "the delta bundle cannot be used: bundle verification failed: a delta bundle against model",
    )
    .await;
    ctl.wait_for_model("delta-b", Some(4)).await;

    based.stop().await;
    fresh.stop().await;
    ctl.stop().await;
}

on_both_brokers!(a_device_running_the_base_takes_the_delta);

async fn a_device_that_reaches_only_the_broker_gets_bundles_over_mqtt(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("island-1", WINDOW);
    // Nothing listens there: HTTP fails at once and the agent turns to the broker.
    config.controller_url = "http://127.0.0.1:1".into();
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("island-1", None).await;

    ctl.publish_mlp(1, 3).await;
    let first = rollout(&ctl, json!({"model": "vibration", "version": 1})).await;
    ctl.wait_for_model("island-1", Some(1)).await;
    // v2's delta comes the same way.
    ctl.publish_mlp(2, 4).await;
    let second = rollout(&ctl, json!({"model": "vibration", "version": 2})).await;
    ctl.wait_for_model("island-1", Some(2)).await;
    let downloading = reports(&ctl, "island-1", second, "downloading").await;
    assert!(
        downloading.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("delta bundle of"))),
        "{downloading:?}"
    );
    assert_eq!(reports(&ctl, "island-1", first, "active").await.len(), 1);

    // A bundle of several request windows (its weights are incompressible).
    let csv = ctl.dir.path().join("big-reference.csv");
    std::fs::write(&csv, edgeloop_controller::demo::REFERENCE_V1).unwrap();
    let onnx = edgeloop_controller::trainer::random_mlp(4, 2, 3 << 20);
    let big = ctl
        .controller
        .publish(edgeloop_controller::registry::PublishRequest {
            class_labels: edgeloop_controller::demo::CLASS_LABELS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..edgeloop_controller::registry::PublishRequest::new("vibration", 3, &onnx, &csv)
        })
        .await
        .unwrap();
    assert!(
        big.bundle_size > 2 * edgeloop_shared::protocol::MAX_BUNDLE_REQUEST_BYTES,
        "{} bytes",
        big.bundle_size
    );
    rollout(&ctl, json!({"model": "vibration", "version": 3})).await;
    ctl.wait_for_model("island-1", Some(3)).await;

    agent.stop().await;
    ctl.stop().await;
}

on_both_brokers!(a_device_that_reaches_only_the_broker_gets_bundles_over_mqtt);
