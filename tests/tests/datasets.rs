//! Dataset versions from the devices' input samples: the controller asks by signed
//! command, the agents upload their reservoirs in chunks over MQTT, the controller checks
//! and merges them, and serves the merge with its digest.

use std::time::Duration;

use edgeloop_controller::demo::MODEL_NAME;
use edgeloop_shared::protocol::SAMPLE_CHUNK_BYTES;
use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};
use serde_json::{Value, json};

const WINDOW: u64 = 50;

/// Rows the agent's reservoir holds.
fn kept(agent: &edgeloop_tests::TestAgent) -> u64 {
    let path = agent.config.state_dir.join(edgeloop_agent::reservoir::FILE);
    edgeloop_agent::reservoir::Reservoir::open(&path, agent.config.reservoir_bytes)
        .and_then(|mut r| r.status())
        .map(|s| s.kept)
        .unwrap_or(0)
}

async fn settled(ctl: &TestController, id: u64) -> Value {
    let url = format!("/api/v1/datasets/{id}");
    wait_until(
        &format!("dataset {id} settled"),
        Duration::from_secs(60),
        || async {
            ctl.get(&url).await["parts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["status"] == "complete" || p["status"] == "failed")
        },
    )
    .await;
    ctl.get(&url).await
}

async fn csv(ctl: &TestController, id: u64) -> (String, String, String) {
    let response = ctl
        .http
        .get(ctl.url(&format!("/api/v1/datasets/{id}/csv")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
    let (sha256, devices) = (header("x-edgeloop-sha256"), header("x-edgeloop-devices"));
    let body = response.bytes().await.unwrap();
    assert_eq!(
        sha256,
        edgeloop_shared::sha256_hex(&body),
        "the digest is the body's"
    );
    (String::from_utf8(body.to_vec()).unwrap(), sha256, devices)
}

async fn devices_upload_their_samples_as_a_dataset(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // One agent samples fast enough for its file to take several chunks.
    let mut busy = ctl.agent_config("ds-busy", WINDOW);
    busy.source.rate_hz = 1000.0;
    let a = ctl.spawn_agent_with(busy);
    let b = ctl.spawn_agent("ds-calm", WINDOW);
    ctl.wait_for_model("ds-busy", None).await;
    ctl.wait_for_model("ds-calm", None).await;
    ctl.publish_example(1).await;
    let (status, _) = ctl
        .post_rollout(json!({"model": MODEL_NAME, "version": 1}))
        .await;
    assert_eq!(status, 201);
    ctl.wait_for_model("ds-busy", Some(1)).await;
    ctl.wait_for_model("ds-calm", Some(1)).await;
    // A device that runs no model is not asked for a sample of it.
    let idle = ctl.spawn_agent("ds-idle", WINDOW);
    ctl.wait_for_model("ds-idle", None).await;
    wait_until(
        "a sample of several chunks",
        Duration::from_secs(60),
        || async { kept(&a) >= 3000 && kept(&b) >= 20 },
    )
    .await;

    // Requests that cannot be carried out say why.
    for (body, code, needle) in [
        (
            json!({"model": "nothing"}),
            400,
            "no device of the selection runs model nothing",
        ),
        (
            json!({"devices": ["ghost"]}),
            404,
            "device ghost is not known",
        ),
        (json!({"model": MODEL_NAME, "max_rows": 0}), 400, "max_rows"),
        (json!({"model": MODEL_NAME, "colour": "red"}), 400, "colour"),
        (
            json!({"devices": ["ds-busy"], "group": "g"}),
            400,
            "not both",
        ),
    ] {
        let (got, answer) = ctl.post_as("alice", "/api/v1/datasets", body.clone()).await;
        assert_eq!(got, code, "{body} -> {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
    }

    let (code, requested) = ctl
        .post_as(
            "alice",
            "/api/v1/datasets",
            json!({"model": MODEL_NAME, "reason": "drift on the pumps"}),
        )
        .await;
    assert_eq!(code, 201, "{requested}");
    let id = requested["id"].as_u64().unwrap();
    let asked: Vec<&str> = requested["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        asked,
        ["ds-busy", "ds-calm"],
        "the devices running the model"
    );

    let row = settled(&ctl, id).await;
    let parts = row["parts"].as_array().unwrap();
    for part in parts {
        assert_eq!(part["status"], "complete", "{part}");
        assert_eq!(part["model"], json!({"name": MODEL_NAME, "version": 1}));
    }
    let busy_part = &parts[0];
    let chunks = busy_part["chunks"].as_u64().unwrap();
    assert!(chunks >= 2, "{busy_part}");
    assert_eq!(
        chunks,
        busy_part["bytes"]
            .as_u64()
            .unwrap()
            .div_ceil(SAMPLE_CHUNK_BYTES as u64)
    );

    let (text, sha256, devices) = csv(&ctl, id).await;
    assert_eq!(devices, "ds-busy,ds-calm");
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(header.ends_with(",predicted,label"), "{header}");
    let columns = header.split(',').count();
    let rows: Vec<&str> = lines.collect();
    let declared: u64 = parts.iter().map(|p| p["rows"].as_u64().unwrap()).sum();
    assert_eq!(rows.len() as u64, declared);
    assert!(
        rows.iter().all(|r| r.split(',').count() == columns),
        "every row has every column"
    );
    // The file the CLI would fetch is the same file every time.
    assert_eq!(csv(&ctl, id).await.1, sha256);
    // One device's part alone; a device with no complete part is a 404.
    let calm = ctl
        .http
        .get(ctl.url(&format!("/api/v1/datasets/{id}/csv?devices=ds-calm")))
        .send()
        .await
        .unwrap();
    assert_eq!(calm.headers()["x-edgeloop-devices"], "ds-calm");
    let calm = calm.text().await.unwrap();
    assert_eq!(
        calm.lines().count() as u64,
        parts[1]["rows"].as_u64().unwrap() + 1
    );
    let missing = ctl
        .http
        .get(ctl.url(&format!(
            "/api/v1/datasets/{id}/csv?devices=ds-calm,ds-idle"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A cap on the rows, for one named device.
    let (code, capped) = ctl
        .post_as(
            "bob",
            "/api/v1/datasets",
            json!({"devices": ["ds-calm"], "max_rows": 7}),
        )
        .await;
    assert_eq!(code, 201, "{capped}");
    let capped_id = capped["id"].as_u64().unwrap();
    let row = settled(&ctl, capped_id).await;
    assert_eq!(row["parts"][0]["rows"], 7, "{row}");
    assert_eq!(csv(&ctl, capped_id).await.0.lines().count(), 8);

    let listed = ctl.get("/api/v1/datasets").await;
    let ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [capped_id, id], "newest first");
    let audit = ctl.get("/api/v1/audit").await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "dataset.request"
                && e["actor"] == "alice"
                && e["target"] == format!("dataset/{id}")
                && e["detail"].as_str().unwrap().contains("drift on the pumps")),
        "{audit}"
    );
    a.stop().await;
    b.stop().await;
    idle.stop().await;
    ctl.stop().await;
}

on_both_brokers!(devices_upload_their_samples_as_a_dataset);
