//! The walking skeleton end to end: a controller, agents and a broker; models published,
//! rolled out, refused when tampered with; malformed traffic shrugged off.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeloop_shared::bundle::{self, Limits};
use edgeloop_shared::protocol::{Envelope, Format, Message};
use edgeloop_shared::signing::SecretKey;
use edgeloop_shared::topics::{Channel, Topics};
use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};
use serde_json::json;

const WINDOW: u64 = 50;

/// An agent resumes a cut download with a `Range` request.
async fn bundles_are_served_in_ranges(ctl: &TestController) {
    let url = ctl.url("/artifacts/vibration/1");
    let http = reqwest::Client::new();
    let whole = http.get(&url).send().await.unwrap();
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    let whole = whole.bytes().await.unwrap();
    let tail = http
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes 100-{}/{}", whole.len() - 1, whole.len()).as_str()
    );
    assert_eq!(tail.bytes().await.unwrap(), whole[100..]);
    let past = http
        .get(&url)
        .header("range", format!("bytes={}-", whole.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
}

async fn loop_end_to_end(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // A fleet of both spellings: pump-a sends MessagePack (the default), pump-b JSON.
    let a = ctl.spawn_agent("pump-a", WINDOW);
    let mut json_config = ctl.agent_config("pump-b", WINDOW);
    json_config.batching.format = Format::Json;
    let b = ctl.spawn_agent_with(json_config);
    ctl.wait_for_model("pump-a", None).await;
    ctl.wait_for_model("pump-b", None).await;

    // Publish v1 and roll it out to every known device through the API.
    ctl.publish_example(1).await;
    bundles_are_served_in_ranges(&ctl).await;
    let models = ctl.get("/api/v1/models").await;
    assert_eq!(models[0]["name"], "vibration");
    assert_eq!(
        models[0]["features"],
        json!(["rms", "peak", "kurtosis", "temperature"])
    );
    let (status, rollout) = ctl
        .post_rollout(json!({"model": "vibration", "version": 1}))
        .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["deployments"].as_array().unwrap().len(), 2);
    ctl.wait_for_model("pump-a", Some(1)).await;
    ctl.wait_for_model("pump-b", Some(1)).await;

    // Both stream drift summaries of v1.
    for id in ["pump-a", "pump-b"] {
        wait_until(
            &format!("{id} sends two v1 windows"),
            Duration::from_secs(30),
            || async {
                ctl.stored_windows(id)
                    .await
                    .iter()
                    .filter(|w| w.0 == 1)
                    .count()
                    >= 2
            },
        )
        .await;
        let telemetry = ctl
            .get(&format!("/api/v1/devices/{id}/telemetry?limit=1"))
            .await;
        assert_eq!(telemetry.as_array().unwrap().len(), 1);
        assert_eq!(telemetry[0]["model_version"], 1);
        assert!(telemetry[0]["psi_max"].as_f64().unwrap() >= 0.0);
        // The summary reads back whole, whichever spelling it was stored in.
        let features = telemetry[0]["summary"]["stats"]["features"]
            .as_array()
            .unwrap();
        assert_eq!(features.len(), 4, "{id}");
        assert!(
            !features[0]["counts"].as_array().unwrap().is_empty(),
            "{id}"
        );
    }

    // Then v2, to one device by name and then to the other.
    ctl.publish_example(2).await;
    let (status, _) = ctl
        .post_rollout(json!({"model": "vibration", "version": 2, "devices": ["pump-a"]}))
        .await;
    assert_eq!(status, 201);
    ctl.wait_for_model("pump-a", Some(2)).await;
    assert_eq!(
        ctl.device("pump-b").await.unwrap()["model_version"],
        1,
        "only the named device moves"
    );
    let (status, _) = ctl
        .post_rollout(json!({"model": "vibration", "version": 2}))
        .await;
    assert_eq!(status, 201);
    ctl.wait_for_model("pump-b", Some(2)).await;
    for id in ["pump-a", "pump-b"] {
        wait_until(
            &format!("{id} sends a v2 window"),
            Duration::from_secs(30),
            || async { ctl.stored_windows(id).await.iter().any(|w| w.0 == 2) },
        )
        .await;
    }
    let rollouts = ctl.get("/api/v1/rollouts").await;
    assert!(
        rollouts
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "completed"),
        "{rollouts}"
    );

    // Every stored window is whole: a full window has exactly WINDOW samples, the only
    // shorter one per version is the last, flushed when the next model took over; and the
    // bin counts of every feature add up to the window's samples.
    for id in ["pump-a", "pump-b"] {
        let windows = ctl.stored_windows(id).await;
        let mut by_version: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        for (version, seq, samples, totals) in &windows {
            assert!(
                *samples > 0 && *samples <= WINDOW,
                "{id} v{version} #{seq}: {samples} samples"
            );
            assert!(
                totals.iter().all(|t| t == samples),
                "{id} v{version} #{seq}: bins {totals:?} vs {samples}"
            );
            by_version
                .entry(*version)
                .or_default()
                .push((*seq, *samples));
        }
        let v1 = &by_version[&1];
        assert!(v1.len() >= 2);
        assert_eq!(
            v1.iter().map(|w| w.0).collect::<Vec<_>>(),
            (1..=v1.len() as u64).collect::<Vec<_>>(),
            "no window lost or doubled"
        );
        assert!(v1[..v1.len() - 1].iter().all(|w| w.1 == WINDOW), "{v1:?}");
        assert!(by_version[&2].iter().all(|w| w.1 == WINDOW));

        // Each hour is scored as one window of all its inputs: PSI is convex in the
        // distribution, so the hour's is at most its worst window's.
        let mut merged_hours = 0;
        let hours = ctl
            .get(&format!("/api/v1/devices/{id}/telemetry/hourly"))
            .await;
        let hours = hours.as_array().unwrap();
        assert!(!hours.is_empty());
        for hour in hours {
            let psi_hour = hour["psi_hour"].as_f64().expect("rescored");
            // Stored scores are rounded to six significant digits.
            let psi_max = hour["psi_max"].as_f64().unwrap();
            assert!(psi_hour <= psi_max * (1.0 + 1e-5) + 1e-6, "{hour}");
            let stats_psi = hour["stats"]["psi_max"].as_f64().unwrap();
            assert!(
                (stats_psi - psi_hour).abs() <= psi_hour * 1e-5 + 1e-6,
                "{hour}"
            );
            // Windows of random inputs differ: their union is strictly closer to the
            // reference than the worst of them.
            if hour["windows"].as_u64().unwrap() >= 2 {
                assert!(psi_hour < psi_max * (1.0 - 1e-4), "{hour}");
                merged_hours += 1;
            }
        }
        assert!(merged_hours > 0, "an hour of several windows: {hours:?}");
    }

    // Anti-rollback: a plain rollout of the older version is refused by the device; a
    // rollback rollout of it is carried out.
    let (status, plain) = ctl
        .post_rollout(json!({"model": "vibration", "version": 1, "devices": ["pump-a"]}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(plain["rollback"], false);
    let path = format!("/api/v1/rollouts/{}", plain["id"]);
    wait_until(
        "the device refuses to go back without a rollback command",
        Duration::from_secs(30),
        || async { ctl.get(&path).await["deployments"][0]["status"] == "rejected" },
    )
    .await;
    let refused = ctl.get(&path).await;
    let detail = refused["deployments"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("only a rollback command"), "{detail}");
    assert_eq!(ctl.device("pump-a").await.unwrap()["model_version"], 2);
    let (status, rollback) = ctl
        .post_rollout(
            json!({"model": "vibration", "version": 1, "devices": ["pump-a"], "rollback": true}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(rollback["rollback"], true);
    ctl.wait_for_model("pump-a", Some(1)).await;

    // Switching to another model and back does not reset anti-rollback: pump-a has run v2,
    // so a plain rollout of v1 is refused while another model serves; v2 itself, which it
    // left by a rollback, may be deployed again.
    ctl.publish_example_as("gearbox", 1, Default::default())
        .await;
    let (status, _) = ctl
        .post_rollout(json!({"model": "gearbox", "version": 1, "devices": ["pump-a"]}))
        .await;
    assert_eq!(status, 201);
    wait_until("pump-a serves gearbox", Duration::from_secs(30), || async {
        ctl.device("pump-a").await.unwrap()["model_name"] == "gearbox"
    })
    .await;
    let (status, plain) = ctl
        .post_rollout(json!({"model": "vibration", "version": 1, "devices": ["pump-a"]}))
        .await;
    assert_eq!(status, 201);
    let path = format!("/api/v1/rollouts/{}", plain["id"]);
    wait_until(
        "the device refuses to go below the highest version it has run",
        Duration::from_secs(30),
        || async { ctl.get(&path).await["deployments"][0]["status"] == "rejected" },
    )
    .await;
    let refused = ctl.get(&path).await;
    let detail = refused["deployments"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("below version 2"), "{detail}");
    assert_eq!(ctl.device("pump-a").await.unwrap()["model_name"], "gearbox");
    let (status, _) = ctl
        .post_rollout(json!({"model": "vibration", "version": 2, "devices": ["pump-a"]}))
        .await;
    assert_eq!(status, 201);
    ctl.wait_for_model("pump-a", Some(2)).await;

    // The API refuses what it cannot do, with a status that says why.
    let (status, body) = ctl
        .post_rollout(json!({"model": "vibration", "version": 9}))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = ctl
        .post_rollout(json!({"model": "vibration", "version": 2, "devices": ["ghost"]}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = ctl.post_rollout(json!({"model": "vibration"})).await;
    assert_eq!(status, 400);

    a.stop().await;
    b.stop().await;
    ctl.stop().await;
}
on_both_brokers!(loop_end_to_end);

/// Which part of the bundle file a test tampers with.
#[derive(Debug, Clone, Copy)]
enum Part {
    Manifest,
    Artifact,
    Signature,
}

async fn tampered_bundles_and_forged_commands_are_refused(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let agent = ctl.spawn_agent("press-1", WINDOW);
    ctl.wait_for_model("press-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("press-1", Some(1)).await;

    // An attacker who controls the artifact store and the database, but not the signing
    // key, swaps a bundle for one with a single flipped byte and fixes up the digest the
    // command will carry. The agent's own bundle verification must catch it.
    let cases = [
        (2, Part::Manifest, "manifest signature check failed"),
        (3, Part::Artifact, "compressed artifact SHA-256"),
        (4, Part::Signature, "manifest signature check failed"),
    ];
    for (version, part, expected) in cases {
        ctl.publish_example(version).await;
        let published = ctl
            .controller
            .store
            .model("vibration", version)
            .await
            .unwrap()
            .unwrap();
        let path = ctl
            .controller
            .artifacts
            .path("vibration", version, &published.bundle_sha256);
        let mut bytes = std::fs::read(&path).unwrap();
        let layout = bundle::layout(&bytes, &Limits::default()).unwrap();
        let at = match part {
            Part::Manifest => layout.manifest.start + layout.manifest.len() / 2,
            Part::Artifact => layout.artifact.start + layout.artifact.len() / 2,
            Part::Signature => layout.signature.start + 7,
        };
        bytes[at] ^= 0x04;
        let forged_sha = edgeloop_shared::sha256_hex(&bytes);
        std::fs::write(
            ctl.controller
                .artifacts
                .path("vibration", version, &forged_sha),
            &bytes,
        )
        .unwrap();
        ctl.set_model_digest("vibration", version, &forged_sha)
            .await;

        let rollout = ctl
            .controller
            .rollout("vibration", version, None)
            .await
            .unwrap();
        let path = format!("/api/v1/rollouts/{}", rollout.id);
        wait_until(
            &format!("{part:?} tampering reported"),
            Duration::from_secs(30),
            || async { ctl.get(&path).await["status"] == "failed" },
        )
        .await;
        let detail = ctl.get(&path).await["deployments"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains(expected), "{part:?}: {detail}");

        // The previous model keeps serving: still v1, and its drift windows keep coming.
        let before =
            ctl.get("/api/v1/devices/press-1/telemetry?limit=1").await[0]["msg_id"].clone();
        wait_until("v1 keeps serving", Duration::from_secs(20), || async {
            let latest = ctl.get("/api/v1/devices/press-1/telemetry?limit=1").await;
            latest[0]["msg_id"] != before && latest[0]["model_version"] == 1
        })
        .await;
        assert_eq!(ctl.device("press-1").await.unwrap()["model_version"], 1);
    }

    // A deploy command signed by a key the device does not trust is refused and reported.
    let stranger = SecretKey::from_seed([42; 32]);
    // Its sequence number is huge: if the device recorded it, later commands would fail.
    let command =
        TestController::deploy_command("press-1", u64::MAX / 2, 999, 5, &"00".repeat(32), 1);
    let _attacker = ctl.send_command(&command, &stranger, "forged-1").await;
    ctl.wait_for_report("press-1", "rejected", "not among the trusted keys")
        .await;

    // And a genuine update still goes through afterwards: the forged sequence number did
    // not poison the device's replay protection, and the device is healthy.
    ctl.publish_example(5).await;
    ctl.controller.rollout("vibration", 5, None).await.unwrap();
    ctl.wait_for_model("press-1", Some(5)).await;

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(tampered_bundles_and_forged_commands_are_refused);

async fn malformed_payloads_are_counted_and_nothing_stops(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let agent = ctl.spawn_agent("fan-1", WINDOW);
    ctl.wait_for_model("fan-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("fan-1", Some(1)).await;

    let topics = Topics::new(&ctl.root).unwrap();
    let raw = ctl.raw_client("fuzzer").await;
    let telemetry = topics.device("fan-1", Channel::Telemetry).unwrap();
    let commands = topics.device("fan-1", Channel::Commands).unwrap();
    let spoofed = Envelope::new(
        "other-device",
        "spoof-1",
        1,
        Message::Status(edgeloop_shared::protocol::DeviceStatus {
            online: true,
            ..Default::default()
        }),
    )
    .encode();
    // Towards the controller: garbage, JSON of the wrong shape, a future version, and a
    // device claiming to be another one.
    raw.publish(&telemetry, b"\x00\xff not json".to_vec()).await;
    raw.publish(&telemetry, br#"{"v":1,"device_id":"fan-1"}"#.to_vec())
        .await;
    raw.publish(&telemetry, br#"{"v":7,"whatever":true}"#.to_vec())
        .await;
    raw.publish(&topics.device("fan-1", Channel::Status).unwrap(), spoofed)
        .await;
    // A batch whose header promises more than the body holds (a zstd bomb's shape).
    let mut lying = br#"{"v":1,"kind":"batch","device_id":"fan-1","count":1,"encoding":"zstd","bytes":4000000}"#.to_vec();
    lying.push(b'\n');
    lying.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
    raw.publish(&telemetry, lying).await;
    // Towards the agent: garbage and a status message where a command belongs.
    raw.publish(&commands, b"{{{{".to_vec()).await;
    raw.publish(&commands, vec![0u8; 1000]).await;

    wait_until(
        "controller counts five malformed messages",
        Duration::from_secs(20),
        || async {
            ctl.get("/api/v1/stats").await["malformed"]
                .as_u64()
                .unwrap()
                >= 5
        },
    )
    .await;
    wait_until(
        "agent reports two malformed messages",
        Duration::from_secs(20),
        || async {
            ctl.device("fan-1").await.unwrap()["malformed_messages"]
                .as_u64()
                .unwrap()
                >= 2
        },
    )
    .await;
    assert!(
        ctl.device("other-device").await.is_none(),
        "a spoofed device id is not registered"
    );

    // Both keep working: new drift windows arrive and get stored.
    let stored = ctl.get("/api/v1/stats").await["stored"].as_u64().unwrap();
    let before = ctl.get("/api/v1/devices/fan-1/telemetry?limit=1").await[0]["msg_id"].clone();
    wait_until(
        "telemetry keeps flowing",
        Duration::from_secs(20),
        || async {
            ctl.get("/api/v1/devices/fan-1/telemetry?limit=1").await[0]["msg_id"] != before
        },
    )
    .await;
    assert!(ctl.get("/api/v1/stats").await["stored"].as_u64().unwrap() > stored);
    assert_eq!(ctl.device("fan-1").await.unwrap()["model_version"], 1);

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(malformed_payloads_are_counted_and_nothing_stops);

/// With `accept_unknown_devices = false` a device is heard only once registered; until
/// then its messages are counted and dropped, and it keeps them, so nothing is lost.
async fn unknown_devices_are_not_heard_until_registered(broker: BrokerChoice) {
    let Some(ctl) = TestController::start_with(broker, |c| c.accept_unknown_devices = false).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("late-1", WINDOW);
    config.outbox.receipt_timeout_s = 1;
    let agent = ctl.spawn_agent_with(config);
    wait_until(
        "the stranger is counted and keeps its heartbeats",
        Duration::from_secs(20),
        || async {
            ctl.get("/api/v1/stats").await["unknown_device"]
                .as_u64()
                .unwrap()
                >= 1
                && edgeloop_tests::agent_outbox(&agent.config.state_dir, "status").len() >= 3
        },
    )
    .await;
    assert!(
        ctl.device("late-1").await.is_none(),
        "not registered by talking"
    );
    let held = edgeloop_tests::agent_outbox(&agent.config.state_dir, "status");

    ctl.controller
        .store
        .register_devices(&["late-1".to_string()])
        .await
        .unwrap();
    ctl.wait_for_model("late-1", None).await;
    wait_until(
        "what it held is delivered",
        Duration::from_secs(60),
        || async {
            let left = edgeloop_tests::agent_outbox(&agent.config.state_dir, "status");
            held.iter().all(|id| !left.contains(id))
        },
    )
    .await;
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(unknown_devices_are_not_heard_until_registered);

/// `POST /api/v1/models` publishes as `edgeloop model publish` does: the model checked with
/// tract, profiled, gated on a holdout when one is given, signed and audited; bad requests
/// get a 400 naming what is wrong, a version that is not new a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_published_through_the_rest_api() {
    use base64::Engine as _;
    use edgeloop_controller::demo::{CLASS_LABELS, MODEL_V1, MODEL_V2, REFERENCE_V1, REFERENCE_V2};
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let http = reqwest::Client::new();
    let url = ctl.url("/api/v1/models");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let publish = |body: serde_json::Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .post(&url)
                .header("x-edgeloop-actor", "alice")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let v1 = json!({
        "name": "vibration",
        "version": 1,
        "label": "first",
        "onnx_base64": b64(MODEL_V1),
        "reference_csv": REFERENCE_V1,
        "labels": CLASS_LABELS,
        "latency_budget_ms": 50.0,
        "targets": ["x86_64", "aarch64"],
        "drift": {"method": "ks", "ks_alpha": 0.01},
    });
    let (status, row) = publish(v1.clone()).await;
    assert_eq!(status, 201, "{row}");
    assert_eq!(
        (row["name"].as_str(), row["version"].as_u64()),
        (Some("vibration"), Some(1))
    );
    assert_eq!(row["label"], "first");
    assert_eq!(
        row["signed_by"],
        ctl.controller.signing_key().id().to_string()
    );
    assert_eq!(ctl.get("/api/v1/models").await[0]["version"], 1);
    // The bundle it signed is served, and says what the request asked for.
    let opened = ctl.published_bundle("vibration", 1).await;
    assert_eq!(opened.manifest.requirements.targets, ["x86_64", "aarch64"]);
    assert_eq!(opened.manifest.requirements.latency_budget_ms, Some(50.0));
    assert_eq!(opened.manifest.drift.unwrap().ks_alpha, 0.01);

    // The same version again: not newer.
    let (status, error) = publish(v1.clone()).await;
    assert_eq!(status, 409, "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("not above"),
        "{error}"
    );

    // Bad requests name their fault.
    let mut bad = v1.clone();
    bad["version"] = json!(5);
    bad["onnx_base64"] = json!("not base64!");
    let (status, error) = publish(bad.clone()).await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("onnx_base64"),
        "{error}"
    );
    bad["onnx_base64"] = json!(b64(b"these bytes are no ONNX graph"));
    let (status, error) = publish(bad.clone()).await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("tract"),
        "{error}"
    );
    let mut unknown = v1.clone();
    unknown["signing_key"] = json!("mine");
    let (status, error) = publish(unknown).await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("signing_key"),
        "{error}"
    );
    let mut categorical = v1.clone();
    categorical["version"] = json!(5);
    categorical["categorical"] = json!(["site"]);
    let (status, error) = publish(categorical).await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("`site`"),
        "{error}"
    );
    let mut gate_alone = v1.clone();
    gate_alone["version"] = json!(5);
    gate_alone["gate"] = json!({"metric": "f1"});
    let (status, error) = publish(gate_alone).await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().unwrap().contains("holdout_csv"),
        "{error}"
    );

    // v2 with a holdout of the new regime passes the gate against v1; lineage recorded.
    let holdout = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../controller/assets/vibration/holdout_v2.csv"
    ))
    .unwrap();
    let (status, row) = publish(json!({
        "name": "vibration",
        "version": 2,
        "onnx_base64": b64(MODEL_V2),
        "reference_csv": REFERENCE_V2,
        "labels": CLASS_LABELS,
        "parent_version": 1,
        "training_data_sha256": edgeloop_shared::sha256_hex(REFERENCE_V2.as_bytes()),
        "holdout_csv": holdout,
        "gate": {"metric": "accuracy", "tolerance": 0.01},
    }))
    .await;
    assert_eq!(status, 201, "{row}");
    let lineage = &row["lineage"];
    assert_eq!(lineage["parent_version"], 1);
    assert_eq!(
        lineage["training_data_sha256"],
        edgeloop_shared::sha256_hex(REFERENCE_V2.as_bytes())
    );
    assert!(
        lineage["gates"]["quality"]
            .as_str()
            .unwrap()
            .starts_with("passed"),
        "{lineage}"
    );
    let audit = ctl.get("/api/v1/audit").await;
    let published: Vec<_> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "model.publish")
        .map(|e| (e["actor"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        published,
        [
            ("alice", "model/vibration/2"),
            ("alice", "model/vibration/1")
        ]
    );
    ctl.stop().await;
}

/// A persistent session keeps the subscriptions of an earlier configuration (here another
/// topic root): what arrives on them is not for the device, so it is dropped and the topic
/// unsubscribed, never taken for a command or a malformed one.
async fn topics_of_an_earlier_session_are_dropped(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let old_root = format!("{}-old", ctl.root);
    let mut config = ctl.agent_config("roamer-1", WINDOW);
    config.topic_root = old_root.clone();
    let agent = ctl.spawn_agent_with(config.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.stop().await;
    config.topic_root = ctl.root.clone();
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("roamer-1", None).await;

    let raw = ctl.raw_client("old-root").await;
    let old = Topics::new(&old_root).unwrap();
    for channel in [Channel::Commands, Channel::Receipts, Channel::Chunks] {
        raw.publish(&old.device("roamer-1", channel).unwrap(), b"{{{{".to_vec())
            .await;
    }
    // A malformed message on its own command topic, as a marker: counted.
    let commands = Topics::new(&ctl.root)
        .unwrap()
        .device("roamer-1", Channel::Commands)
        .unwrap();
    raw.publish(&commands, b"{{{{".to_vec()).await;
    let malformed = || async {
        ctl.device("roamer-1").await.unwrap()["malformed_messages"]
            .as_u64()
            .unwrap()
    };
    wait_until(
        "the agent counts the marker",
        Duration::from_secs(20),
        || async { malformed().await >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(malformed().await, 1, "only the marker");
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(topics_of_an_earlier_session_are_dropped);
