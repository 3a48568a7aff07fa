//! Key rotation and revocation end to end: a trust document signed offline with a root key
//! is relayed by the controller, applied by the device, and from then on commands and
//! bundles signed by the revoked key are refused while the new key's are accepted.

use std::time::Duration;

use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::topics::Topics;
use edgeloop_shared::trust::{SignedTrust, TrustDocument};
use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};

const WINDOW: u64 = 50;

/// The version of the trust document the agent has applied, from its state directory.
fn applied_version(state_dir: &std::path::Path) -> u64 {
    std::fs::read(state_dir.join("trust.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_u64())
        .unwrap_or(0)
}

/// Deployment reports of one rollout id, as (stage, detail).
async fn reports(ctl: &TestController, device: &str, rollout: u64) -> Vec<(String, String)> {
    ctl.get(&format!("/api/v1/devices/{device}/deployments?limit=100"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["rollout_id"] == rollout)
        .map(|e| {
            (
                e["stage"].as_str().unwrap_or_default().to_string(),
                e["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn post_trust(ctl: &TestController, signed: &SignedTrust) -> (u16, serde_json::Value) {
    let response = ctl
        .http
        .post(ctl.url("/api/v1/trust"))
        .json(signed)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn rotation_and_revocation(broker: BrokerChoice) {
    let root = SecretKey::from_seed([7; 32]);
    let root_public = root.public().to_text();
    let Some(ctl) =
        TestController::start_with(broker, |c| c.root_keys = vec![root_public.clone()]).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let old = ctl.controller.signing_key().clone();
    let new = SecretKey::from_seed([8; 32]);
    let mut config = ctl.agent_config("valve-1", WINDOW);
    config.root_keys = vec![root.public().to_text()];
    let state_dir = config.state_dir.clone();
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("valve-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("valve-1", Some(1)).await;

    // A document signed by the controller's own (signing) key is no root's: the controller
    // checks it as a device would and refuses to relay it.
    let document = |version: u64| TrustDocument {
        version,
        issued_ms: edgeloop_agent::now_ms(),
        root_keys: vec![root.public().to_text()],
        signing_keys: vec![new.public().to_text()],
        revoked: vec![old.id()],
    };
    let (status, body) = post_trust(&ctl, &SignedTrust::sign(&document(1), &old)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not among the trusted keys"),
        "{body}"
    );

    // The root rotates to the new key and revokes the old one.
    let (status, body) = post_trust(&ctl, &SignedTrust::sign(&document(2), &root)).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        body["warning"].as_str().unwrap().contains("revokes"),
        "the controller says its own key is revoked: {body}"
    );
    wait_until(
        "the device applies the document",
        Duration::from_secs(30),
        || async { applied_version(&state_dir) == 2 },
    )
    .await;
    wait_until(
        "the device reports the document's version in its heartbeat",
        Duration::from_secs(30),
        || async { ctl.device("valve-1").await.unwrap()["trust_version"] == 2 },
    )
    .await;
    let (status, _) = post_trust(&ctl, &SignedTrust::sign(&document(2), &root)).await;
    assert_eq!(status, 409, "a document not newer than the current one");
    assert_eq!(ctl.get("/api/v1/trust").await["document"]["version"], 2);
    // Published once, in the audit log; the refused one is not.
    let audit = ctl.get("/api/v1/audit").await;
    let published: Vec<&serde_json::Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "trust.publish")
        .collect();
    assert_eq!(published.len(), 1, "{audit}");
    assert_eq!(published[0]["target"], "trust/2", "{audit}");

    // Commands signed by the revoked key are refused. Not being authentic, nothing in them
    // is echoed: the device's report names no rollout.
    ctl.publish_example(2).await;
    ctl.controller.rollout("vibration", 2, None).await.unwrap();
    ctl.wait_for_report("valve-1", "rejected", "which is revoked")
        .await;
    assert_eq!(ctl.device("valve-1").await.unwrap()["model_version"], 1);

    // A command signed by the new key is carried out, and the bundle, still signed by the
    // revoked key, is then refused by its own verification.
    let v2 = ctl
        .controller
        .store
        .model("vibration", 2)
        .await
        .unwrap()
        .unwrap();
    let command = TestController::deploy_command(
        "valve-1",
        edgeloop_agent::now_ms() + 10_000_000,
        4242,
        2,
        &v2.bundle_sha256,
        v2.bundle_size,
    );
    let raw = ctl.send_command(&command, &new, "rotated-1").await;
    wait_until(
        "the new key's command is carried out up to bundle verification",
        Duration::from_secs(30),
        || async {
            reports(&ctl, "valve-1", 4242)
                .await
                .iter()
                .any(|(stage, _)| stage == "failed")
        },
    )
    .await;
    let events = reports(&ctl, "valve-1", 4242).await;
    assert!(
        events.iter().any(|(stage, _)| stage == "downloading"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(stage, detail)| stage == "failed" && detail.contains("which is revoked")),
        "{events:?}"
    );
    assert_eq!(ctl.device("valve-1").await.unwrap()["model_version"], 1);

    // The retained document is cleared, so that a shared broker keeps nothing of the test.
    let topics = Topics::new(&ctl.root).unwrap();
    raw.client
        .publish(topics.trust(), rumqttc::QoS::AtLeastOnce, true, Vec::new())
        .await
        .unwrap();
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(rotation_and_revocation);
