//! The agent's local inference API, with a real controller rolling models out to it: JSON
//! and binary requests, clear 400s for bad inputs, the drift window fed by API inputs, and a
//! model update swapped in under a stream of requests without a single failure.

use std::time::Duration;

use edgeloop_agent::config::SourceKind;
use edgeloop_tests::{BrokerChoice, TestController, free_port, wait_until};
use serde_json::{Value, json};

const WINDOW: u64 = 40;
const NORMAL: [f32; 4] = [1.0, 3.0, 3.0, 45.0];
const FAULT: [f32; 4] = [1.9, 8.5, 6.5, 56.0];

/// Sends a request; its status and JSON body (null when there is none).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    answer(http.post(url).json(&body)).await
}

/// Posts `body` as a browser does for a page of another site.
async fn cross_site(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    answer(
        http.post(url)
            .header("sec-fetch-site", "cross-site")
            .json(&body),
    )
    .await
}

/// Posts `values` as a binary body of the given shape (`X-Edgeloop-Shape`).
async fn post_f32(http: &reqwest::Client, url: &str, shape: &str, values: &[f32]) -> (u16, Value) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let request = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("x-edgeloop-shape", shape)
        .body(bytes);
    answer(request).await
}

/// The agent's Prometheus text.
async fn metrics(http: &reqwest::Client, base: &str) -> String {
    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

fn classes(response: &Value) -> Vec<u64> {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["class"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_infers_refuses_clearly_feeds_drift_and_swaps_without_failing() {
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("api-1", WINDOW);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.api.max_body_bytes = 4096;
    config.source.kind = SourceKind::Api;
    let agent = ctl.spawn_agent_with(config);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    ctl.wait_for_model("api-1", None).await;

    // No model yet: unavailable, not an error of the caller.
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let (status, _) = post(
        &http,
        &format!("{base}/v1/infer"),
        json!({"rows": [NORMAL]}),
    )
    .await;
    assert_eq!(status, 503);

    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("api-1", Some(1)).await;
    let health: Value = get_json(&http, &format!("{base}/healthz")).await;
    assert_eq!(health["model"]["version"], 1, "{health}");

    // Rows, named instances and a binary body give the same answers.
    let infer = format!("{base}/v1/infer");
    let (status, rows) = post(&http, &infer, json!({"rows": [NORMAL, FAULT]})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(classes(&rows), vec![0, 1]);
    assert_eq!(rows["model"]["version"], 1);
    assert_eq!(rows["outputs"][1]["label"], "fault");
    assert!(rows["request_id"].as_str().is_some_and(|id| id.len() == 36));
    let named =
        |r: [f32; 4]| json!({"rms": r[0], "peak": r[1], "kurtosis": r[2], "temperature": r[3]});
    let (status, instances) = post(
        &http,
        &infer,
        json!({"instances": [named(NORMAL), named(FAULT)]}),
    )
    .await;
    assert_eq!(status, 200, "{instances}");
    assert_eq!(classes(&instances), vec![0, 1]);
    let both: Vec<f32> = NORMAL.iter().chain(&FAULT).copied().collect();
    let (status, binary) = post_f32(&http, &infer, "2x4", &both).await;
    assert_eq!(status, 200, "{binary}");
    assert_eq!(classes(&binary), vec![0, 1]);
    assert_eq!(binary["outputs"][0]["scores"], rows["outputs"][0]["scores"]);

    // Bad input: 400 naming the input, what it expects and what came.
    for (body, needles) in [
        (
            json!({"rows": [[1.0, 2.0, 3.0]]}),
            vec!["input `", "[N, 4]", "3 values"],
        ),
        (json!({"rows": [[1.0, null, 3.0, 4.0]]}), vec!["`peak`"]),
        (
            json!({"instances": [{"rms": 1.0, "peak": 3.0, "kurtosis": 3.0, "temp": 45.0}]}),
            vec!["`temp`", "temperature"],
        ),
        (
            json!({"instances": [{"rms": 1.0, "peak": "high", "kurtosis": 3.0, "temperature": 45.0}]}),
            vec!["`peak`", "not a number"],
        ),
        (json!({"rows": []}), vec!["no rows"]),
        (json!({"tensor": [1, 2]}), vec!["rows"]),
    ] {
        let (status, response) = post(&http, &infer, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {response}");
        let message = response["error"].as_str().unwrap();
        for needle in needles {
            assert!(message.contains(needle), "{body}: {message}");
        }
    }
    let (status, wrong_shape) = post_f32(&http, &infer, "1x5", &[0.0; 5]).await;
    assert_eq!(status, 400);
    let message = wrong_shape.to_string();
    assert!(
        message.contains("[1, 5]") && message.contains("[N, 4]"),
        "{message}"
    );
    for shape in ["4611686018427387904x4", "2x4x1", "twox4"] {
        let response = http
            .post(&infer)
            .header("content-type", "application/octet-stream")
            .header("x-edgeloop-shape", shape)
            .body(vec![0u8; 32])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{shape}");
    }
    let oversize = http
        .post(&infer)
        .json(&json!({"rows": vec![NORMAL; 400]}))
        .send()
        .await
        .unwrap();
    assert_eq!(oversize.status().as_u16(), 413);
    let (status, _) = post(&http, &infer, json!({"rows": [NORMAL]})).await;
    assert_eq!(status, 200, "the agent keeps serving after bad requests");

    // API inputs fill the drift window: the only inputs of an agent without a source.
    let sent_so_far = 2 + 2 + 2 + 1;
    for _ in 0..(WINDOW as usize - sent_so_far) {
        let (status, _) = post(&http, &infer, json!({"rows": [NORMAL]})).await;
        assert_eq!(status, 200);
    }
    wait_until(
        "an API-fed window is stored",
        Duration::from_secs(20),
        || async {
            ctl.stored_windows("api-1")
                .await
                .iter()
                .any(|w| w.0 == 1 && w.2 == WINDOW)
        },
    )
    .await;

    // v2 rolls out while a client keeps asking: every request succeeds, answered by v1
    // until the swap and by v2 after it.
    ctl.publish_example(2).await;
    let hammer = {
        let (http, infer) = (http.clone(), infer.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let (status, response) = post(&http, &infer, json!({"rows": [FAULT]})).await;
                let version = response["model"]["version"].as_u64();
                seen.push((status, version));
                if version == Some(2) && seen.iter().filter(|s| s.1 == Some(2)).count() >= 20 {
                    return seen;
                }
                assert!(seen.len() < 100_000, "v2 never answered");
            }
        })
    };
    ctl.controller.rollout("vibration", 2, None).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), hammer)
        .await
        .expect("v2 answers within a minute")
        .unwrap();
    assert!(
        seen.iter().all(|s| s.0 == 200),
        "a request failed during the swap: {seen:?}"
    );
    let first_v2 = seen.iter().position(|s| s.1 == Some(2)).unwrap();
    assert!(first_v2 > 0, "v1 answered before the swap");
    assert!(
        seen[first_v2..].iter().all(|s| s.1 == Some(2)),
        "v1 answered after v2 had"
    );

    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    assert_eq!(model["version"], 2);
    assert_eq!(
        model["features"],
        json!(["rms", "peak", "kurtosis", "temperature"])
    );
    let metrics = metrics(&http, &base).await;
    assert!(
        metrics.contains("edgeloop_agent_model_info{name=\"vibration\",version=\"2\"} 1"),
        "{metrics}"
    );
    let ok: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgeloop_agent_requests_total{outcome=\"ok\"} "))
        .unwrap()
        .parse()
        .unwrap();
    // Three two-row requests, then single rows up to the window, then the stream.
    let requests = 3 + (WINDOW - 6) + seen.len() as u64;
    assert_eq!(ok, requests, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "edgeloop_agent_rows_total {}",
            WINDOW + seen.len() as u64
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeloop_agent_requests_total{outcome=\"bad_request\"} 10"),
        "{metrics}"
    );

    agent.stop().await;
    ctl.stop().await;
}

/// Ground truth sent to `POST /v1/feedback` reaches the controller as the window's
/// confusion counts and accuracy, with the window's latency histogram and drift scores;
/// bad feedback is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_labels_reach_the_controller_as_confusion_counts_and_accuracy() {
    const WINDOW: u64 = 20;
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("feedback-1", WINDOW);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.api.feedback_memory = 100;
    config.source.kind = SourceKind::Api;
    let agent = ctl.spawn_agent_with(config);
    let base = format!("http://127.0.0.1:{port}");
    let (infer, feedback) = (format!("{base}/v1/infer"), format!("{base}/v1/feedback"));
    let http = reqwest::Client::new();
    // Known to the controller before the rollout names it.
    ctl.wait_for_model("feedback-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("feedback-1", Some(1)).await;

    // 19 predictions labelled as they come: the 10 normal ones rightly, 4 of the 9 faults
    // wrongly ("normal"), by name and by index. Then the 20th input closes the window.
    let mut first_id = String::new();
    for i in 0..19 {
        let row = if i < 10 { NORMAL } else { FAULT };
        let (status, response) = post(&http, &infer, json!({"rows": [row]})).await;
        assert_eq!(status, 200, "{response}");
        let id = response["request_id"].as_str().unwrap().to_string();
        let label = match i {
            0..10 => json!("normal"),
            10..14 => json!(0),
            _ => json!("fault"),
        };
        if i == 18 {
            // Sent for a page of another origin, the label is refused, and is still the
            // prediction's to take below.
            let body = json!({"request_id": id, "label": label});
            assert_eq!(cross_site(&http, &feedback, body).await.0, 403);
        }
        let (status, answer) =
            post(&http, &feedback, json!({"request_id": id, "label": label})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["correct"], json!(!(10..14).contains(&i)), "{answer}");
        if i == 0 {
            first_id = id;
        }
    }

    // Bad feedback: each refused with its own reason, none counted.
    for (body, status, needle) in [
        (
            json!({"request_id": first_id, "label": "normal"}),
            409,
            "already labelled",
        ),
        (json!({"request_id": "nope", "label": 1}), 404, "unknown"),
        (
            json!({"request_id": first_id, "label": "broken"}),
            400,
            "`broken`",
        ),
        (
            json!({"request_id": first_id, "label": 7}),
            400,
            "class index",
        ),
        (
            json!({"request_id": first_id, "label": 1, "row": 3}),
            400,
            "no row 3",
        ),
        (json!({"request": first_id}), 400, "request_id"),
    ] {
        let (got, response) = post(&http, &feedback, body.clone()).await;
        assert_eq!(got, status, "{body} -> {response}");
        let message = response["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
    }
    // An input a browser sends for a page of another origin is refused and not counted (the
    // window below closes at the 20th input all the same).
    let (status, answer) = cross_site(&http, &infer, json!({"rows": [FAULT]})).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("another origin"),
        "{answer}"
    );

    let (status, _) = post(&http, &infer, json!({"rows": [NORMAL]})).await;
    assert_eq!(status, 200);
    let summary = full_window(&ctl, "feedback-1", WINDOW).await;
    let stats = &summary["stats"];
    // confusion[label][predicted]: 4 faults labelled normal
    assert_eq!(stats["confusion"], json!([[10, 4], [0, 5]]), "{stats}");
    let accuracy = stats["accuracy"].as_f64().unwrap();
    // Scores keep six significant digits on the wire.
    assert!((accuracy - 15.0 / 19.0).abs() < 1e-6, "{accuracy}");
    let latencies: u64 = stats["latency_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(latencies, WINDOW, "one latency per inferred input");
    let rms = &stats["features"][0];
    assert_eq!(rms["moments"]["count"], WINDOW);
    assert!(
        rms["ks"].as_f64().is_some() && rms["wasserstein"].as_f64().is_some(),
        "{rms}"
    );
    assert!(rms["js"].as_f64().is_some());

    let metrics = metrics(&http, &base).await;
    assert!(
        metrics.contains("edgeloop_agent_feedback_total{outcome=\"ok\"} 19"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgeloop_agent_feedback_total{outcome=\"refused\"} 6"),
        "{metrics}"
    );
    // The sample kept for retraining holds every input (far below its budget) with the
    // predictions and the labels that came back, written within a second.
    let path = agent.config.state_dir.join(edgeloop_agent::reservoir::FILE);
    let mut reservoir = wait_until_some(Duration::from_secs(10), || async {
        let mut reservoir = edgeloop_agent::reservoir::Reservoir::open(&path, 1 << 20).ok()?;
        let status = reservoir.status().ok()?;
        ((status.seen, status.kept, status.labelled) == (WINDOW, WINDOW, 19)).then_some(reservoir)
    })
    .await;
    let (_, samples) = reservoir.samples().unwrap();
    let wrong = samples
        .iter()
        .filter(|s| s.label.is_some() && s.label != s.predicted)
        .count();
    assert_eq!(wrong, 4, "the 4 faults labelled normal");
    agent.stop().await;
    ctl.stop().await;
}

/// The first drift summary of a window of `samples` inputs `device` sent, waiting up to
/// 20 s for it.
/// Asserts that a drift summary of 3-channel images counted each image as its channels'
/// means and deviations, none of them missing.
fn assert_counted_by_channel(summary: &Value) {
    let features: Vec<&str> = summary["stats"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        features,
        [
            "c0.mean", "c0.std", "c1.mean", "c1.std", "c2.mean", "c2.std"
        ],
        "{summary}"
    );
    for feature in summary["stats"]["features"].as_array().unwrap() {
        assert_eq!(feature["nan"], 0, "{feature}");
    }
}

/// A fixture tensor's numbers (`{"data": [...]}` in the compatibility suite's files).
fn fixture_numbers(v: &Value) -> Vec<f64> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

async fn full_window(ctl: &TestController, device: &str, samples: u64) -> Value {
    wait_until_some(Duration::from_secs(20), || async {
        let rows = ctl.controller.store.telemetry(device, 10).await.unwrap();
        rows.into_iter()
            .find(|r| r.samples == samples)
            .map(|r| r.summary)
    })
    .await
}

/// Polls `probe` until it gives a value.
async fn wait_until_some<T, F, Fut>(timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts an agent fed only by its local API, publishes `onnx` as vibration v1 (classes
/// normal and fault, reference data `reference_csv`), rolls it out and waits until the
/// agent serves it. Returns the agent and its API's base URL.
async fn serving_over_api(
    ctl: &TestController,
    id: &str,
    onnx: &[u8],
    reference_csv: &str,
) -> (edgeloop_tests::TestAgent, String) {
    serving_classes_over_api(ctl, id, onnx, reference_csv, &["normal", "fault"]).await
}

/// [`serving_over_api`] for a model of the classes `labels`.
async fn serving_classes_over_api(
    ctl: &TestController,
    id: &str,
    onnx: &[u8],
    reference_csv: &str,
    labels: &[&str],
) -> (edgeloop_tests::TestAgent, String) {
    let mut config = ctl.agent_config(id, WINDOW);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.source.kind = SourceKind::Api;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model(id, None).await;
    let csv = ctl.dir.path().join(format!("{id}.csv"));
    std::fs::write(&csv, reference_csv).unwrap();
    ctl.controller
        .publish(edgeloop_controller::registry::PublishRequest {
            class_labels: labels.iter().map(|l| l.to_string()).collect(),
            ..edgeloop_controller::registry::PublishRequest::new("vibration", 1, onnx, &csv)
        })
        .await
        .unwrap();
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model(id, Some(1)).await;
    (agent, format!("http://127.0.0.1:{port}"))
}

/// A model whose input is i64: the numbers a request carries are cast after a check that
/// each is a whole number; a fraction is a 400 naming the feature and the type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_of_integer_inputs_is_served_and_fractions_are_refused() {
    use tract_onnx::pb::tensor_proto::DataType;
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let onnx = edgeloop_controller::trainer::typed_classifier(DataType::Int64);
    let reference = edgeloop_controller::trainer::typed_reference_csv();
    let (agent, base) = serving_over_api(&ctl, "api-3", &onnx, &reference).await;
    let http = reqwest::Client::new();
    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    assert_eq!(model["inputs"][0]["dtype"], "i64", "{model}");

    let infer = format!("{base}/v1/infer");
    let (status, answer) = post(&http, &infer, json!({"rows": [[1, 0, 1, 1], [0, 1, 0, 0]]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(classes(&answer).len(), 2);
    let (status, refused) = post(&http, &infer, json!({"rows": [[1, 0.5, 1, 1]]})).await;
    assert_eq!(status, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("`peak` is 0.5") && error.contains("i64"),
        "{error}"
    );
    // And it keeps serving.
    let (status, _) = post(&http, &infer, json!({"rows": [[0, 0, 0, 1]]})).await;
    assert_eq!(status, 200);

    agent.stop().await;
    ctl.stop().await;
}

/// A model of two inputs (the compatibility suite's: `sensors` f32 [N,3] and `counts` i64
/// [N,2]) is published from one CSV of its five features, the inputs' in order: the
/// manifest declares each input with its features, and the API takes rows by input name or
/// as one row of features, answers onnxruntime's scores, and refuses an unknown or missing
/// input, a wrong width and a fractional count by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_of_two_inputs_is_published_from_one_table_and_served_by_input_name() {
    let compat = compat_dir();
    let onnx = std::fs::read(compat.join("two_inputs.onnx")).unwrap();
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(compat.join("two_inputs.json")).unwrap()).unwrap();
    let reference = std::fs::read_to_string(compat.join("two_inputs_reference.csv")).unwrap();
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let (agent, base) =
        serving_classes_over_api(&ctl, "api-5", &onnx, &reference, &["low", "mid", "high"]).await;
    let http = reqwest::Client::new();

    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    let inputs = &model["inputs"];
    assert_eq!(inputs[0]["name"], "sensors", "{model}");
    assert_eq!(inputs[0]["dtype"], "f32", "{model}");
    assert_eq!(inputs[0]["shape"], json!([null, 3]), "{model}");
    assert_eq!(
        inputs[0]["names"],
        json!(["temperature", "pressure", "flow"]),
        "{model}"
    );
    assert_eq!(inputs[1]["name"], "counts", "{model}");
    assert_eq!(inputs[1]["dtype"], "i64", "{model}");
    assert_eq!(inputs[1]["names"], json!(["starts", "faults"]), "{model}");

    let (sensors, counts) = (
        fixture_numbers(&fixture["inputs"][0]),
        fixture_numbers(&fixture["inputs"][1]),
    );
    let sensor_rows: Vec<&[f64]> = sensors.chunks(3).collect();
    let count_rows: Vec<&[f64]> = counts.chunks(2).collect();
    let rows: Vec<Vec<f64>> = sensor_rows
        .iter()
        .zip(&count_rows)
        .map(|(s, c)| s.iter().chain(c.iter()).copied().collect())
        .collect();
    let infer = format!("{base}/v1/infer");
    let (status, by_name) = post(
        &http,
        &infer,
        json!({"inputs": {"counts": count_rows, "sensors": sensor_rows}}),
    )
    .await;
    assert_eq!(status, 200, "{by_name}");
    let want = fixture_numbers(&fixture["outputs"][0]);
    for (r, output) in by_name["outputs"].as_array().unwrap().iter().enumerate() {
        for (c, score) in output["scores"].as_array().unwrap().iter().enumerate() {
            let got = score.as_f64().unwrap();
            assert!(
                (got - want[r * 3 + c]).abs() < 1e-4,
                "row {r} class {c}: {got} vs {}",
                want[r * 3 + c]
            );
        }
    }
    let (status, as_rows) = post(&http, &infer, json!({ "rows": rows })).await;
    assert_eq!(status, 200, "{as_rows}");
    assert_eq!(as_rows["outputs"], by_name["outputs"]);

    for (body, needles) in [
        (
            json!({"inputs": {"sensors": [[1.0, 2.0, 3.0]], "count": [[1, 2]]}}),
            vec!["`count` is not an input", "`sensors`, `counts`"],
        ),
        (
            json!({"inputs": {"sensors": [[1.0, 2.0, 3.0]]}}),
            vec!["input `counts`", "missing"],
        ),
        (
            json!({"inputs": {"sensors": [[1.0, 2.0]], "counts": [[1, 2]]}}),
            vec!["input `sensors`", "[N, 3]", "2 values"],
        ),
        (
            json!({"inputs": {"sensors": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], "counts": [[1, 2]]}}),
            vec!["`sensors` and `counts` give 2 and 1 rows"],
        ),
        (
            json!({"inputs": {"sensors": [[1.0, 2.0, 3.0]], "counts": [[1, 2.5]]}}),
            vec!["`faults` is 2.5", "i64"],
        ),
        (
            json!({"rows": [[1.0, 2.0, 3.0, 1.0]]}),
            vec!["inputs `sensors` + `counts`", "[N, 5]", "4 values"],
        ),
    ] {
        let (status, response) = post(&http, &infer, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {response}");
        let message = response["error"].as_str().unwrap();
        for needle in needles {
            assert!(message.contains(needle), "{body}: {message}");
        }
    }
    // It keeps serving.
    let (status, _) = post(&http, &infer, json!({ "rows": rows })).await;
    assert_eq!(status, 200);

    agent.stop().await;
    ctl.stop().await;
}

/// A scikit-learn classifier exported by skl2onnx (outputs `label` and `probabilities`,
/// from the agent's compatibility suite) is published, rolled out and served: the manifest
/// declares both outputs and what each means, and the API answers onnxruntime's classes
/// and probabilities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sklearn_classifier_with_label_and_probabilities_outputs_is_served() {
    let compat = compat_dir();
    let onnx = std::fs::read(compat.join("gradient_boosting.onnx")).unwrap();
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(compat.join("gradient_boosting.json")).unwrap())
            .unwrap();
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();

    // Reference data in the range the model was trained on (make_classification, × 3 + 5).
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut csv = String::from("a,b,c,d\n");
    for _ in 0..300 {
        let row: Vec<String> = (0..4)
            .map(|_| format!("{:.4}", 5.0 + 12.0 * (uniform() - 0.5)))
            .collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let (agent, base) = serving_over_api(&ctl, "api-4", &onnx, &csv).await;
    let http = reqwest::Client::new();

    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    let outputs = &model["outputs"];
    assert_eq!(outputs[0]["name"], "probabilities", "{model}");
    assert_eq!(outputs[0]["kind"], "class_scores", "{model}");
    assert_eq!(outputs[0]["names"], json!(["normal", "fault"]), "{model}");
    assert_eq!(outputs[1]["name"], "label", "{model}");
    assert_eq!(outputs[1]["kind"], "class_labels", "{model}");
    assert_eq!(outputs[1]["dtype"], "i64", "{model}");

    let input = fixture_numbers(&fixture["inputs"][0]);
    let rows: Vec<Vec<f64>> = input.chunks(4).map(<[f64]>::to_vec).collect();
    let (status, answer) = post(&http, &format!("{base}/v1/infer"), json!({ "rows": rows })).await;
    assert_eq!(status, 200, "{answer}");
    let expected: Vec<u64> = fixture["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(classes(&answer), expected, "{answer}");
    let probabilities = fixture["outputs"][1]["data"].as_array().unwrap();
    for (r, output) in answer["outputs"].as_array().unwrap().iter().enumerate() {
        for (c, score) in output["scores"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (
                score.as_f64().unwrap(),
                probabilities[r * 2 + c].as_f64().unwrap(),
            );
            assert!(
                (got - want).abs() < 1e-4,
                "row {r} class {c}: {got} vs {want}"
            );
        }
    }

    agent.stop().await;
    ctl.stop().await;
}

/// A camera's recorded images, an NPY array (N, 3, 32, 32), replayed into the
/// compatibility suite's CNN: each image is inferred and counted as its channels'
/// statistics, and full windows of them reach the controller with every image predicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_array_of_images_feeds_an_image_classifier() {
    let onnx = std::fs::read(compat_dir().join("cnn.onnx")).unwrap();
    let recorded = recorded_images();
    const IMAGE: usize = 3 * 32 * 32;
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let npy = ctl.dir.path().join("recorded.npy");
    std::fs::write(
        &npy,
        edgeloop_shared::npy::f32_array(&[20, 3, 32, 32], &recorded),
    )
    .unwrap();
    let agent = camera_replaying(&ctl, "camera-2", &npy, &npy, &onnx, None).await;

    let summary = wait_until_some(Duration::from_secs(30), || async {
        let rows = ctl
            .controller
            .store
            .telemetry("camera-2", 10)
            .await
            .unwrap();
        rows.into_iter()
            .find(|r| r.model_name == "camera" && r.samples == WINDOW)
            .map(|r| r.summary)
    })
    .await;
    assert_counted_by_channel(&summary);
    // Every image of the window was inferred: its predicted classes add up to the window.
    let predicted: u64 = summary["stats"]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(predicted, WINDOW, "{summary}");

    // The images are kept for retraining, and a dataset of them is an NPY file of records
    // whose `x` are the recorded images, each with the class predicted for it.
    let (code, requested) = ctl
        .post_as("alice", "/api/v1/datasets", json!({"model": "camera"}))
        .await;
    assert_eq!(code, 201, "{requested}");
    let id = requested["id"].as_u64().unwrap();
    let url = format!("/api/v1/datasets/{id}");
    wait_until(
        "the camera's sample uploaded",
        Duration::from_secs(30),
        || async { ctl.get(&url).await["parts"][0]["status"] == "complete" },
    )
    .await;
    let response = ctl
        .http
        .get(ctl.url(&format!("{url}/file")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-edgeloop-format"], "npy");
    let file = response.bytes().await.unwrap();
    let sample = edgeloop_shared::npy::read_sample(&file).unwrap();
    assert_eq!(sample.row_shape, [3, 32, 32]);
    assert!(
        sample.rows >= WINDOW as usize,
        "{} images kept",
        sample.rows
    );
    for record in file[sample.data_start..].chunks(IMAGE * 4 + 16) {
        let x: Vec<f32> = record[..IMAGE * 4]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(
            recorded.chunks(IMAGE).any(|image| image == x),
            "a kept input is one of the recorded images"
        );
        let predicted = f64::from_le_bytes(record[IMAGE * 4..][..8].try_into().unwrap());
        assert!((0.0..10.0).contains(&predicted) && predicted.fract() == 0.0);
    }
    let response = ctl
        .http
        .get(ctl.url(&format!("{url}/csv")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409, "a tensor dataset is no CSV");

    // The dataset, once labelled, is a holdout for the quality gate as it is. Unlabelled,
    // it is refused; labelled with v1's own answers, v2 (the same model) matches v1.
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let v2 = |holdout: &[u8]| {
        json!({
            "name": "camera",
            "version": 2,
            "onnx_base64": b64(&onnx),
            "reference_npy_base64": b64(&std::fs::read(&npy).unwrap()),
            "holdout_npy_base64": b64(holdout),
        })
    };
    let (code, refused) = ctl.post_as("alice", "/api/v1/models", v2(&file)).await;
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("record 0: has no label"),
        "{refused}"
    );
    let mut labelled = file.to_vec();
    for record in labelled[sample.data_start..].chunks_mut(IMAGE * 4 + 16) {
        let (predicted, label) = record[IMAGE * 4..].split_at_mut(8);
        label.copy_from_slice(predicted);
    }
    let (code, row) = ctl.post_as("alice", "/api/v1/models", v2(&labelled)).await;
    assert_eq!(code, 201, "{row}");
    let verdict = row["lineage"]["gates"]["quality"].as_str().unwrap();
    assert!(
        verdict.starts_with("passed: accuracy 1.0000 against 1.0000"),
        "{verdict}"
    );

    agent.stop().await;
    ctl.stop().await;
}

/// A camera `device` replaying the recorded images in `npy` (at `rate_hz`, or the source's
/// default rate), serving camera v1 of `onnx`, published with the images in `reference`.
async fn camera_replaying(
    ctl: &TestController,
    device: &str,
    npy: &std::path::Path,
    reference: &std::path::Path,
    onnx: &[u8],
    rate_hz: Option<f64>,
) -> edgeloop_tests::TestAgent {
    let mut config = ctl.agent_config(device, WINDOW);
    config.source.kind = SourceKind::Npy;
    config.source.path = Some(npy.to_path_buf());
    config.source.repeat = true;
    if let Some(rate_hz) = rate_hz {
        config.source.rate_hz = rate_hz;
    }
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model(device, None).await;
    ctl.controller
        .publish(edgeloop_controller::registry::PublishRequest::new(
            "camera", 1, onnx, reference,
        ))
        .await
        .unwrap();
    ctl.controller.rollout("camera", 1, None).await.unwrap();
    ctl.wait_for_model(device, Some(1)).await;
    agent
}

/// Twenty recorded 3×32×32 images for the compatibility suite's CNN: the fixture's two,
/// each number shifted a little.
fn recorded_images() -> Vec<f32> {
    const IMAGE: usize = 3 * 32 * 32;
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(compat_dir().join("cnn.json")).unwrap()).unwrap();
    let images: Vec<f32> = fixture_numbers(&fixture["inputs"][0])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    (0..20)
        .flat_map(|n| {
            images[(n % 2) * IMAGE..][..IMAGE]
                .iter()
                .enumerate()
                .map(move |(i, x)| x + ((i * 7 + n * 13) % 11) as f32 * 0.01)
        })
        .collect()
}

/// A camera's image model is retrained from the camera's own images, with no operator: v1
/// was published with brighter reference images than the camera sends, so its windows
/// drift; the retraining collects the camera's sample (an NPY of its images), the command
/// trainer gets it as `samples.npy` and leaves a model with `reference.npy` (the images
/// the camera sends), and the candidate is gated on an NPY holdout of labelled images
/// before it rolls out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_model_is_retrained_from_the_cameras_own_images() {
    const IMAGE: usize = 3 * 32 * 32;
    let cnn = compat_dir().join("cnn.onnx");
    let onnx = std::fs::read(&cnn).unwrap();
    let recorded = recorded_images();
    let scratch = tempfile::tempdir().unwrap();
    let npy = scratch.path().join("recorded.npy");
    std::fs::write(
        &npy,
        edgeloop_shared::npy::f32_array(&[20, 3, 32, 32], &recorded),
    )
    .unwrap();
    let v1_reference = scratch.path().join("brighter.npy");
    let brighter: Vec<f32> = recorded.iter().map(|x| x * 0.5 + 3.0).collect();
    std::fs::write(
        &v1_reference,
        edgeloop_shared::npy::f32_array(&[20, 3, 32, 32], &brighter),
    )
    .unwrap();
    // The holdout: the recorded images labelled with the CNN's own answers.
    let spec = edgeloop_shared::bundle::TensorSpec::f32_tensor("image", &[3, 32, 32]);
    let plan = edgeloop_agent::runtime::Plan::compile_tensor(&onnx, &spec).unwrap();
    let labels: Vec<f64> = recorded
        .chunks(IMAGE)
        .map(|x| plan.infer(x, &[]).unwrap().class as f64)
        .collect();
    let records =
        recorded
            .chunks(IMAGE)
            .zip(&labels)
            .map(|(x, &l)| edgeloop_shared::npy::SampleRecord {
                x,
                predicted: None,
                label: Some(l),
            });
    let holdout = scratch.path().join("holdout.npy");
    let holdout_bytes = edgeloop_shared::npy::write_sample(&[3, 32, 32], records).unwrap();
    std::fs::write(&holdout, holdout_bytes).unwrap();
    // The trainer keeps the samples it was given, and "trains" the same CNN.
    let seen = scratch.path().join("seen-samples.npy");
    let script = scratch.path().join("train.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\necho \"$EDGELOOP_SAMPLES\" > '{}.path'\ncp \"$EDGELOOP_SAMPLES\" '{}'\n\
             cp '{}' \"$EDGELOOP_OUTPUT_DIR/model.onnx\"\ncp '{}' \"$EDGELOOP_OUTPUT_DIR/reference.npy\"\n",
            seen.display(),
            seen.display(),
            cnn.display(),
            npy.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy: edgeloop_controller::retrain::RetrainingPolicy = toml::from_str(&format!(
        r#"
model = "camera"
psi_threshold = 0.25
consecutive_windows = 2
min_devices = 1
min_share = 0.5
collect_samples = {{ wait_s = 30 }}
holdout = "{}"
trainer = {{ kind = "command", program = "{}", timeout_s = 60 }}
"#,
        holdout.display(),
        script.display()
    ))
    .unwrap();
    policy.validate().unwrap();
    let ctl = TestController::start_with(BrokerChoice::Embedded, move |c| {
        c.retraining_check_s = 1;
        c.retraining = vec![policy];
    })
    .await
    .unwrap();
    let agent = camera_replaying(&ctl, "camera-3", &npy, &v1_reference, &onnx, Some(200.0)).await;

    // Two drifting windows fire the retraining; the candidate is v2.
    let retraining = wait_until_some(Duration::from_secs(60), || async {
        let rows = ctl.get("/api/v1/retrainings").await;
        let row = rows.as_array()?.first()?.clone();
        assert_ne!(row["status"], "failed", "{row}");
        assert_ne!(row["status"], "rejected", "{row}");
        (row["candidate_version"] == 2).then_some(row)
    })
    .await;
    assert_eq!(retraining["from_version"], 1, "{retraining}");
    assert!(
        retraining["reason"].as_str().unwrap().contains("drifted"),
        "{retraining}"
    );
    // The trainer got the camera's images as they were recorded, in `samples.npy`.
    let path = std::fs::read_to_string(scratch.path().join("seen-samples.npy.path")).unwrap();
    assert!(path.trim_end().ends_with("/samples.npy"), "{path}");
    let samples = std::fs::read(&seen).unwrap();
    let file = edgeloop_shared::npy::read_sample(&samples).unwrap();
    assert_eq!(file.row_shape, [3, 32, 32]);
    assert!(file.rows > 0, "the camera kept images before it was asked");
    for record in samples[file.data_start..].chunks(IMAGE * 4 + 16) {
        let x: Vec<f32> = record[..IMAGE * 4]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(recorded.chunks(IMAGE).any(|image| image == x));
    }
    // v2 takes the same images, was judged on the holdout, and reaches the camera.
    let v2 = ctl.published_bundle("camera", 2).await;
    assert_eq!(v2.manifest.inputs[0].shape, spec.shape);
    let gate = &v2.manifest.lineage.as_ref().unwrap().gates["quality"];
    assert!(gate.starts_with("passed: accuracy 1.0000"), "{gate}");
    ctl.wait_for_model("camera-3", Some(2)).await;

    agent.stop().await;
    ctl.stop().await;
}

/// A CNN over 3×32×32 images (the compatibility suite's, with onnxruntime's outputs) is
/// published with an NPY array of reference images and per-channel normalisation, rolled
/// out and served: nested JSON and binary tensors get onnxruntime's scores, a wrongly
/// shaped image is a 400 saying where, and drift is watched on each channel's mean and
/// deviation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_classifier_is_served_with_tensors_normalised_by_channel() {
    let compat = compat_dir();
    let onnx = std::fs::read(compat.join("cnn.onnx")).unwrap();
    let fixture: Value =
        serde_json::from_slice(&std::fs::read(compat.join("cnn.json")).unwrap()).unwrap();
    let floats =
        |v: &Value| -> Vec<f32> { fixture_numbers(v).into_iter().map(|x| x as f32).collect() };
    let images = floats(&fixture["inputs"][0]);
    let expected = floats(&fixture["outputs"][0]);
    const PIXELS: usize = 32 * 32;
    const IMAGE: usize = 3 * PIXELS;
    // The camera sends raw values; the model was trained on normalised ones: per channel,
    // x' = (x - offset) * scale. Distinct per channel, so a mix-up of channels shows.
    let (offset, scale) = ([10.0, 20.0, 30.0], [0.5, 0.25, 0.125]);
    let to_camera = |image: &[f32]| -> Vec<f32> {
        image
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = (i / PIXELS) % 3;
                (f64::from(x) / scale[c] + offset[c]) as f32
            })
            .collect()
    };
    // Forty reference images: the fixture's two, jittered.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut jitter = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.2
    };
    let mut reference = Vec::with_capacity(40 * IMAGE);
    for n in 0..40 {
        let image: Vec<f32> = images[(n % 2) * IMAGE..][..IMAGE]
            .iter()
            .map(|x| x + jitter())
            .collect();
        reference.extend(to_camera(&image));
    }

    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("camera-1", WINDOW);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.source.kind = SourceKind::Api;
    // Room for eight images in the sample, so that the API soon hands over only some.
    config.reservoir_bytes = 8 * (IMAGE as u64 * 4 + 64);
    let reservoir = config.state_dir.join(edgeloop_agent::reservoir::FILE);
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("camera-1", None).await;
    // Publishes the model as camera `version`, its reference images (forty, of `shape`) in
    // an NPY file, normalised by channel; rolls it out and waits until the camera serves it.
    let publish = async |version: u64,
                         shape: [usize; 3],
                         reference: &[f32],
                         layout: Option<edgeloop_shared::bundle::RowLayout>| {
        let npy = ctl.dir.path().join(format!("images-v{version}.npy"));
        let dims = [40, shape[0], shape[1], shape[2]];
        std::fs::write(&npy, edgeloop_shared::npy::f32_array(&dims, reference)).unwrap();
        ctl.controller
            .publish(edgeloop_controller::registry::PublishRequest {
                preprocess: Some(edgeloop_shared::bundle::Preprocess {
                    offset: offset.to_vec(),
                    scale: scale.to_vec(),
                }),
                layout,
                ..edgeloop_controller::registry::PublishRequest::new("camera", version, &onnx, &npy)
            })
            .await
            .unwrap();
        ctl.controller
            .rollout("camera", version, None)
            .await
            .unwrap();
        ctl.wait_for_model("camera-1", Some(version)).await;
    };
    publish(1, [3, 32, 32], &reference, None).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    let input = &model["inputs"][0];
    assert_eq!(input["shape"], json!([null, 3, 32, 32]), "{model}");
    assert_eq!(input["channel_axis"], 1, "{model}");
    assert_eq!(model["outputs"][0]["names"].as_array().unwrap().len(), 10);

    let check = |answer: &Value| {
        for (r, output) in answer["outputs"].as_array().unwrap().iter().enumerate() {
            for (c, score) in output["scores"].as_array().unwrap().iter().enumerate() {
                let (got, want) = (score.as_f64().unwrap(), f64::from(expected[r * 10 + c]));
                assert!(
                    (got - want).abs() <= 1e-3 + 1e-3 * want.abs(),
                    "row {r} class {c}: {got} vs onnxruntime {want}"
                );
            }
        }
    };
    // Nested as numpy's tolist() writes an image: [channel][row][column].
    let nested = |image: &[f32]| -> Value {
        json!(
            image
                .chunks(PIXELS)
                .map(|channel| channel.chunks(32).map(<[f32]>::to_vec).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        )
    };
    let camera: Vec<f32> = to_camera(&images);
    let infer = format!("{base}/v1/infer");
    let body = json!({"rows": [nested(&camera[..IMAGE]), nested(&camera[IMAGE..])]});
    let (status, answer) = post(&http, &infer, body).await;
    assert_eq!(status, 200, "{answer}");
    check(&answer);
    // The same two images as one binary tensor.
    let (status, answer) = post_f32(&http, &infer, "2x3x32x32", &camera).await;
    assert_eq!(status, 200, "{answer}");
    check(&answer);

    // A row of 31 columns in channel 0, row 5: the shape expected and where it broke.
    let mut broken = nested(&camera[..IMAGE]);
    broken[0][5].as_array_mut().unwrap().pop();
    let (status, refused) = post(&http, &infer, json!({"rows": [broken]})).await;
    assert_eq!(status, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("[N, 3, 32, 32]") && error.contains("31 values where 32 belong at [0, 5]"),
        "{error}"
    );
    let (status, refused) = post(&http, &infer, json!({"rows": [[1.0, 2.0]]})).await;
    assert_eq!(status, 400, "{refused}");

    // A window of images reaches the controller as channel statistics.
    for _ in 0..WINDOW / 2 {
        let body = json!({"rows": [nested(&camera[..IMAGE]), nested(&camera[IMAGE..])]});
        let (status, _) = post(&http, &infer, body).await;
        assert_eq!(status, 200);
    }
    let summary = full_window(&ctl, "camera-1", WINDOW).await;
    assert_counted_by_channel(&summary);
    // Every image inferred counts in the sample (2 + 2 + the window's); eight are kept,
    // as the camera sent them, with their predicted classes.
    let status = wait_until_some(Duration::from_secs(10), || async {
        let mut r = edgeloop_agent::reservoir::Reservoir::open(&reservoir, 1).ok()?;
        r.status().ok().filter(|s| s.seen == 4 + WINDOW)
    })
    .await;
    assert_eq!((status.kept, status.capacity), (8, 8));
    let (sampled, kept) = edgeloop_agent::reservoir::Reservoir::open(&reservoir, 1)
        .unwrap()
        .samples()
        .unwrap();
    assert_eq!(sampled.unwrap().shape, Some(vec![3, 32, 32]));
    for s in kept {
        assert!(s.values == camera[..IMAGE] || s.values == camera[IMAGE..]);
        assert!(s.predicted.is_some());
    }

    // v2 is the same model for cameras that send images channels last ([H, W, C]): its
    // reference and requests are HWC, the agent transposes them, the scores are the same.
    let to_hwc =
        |chw: &[f32]| -> Vec<f32> { (0..IMAGE).map(|i| chw[(i % 3) * PIXELS + i / 3]).collect() };
    let reference_hwc: Vec<f32> = reference.chunks(IMAGE).flat_map(to_hwc).collect();
    publish(
        2,
        [32, 32, 3],
        &reference_hwc,
        Some(edgeloop_shared::bundle::RowLayout::ChannelsLast),
    )
    .await;
    let model: Value = get_json(&http, &format!("{base}/v1/model")).await;
    let input = &model["inputs"][0];
    assert_eq!(input["shape"], json!([null, 3, 32, 32]), "{model}");
    assert_eq!(input["layout"], "channels_last", "{model}");
    let hwc: Vec<f32> = camera.chunks(IMAGE).flat_map(to_hwc).collect();
    // Nested as numpy's tolist() writes an HWC image: [row][column][channel].
    let nested_hwc = |image: &[f32]| -> Value {
        json!(
            image
                .chunks(32 * 3)
                .map(|row| row.chunks(3).map(<[f32]>::to_vec).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        )
    };
    let body = json!({"rows": [nested_hwc(&hwc[..IMAGE]), nested_hwc(&hwc[IMAGE..])]});
    let (status, answer) = post(&http, &infer, body).await;
    assert_eq!(status, 200, "{answer}");
    check(&answer);
    let (status, answer) = post_f32(&http, &infer, "2x32x32x3", &hwc).await;
    assert_eq!(status, 200, "{answer}");
    check(&answer);
    // A channels-first body is now the wrong shape.
    let (status, refused) = post(&http, &infer, json!({"rows": [nested(&camera[..IMAGE])]})).await;
    assert_eq!(status, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("[N, 32, 32, 3]"), "{error}");

    agent.stop().await;
    ctl.stop().await;
}

/// Rows like the compatibility regressors' training data: four features, each about
/// N(5, 3²), from a fixed seed; `shift` moves every feature by that much.
fn regression_rows(n: usize, seed: u64, shift: f32) -> Vec<[f32; 4]> {
    let mut state = seed | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            std::array::from_fn(|_| {
                // Box–Muller
                let z = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
                (5.0 + 3.0 * z) as f32 + shift
            })
        })
        .collect()
}

/// A model that predicts a value (scikit-learn's GradientBoostingRegressor, a
/// `TreeEnsembleRegressor` with a base value) is published as a regression: the API answers
/// each row with its value, true values sent as feedback give the window's mean absolute
/// and root mean squared error, the predicted values are watched for drift against those
/// of the reference data, and the controller merges all of it by the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_is_served_scored_on_true_values_and_watched_for_prediction_drift() {
    const WINDOW: u64 = 30;
    let onnx = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../agent/tests/compat/boosting_regressor.onnx"),
    )
    .unwrap();
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("regression-1", WINDOW);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.api.feedback_memory = 100;
    config.source.kind = SourceKind::Api;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("regression-1", None).await;
    let mut csv = String::from("load,speed,vibration,temperature\n");
    for row in regression_rows(400, 7, 0.0) {
        let row: Vec<String> = row.iter().map(f32::to_string).collect();
        csv.push_str(&format!("{}\n", row.join(",")));
    }
    let reference = ctl.dir.path().join("regression.csv");
    std::fs::write(&reference, &csv).unwrap();

    // Without `regression`, one output column is refused with the way out.
    let request = || edgeloop_controller::registry::PublishRequest {
        regression: true,
        class_labels: vec!["hours_left".into()],
        ..edgeloop_controller::registry::PublishRequest::new("life", 1, &onnx, &reference)
    };
    let refused = ctl
        .controller
        .publish(edgeloop_controller::registry::PublishRequest {
            regression: false,
            ..request()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("--regression"), "{refused}");
    ctl.controller.publish(request()).await.unwrap();
    ctl.controller.rollout("life", 1, None).await.unwrap();
    ctl.wait_for_model("regression-1", Some(1)).await;

    let base = format!("http://127.0.0.1:{port}");
    let (infer, feedback) = (format!("{base}/v1/infer"), format!("{base}/v1/feedback"));
    let http = reqwest::Client::new();
    let model = get_json(&http, &format!("{base}/v1/model")).await;
    assert_eq!(model["outputs"][0]["kind"], "regression", "{model}");
    assert_eq!(
        model["outputs"][0]["names"],
        json!(["hours_left"]),
        "{model}"
    );

    // A window but one of inputs like the reference's, answered as the bare plan answers
    // them.
    let plan = edgeloop_agent::runtime::Plan::compile(&onnx, 4).unwrap();
    let features: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    let rows = regression_rows(WINDOW as usize, 99, 0.0);
    let (last, rows) = rows.split_last().unwrap();
    let (status, answer) = post(&http, &infer, json!({ "rows": rows })).await;
    assert_eq!(status, 200, "{answer}");
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), rows.len());
    let mut values = Vec::new();
    for (row, output) in rows.iter().zip(outputs) {
        assert!(output.get("class").is_none(), "{output}");
        let value = output["value"].as_f64().unwrap();
        let want = plan.infer(row, &features).unwrap().scores[0];
        assert!((value - f64::from(want)).abs() < 1e-4, "{value} vs {want}");
        values.push(value);
    }
    // True values for the first 12 rows, each 2 above the prediction (an error of −2);
    // bad feedback refused, uncounted.
    let id = answer["request_id"].as_str().unwrap().to_string();
    for (row, value) in values.iter().enumerate().take(12) {
        let body = json!({"request_id": id, "row": row, "label": value + 2.0});
        let (status, answer) = post(&http, &feedback, body).await;
        assert_eq!(status, 200, "{answer}");
        assert!(
            (answer["error"].as_f64().unwrap() + 2.0).abs() < 1e-4,
            "{answer}"
        );
    }
    for (label, needle) in [(json!("fault"), "true value"), (json!(null), "true value")] {
        let body = json!({"request_id": id, "row": 20, "label": label});
        let (status, answer) = post(&http, &feedback, body).await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    // The last input closes the window.
    let (status, _) = post(&http, &infer, json!({ "rows": [last] })).await;
    assert_eq!(status, 200);
    let first = full_window(&ctl, "regression-1", WINDOW).await;
    let stats = &first["stats"];
    assert!(
        (stats["mae"].as_f64().unwrap() - 2.0).abs() < 1e-4,
        "{stats}"
    );
    assert!(
        (stats["rmse"].as_f64().unwrap() - 2.0).abs() < 1e-4,
        "{stats}"
    );
    assert_eq!(stats["residuals"]["count"], 12, "{stats}");
    assert!(stats.get("accuracy").is_none() && stats.get("confusion").is_none());
    let predicted = &stats["predicted_value"];
    assert_eq!(predicted["name"], "prediction");
    let counted: u64 = predicted["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counted, WINDOW, "{predicted}");
    let calm_psi = stats["prediction_psi"].as_f64().unwrap();

    // A second window of inputs shifted by three deviations: the predicted values
    // move beyond the reference's, and prediction drift says so.
    let shifted = regression_rows(WINDOW as usize, 5, 9.0);
    let (status, _) = post(&http, &infer, json!({ "rows": shifted })).await;
    assert_eq!(status, 200);
    let drifted = wait_until_some(Duration::from_secs(20), || async {
        let rows = ctl
            .controller
            .store
            .telemetry("regression-1", 10)
            .await
            .unwrap();
        (rows.len() >= 2).then(|| rows[0].summary.clone())
    })
    .await;
    let stats = &drifted["stats"];
    assert_eq!(stats["prediction_drift"], true, "{stats}");
    assert!(
        stats["prediction_psi"].as_f64().unwrap() > calm_psi.max(0.25),
        "{stats}"
    );
    assert!(
        stats.get("mae").is_none(),
        "no true values in this window: {stats}"
    );

    // The controller's hour holds both windows: 60 predicted values, the 12 errors.
    let hour = wait_until_some(Duration::from_secs(20), || async {
        let rows = ctl
            .controller
            .store
            .hourly("regression-1", 10)
            .await
            .unwrap();
        rows.into_iter().find(|r| r.windows == 2)
    })
    .await;
    let merged: edgeloop_shared::drift::WindowStats = serde_json::from_value(hour.stats).unwrap();
    let values = merged.predicted_value.as_ref().unwrap();
    assert_eq!(values.counts.iter().sum::<u64>(), 2 * WINDOW);
    assert_eq!(merged.residuals.map(|r| r.count), Some(12));
    assert!((merged.mae.unwrap() - 2.0).abs() < 1e-4, "{merged:?}");

    // The sample kept for retraining has the predicted values and the true ones.
    let path = agent.config.state_dir.join(edgeloop_agent::reservoir::FILE);
    let samples = wait_until_some(Duration::from_secs(10), || async {
        let mut reservoir = edgeloop_agent::reservoir::Reservoir::open(&path, 1 << 20).ok()?;
        let status = reservoir.status().ok()?;
        (status.labelled == 12).then(|| reservoir.samples().unwrap().1)
    })
    .await;
    let labelled: Vec<_> = samples.iter().filter(|s| s.label.is_some()).collect();
    assert_eq!(labelled.len(), 12);
    for s in labelled {
        let error = s.predicted.unwrap() - s.label.unwrap();
        assert!((error + 2.0).abs() < 1e-4, "{s:?}");
    }
    agent.stop().await;
    ctl.stop().await;
}

/// The compatibility suite's regression holdout: rows of four features and the true value.
fn regression_holdout() -> Vec<([f32; 4], f64)> {
    let path = compat_dir().join("regression_holdout.csv");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
            (std::array::from_fn(|i| v[i] as f32), v[4])
        })
        .collect()
}

/// The compatibility suite's folder: its regressors and their reference and holdout data.
fn compat_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/compat")
}

/// Publishes the suite's regressor `model` (`linear_regression`, `boosting_regressor`…) as
/// `life` `version`, profiled on the suite's regression reference data.
async fn publish_regressor(ctl: &TestController, version: u64, model: &str) {
    let compat = compat_dir();
    let onnx = std::fs::read(compat.join(format!("{model}.onnx"))).unwrap();
    ctl.controller
        .publish(edgeloop_controller::registry::PublishRequest {
            regression: true,
            ..edgeloop_controller::registry::PublishRequest::new(
                "life",
                version,
                &onnx,
                &compat.join("regression_reference.csv"),
            )
        })
        .await
        .unwrap();
}

/// A regression whose error on the device's true values rises too far above the previous
/// version's during its health window is rolled back by the device: v1 (a linear model)
/// and v2 (boosted trees, ten times its error on the same rows) answer the same requests,
/// and the true values sent back as feedback judge them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_whose_error_rises_is_rolled_back() {
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("regression-2", 1000);
    let port = free_port();
    config.api.listen = format!("127.0.0.1:{port}");
    config.api.feedback_memory = 1000;
    config.source.kind = SourceKind::Api;
    config.health.window_s = 6;
    config.health.max_error_rise = 0.5;
    config.health.min_labels = 50;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("regression-2", None).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let holdout = regression_holdout();
    // Every holdout row through the API, and its true value back as feedback.
    let answer_and_judge = async || {
        let rows: Vec<[f32; 4]> = holdout.iter().map(|(row, _)| *row).collect();
        let (status, answer) =
            post(&http, &format!("{base}/v1/infer"), json!({ "rows": rows })).await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["request_id"].as_str().unwrap().to_string();
        for (row, (_, truth)) in holdout.iter().enumerate() {
            let body = json!({"request_id": id, "row": row, "label": truth});
            let (status, answer) = post(&http, &format!("{base}/v1/feedback"), body).await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    for (version, model) in [(1, "linear_regression"), (2, "boosting_regressor")] {
        publish_regressor(&ctl, version, model).await;
        ctl.controller.rollout("life", version, None).await.unwrap();
        ctl.wait_for_model("regression-2", Some(version)).await;
        answer_and_judge().await;
    }
    ctl.wait_for_report("regression-2", "rolled_back", "mean absolute error")
        .await;
    ctl.wait_for_model("regression-2", Some(1)).await;
    agent.stop().await;
    ctl.stop().await;
}

/// A replayed file that holds each row's true value (`source.label_column`) scores a
/// regression on the device as feedback would: every window of the holdout's 100 rows
/// carries 100 errors, and its mean absolute error is the bare plan's on those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_files_true_values_score_a_regression() {
    let compat = compat_dir();
    let holdout = regression_holdout();
    let onnx = std::fs::read(compat.join("linear_regression.onnx")).unwrap();
    let plan = edgeloop_agent::runtime::Plan::compile(&onnx, 4).unwrap();
    let features: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    let want = holdout
        .iter()
        .map(|(row, truth)| {
            let predicted = f64::from(plan.infer(row, &features).unwrap().scores[0]);
            // The replayed true value is read as an f32, as every replayed value is.
            (predicted - f64::from(*truth as f32)).abs()
        })
        .sum::<f64>()
        / holdout.len() as f64;

    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("regression-replay", holdout.len() as u64);
    config.source.kind = SourceKind::Csv;
    config.source.path = Some(compat.join("regression_holdout.csv"));
    config.source.label_column = Some("label".into());
    config.source.repeat = true;
    config.source.rate_hz = 1000.0;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("regression-replay", None).await;
    publish_regressor(&ctl, 1, "linear_regression").await;
    ctl.controller.rollout("life", 1, None).await.unwrap();
    // The first window may begin mid-file; a later one holds each row once.
    let summary = wait_until_some(Duration::from_secs(30), || async {
        let rows = ctl
            .controller
            .store
            .telemetry("regression-replay", 10)
            .await
            .unwrap();
        rows.into_iter()
            .map(|r| r.summary)
            .find(|s| s["window_seq"].as_u64().is_some_and(|seq| seq >= 2))
    })
    .await;
    let stats = &summary["stats"];
    assert_eq!(stats["residuals"]["count"], 100, "{stats}");
    let mae = stats["mae"].as_f64().unwrap();
    assert!(
        (mae - want).abs() < 1e-4 * want.max(1.0),
        "mae {mae}, the bare plan's {want}"
    );
    assert!(stats.get("confusion").is_none(), "{stats}");
    agent.stop().await;
    ctl.stop().await;
}

/// The fleet judges a regression's error too: v2 (boosted trees) goes to a canary whose
/// own health window does not judge error, so it commits; the controller's telemetry gate
/// pools the true values the canary's windows carry against those of the device still on
/// v1 (a linear model) over the same period, and stops the rollout before its second wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_whose_error_rises_on_the_canary_stops_at_the_telemetry_gate() {
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let holdout = regression_holdout();
    let devices = ["regression-gate-0", "regression-gate-1"];
    let mut agents = Vec::new();
    let mut bases = Vec::new();
    for id in devices {
        // A window per round of the holdout's rows; the true values sent back for one round
        // count into the next window.
        let mut config = ctl.agent_config(id, holdout.len() as u64);
        let port = free_port();
        config.api.listen = format!("127.0.0.1:{port}");
        config.api.feedback_memory = 1000;
        config.source.kind = SourceKind::Api;
        config.health.window_s = 2;
        agents.push(ctl.spawn_agent_with(config));
        bases.push(format!("http://127.0.0.1:{port}"));
        ctl.wait_for_model(id, None).await;
    }
    for (version, model) in [(1, "linear_regression"), (2, "boosting_regressor")] {
        publish_regressor(&ctl, version, model).await;
    }
    ctl.controller.rollout("life", 1, None).await.unwrap();
    for id in devices {
        ctl.wait_for_model(id, Some(1)).await;
    }
    let (code, created) = ctl
        .post_rollout(json!({
            "model": "life", "version": 2,
            "plan": {
                "waves": ["1", "100%"],
                // PSI below 100 counts as noise here: the error alone decides.
                "telemetry_gate": {
                    "drift_floor": 100.0, "max_mae_rise": 0.5, "min_labels": 50,
                    "min_windows": 2,
                },
            },
        }))
        .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let http = reqwest::Client::new();
    // Every device answers the holdout's rows and gets their true values back, round after
    // round, until the rollout stops.
    let paused = wait_until_some(Duration::from_secs(90), || async {
        for base in &bases {
            let rows: Vec<[f32; 4]> = holdout.iter().map(|(row, _)| *row).collect();
            let (status, answer) =
                post(&http, &format!("{base}/v1/infer"), json!({ "rows": rows })).await;
            assert_eq!(status, 200, "{answer}");
            let request = answer["request_id"].as_str().unwrap().to_string();
            for (row, (_, truth)) in holdout.iter().enumerate() {
                let body = json!({"request_id": request, "row": row, "label": truth});
                let (status, answer) = post(&http, &format!("{base}/v1/feedback"), body).await;
                assert_eq!(status, 200, "{answer}");
            }
        }
        let rollout = ctl.get(&format!("/api/v1/rollouts/{id}")).await;
        assert_ne!(rollout["status"], "completed", "{rollout}");
        (rollout["status"] == "paused").then_some(rollout)
    })
    .await;
    let reason = paused["reason"].as_str().unwrap();
    assert!(
        reason.contains("telemetry gate: v2's mean absolute error"),
        "{reason}"
    );
    let versions: Vec<u64> = {
        let mut v = Vec::new();
        for id in devices {
            v.push(
                ctl.device(id).await.unwrap()["model_version"]
                    .as_u64()
                    .unwrap(),
            );
        }
        v.sort();
        v
    };
    assert_eq!(versions, [1, 2], "the canary runs v2, the other device v1");
    for agent in agents {
        agent.stop().await;
    }
    ctl.stop().await;
}
