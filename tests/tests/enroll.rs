//! Enrollment: a device with a token creates its key, enrolls, waits for an operator when
//! the token says so, and once approved joins the registry with its group, tags and board;
//! its messages wait in its outbox meanwhile. Tokens expire, run out and bind a device id
//! to its key. Rollouts can target the group.

use std::time::Duration;

use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn token(ctl: &TestController, body: Value) -> Value {
    let (code, created) = ctl
        .post_as("alice", "/api/v1/enrollment-tokens", body)
        .await;
    assert_eq!(code, 201, "{created}");
    created
}

/// The devices a rollout has deployments for.
fn targeted(rollout: &Value) -> Vec<&str> {
    rollout["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect()
}

/// The audit log's entries as (actor, action).
fn who_did_what(audit: &Value) -> Vec<(&str, &str)> {
    audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect()
}

fn enrollment(token: &str, device: &str, key: &str) -> Value {
    json!({
        "token": token, "device_id": device, "public_key": key,
        "board": "rpi4", "arch": "aarch64", "agent_version": "0.1.0",
    })
}

async fn a_device_enrolls_waits_for_approval_and_joins_its_group(broker: BrokerChoice) {
    let Some(ctl) = TestController::start_with(broker, |c| c.accept_unknown_devices = false).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let reviewed = token(
        &ctl,
        json!({ "group": "line-a", "tags": ["hall-2"], "uses": 2, "auto_approve": false }),
    )
    .await;
    let secret = reviewed["token"].as_str().unwrap();
    assert!(secret.starts_with("elt_"), "{reviewed}");
    let listed = ctl.get("/api/v1/enrollment-tokens").await;
    assert_eq!(listed[0]["id"], reviewed["id"]);
    assert!(
        listed[0].get("token").is_none(),
        "the secret is shown once: {listed}"
    );

    let mut config = ctl.agent_config("enr-1", 50);
    config.enrollment_token = secret.to_string();
    config.board = "rpi4".into();
    config.enrollment_retry_s = 1;
    let agent = ctl.spawn_agent_with(config.clone());

    // Pending: known as an enrollment, not in the registry, its windows held back.
    wait_until("the enrollment is pending", WAIT, || async {
        ctl.get("/api/v1/enrollments")
            .await
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    let pending = ctl.get("/api/v1/enrollments").await[0].clone();
    assert_eq!(pending["status"], "pending", "{pending}");
    assert_eq!(pending["board"], "rpi4");
    assert_eq!(pending["arch"], std::env::consts::ARCH);
    let key = std::fs::read_to_string(config.state_dir.join("device.key")).unwrap();
    let public = edgeloop_shared::signing::SecretKey::parse(&key)
        .unwrap()
        .public()
        .to_text();
    assert_eq!(pending["public_key"], public);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        ctl.device("enr-1").await.is_none(),
        "not registered before approval"
    );
    assert!(
        ctl.stats_unknown_device().await > 0,
        "its messages were held back"
    );

    // Approved: in the registry with its group and board; what it held back arrives.
    let (code, approved) = ctl
        .post_as("bob", "/api/v1/enrollments/enr-1/approve", json!({}))
        .await;
    assert_eq!(code, 200, "{approved}");
    assert_eq!(approved["decided_by"], "bob");
    wait_until("the device's held-back heartbeats arrive", WAIT, || async {
        ctl.device("enr-1")
            .await
            .is_some_and(|d| d["online"] == true && d["last_seen_ms"].as_u64() > Some(0))
    })
    .await;
    let device = ctl.device("enr-1").await.unwrap();
    assert_eq!(device["group"], "line-a", "{device}");
    assert_eq!(device["tags"], json!(["hall-2"]));
    assert_eq!(device["board"], "rpi4");
    wait_until("the agent records its approval", WAIT, || async {
        std::fs::read_to_string(config.state_dir.join("enrollment.json"))
            .is_ok_and(|t| t.contains("\"approved\""))
    })
    .await;
    let (code, _) = ctl
        .post_as("bob", "/api/v1/enrollments/enr-1/approve", json!({}))
        .await;
    assert_eq!(code, 404, "approved once");

    // The token's second use; a third is refused; the id stays bound to its key.
    let (code, second) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(secret, "enr-2", &public_key(2)),
        )
        .await;
    assert_eq!(code, 202, "{second}");
    assert_eq!(second["status"], "pending");
    assert_eq!(second["topic_root"], ctl.root.as_str());
    let (code, refused) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(secret, "enr-3", &public_key(3)),
        )
        .await;
    assert_eq!(code, 403, "{refused}");
    let (code, refused) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(secret, "enr-1", &public_key(4)),
        )
        .await;
    assert_eq!(code, 409, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("another key"));
    let (code, refused) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment("elt_nope", "enr-5", &public_key(5)),
        )
        .await;
    assert_eq!(code, 401, "{refused}");
    let (code, refused) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(secret, "bad id!", &public_key(6)),
        )
        .await;
    assert_eq!(code, 400, "{refused}");

    // An auto-approving, short-lived token: approved at once, refused once expired.
    let quick = token(&ctl, json!({ "group": "line-b", "ttl_s": 1, "uses": null })).await;
    let quick_secret = quick["token"].as_str().unwrap();
    let (code, at_once) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(quick_secret, "enr-6", &public_key(6)),
        )
        .await;
    assert_eq!(code, 200, "{at_once}");
    assert_eq!(at_once["status"], "approved");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, _) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(quick_secret, "enr-7", &public_key(7)),
        )
        .await;
    assert_eq!(code, 401, "expired");

    // A rollout to the group reaches its devices only.
    ctl.publish_example(1).await;
    let (code, rollout) = ctl
        .post_rollout(json!({ "model": "vibration", "version": 1, "group": "line-a" }))
        .await;
    assert_eq!(code, 201, "{rollout}");
    assert_eq!(
        targeted(&rollout),
        ["enr-1"],
        "enr-2 is pending, enr-6 in line-b"
    );
    assert_eq!(rollout["target"], json!({"group": "line-a"}), "{rollout}");
    ctl.wait_for_model("enr-1", Some(1)).await;
    wait_until("the device streams drift windows", WAIT, || async {
        !ctl.stored_windows("enr-1").await.is_empty()
    })
    .await;

    // A device enrolled into the group afterwards joins that rollout by itself.
    let later = token(&ctl, json!({ "group": "line-a", "uses": 1 })).await;
    let (code, joined) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(later["token"].as_str().unwrap(), "enr-8", &public_key(8)),
        )
        .await;
    assert_eq!(code, 200, "{joined}");
    let rollout_path = format!("/api/v1/rollouts/{}", rollout["id"]);
    wait_until(
        "the later device joins the group's rollout",
        WAIT,
        || async {
            ctl.get(&rollout_path).await["deployments"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["device_id"] == "enr-8")
        },
    )
    .await;
    // A model for one board: a rollout to the group leaves out the device of another board,
    // a rollout naming it is refused, and the device of that board installs it.
    let other = token(&ctl, json!({ "group": "line-a", "uses": 1 })).await;
    let mut rpi5 = enrollment(other["token"].as_str().unwrap(), "enr-9", &public_key(9));
    rpi5["board"] = json!("rpi5");
    let (code, enrolled) = ctl.post_as("x", "/api/v1/enroll", rpi5).await;
    assert_eq!(code, 200, "{enrolled}");
    ctl.publish_example_as(
        "vibration",
        2,
        edgeloop_shared::bundle::Requirements {
            boards: vec!["rpi4".into()],
            ..Default::default()
        },
    )
    .await;
    let (code, refused) = ctl
        .post_rollout(json!({ "model": "vibration", "version": 2, "devices": ["enr-1", "enr-9"] }))
        .await;
    assert_eq!(code, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("vibration v2 is not for enr-9") && error.contains("a rpi5"),
        "{error}"
    );
    assert!(!error.contains("enr-1"), "{error}");
    let (code, rollout) = ctl
        .post_rollout(json!({ "model": "vibration", "version": 2, "group": "line-a" }))
        .await;
    assert_eq!(code, 201, "{rollout}");
    ctl.wait_for_model("enr-1", Some(2)).await;
    // Also later: the engine does not add it to the rollout by itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rollout = ctl
        .get(&format!("/api/v1/rollouts/{}", rollout["id"]))
        .await;
    assert!(targeted(&rollout).contains(&"enr-1"), "{rollout}");
    assert!(!targeted(&rollout).contains(&"enr-9"), "{rollout}");
    ctl.assert_audited("of the left-out device", |e| {
        e["action"] == "rollout.create"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("left out 1 the model is not for: enr-9"))
    })
    .await;

    let (code, refused) = ctl
        .post_rollout(json!({ "model": "vibration", "version": 1, "group": "nowhere" }))
        .await;
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("no device is in group")
    );

    let audit = ctl.get("/api/v1/audit?limit=100").await;
    let actions = who_did_what(&audit);
    for expected in [
        ("alice", "token.create"),
        ("enr-1", "device.enroll"),
        ("bob", "device.approve"),
        ("controller", "rollout.join"),
    ] {
        assert!(actions.contains(&expected), "{expected:?} in {actions:?}");
    }
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(a_device_enrolls_waits_for_approval_and_joins_its_group);

/// A public key nobody holds the secret of, different for each `n`.
fn public_key(n: u8) -> String {
    edgeloop_shared::signing::SecretKey::from_seed([n; 32])
        .public()
        .to_text()
}

/// An enrollment signed with `key` (seed `n`) at `issued_ms`, without a token.
fn signed_enrollment(n: u8, device: &str, issued_ms: u64) -> Value {
    use base64::Engine as _;
    let key = edgeloop_shared::signing::SecretKey::from_seed([n; 32]);
    let public = key.public().to_text();
    let signature = key.sign(
        edgeloop_shared::signing::Context::Enroll,
        &edgeloop_shared::signing::enroll_proof_bytes(device, &public, issued_ms),
    );
    json!({
        "device_id": device,
        "public_key": public,
        "issued_ms": issued_ms,
        "signature": base64::engine::general_purpose::STANDARD.encode(signature),
    })
}

async fn a_preauthorized_key_enrolls_its_device_without_a_token(broker: BrokerChoice) {
    let Some(ctl) = TestController::start_with(broker, |c| c.accept_unknown_devices = false).await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // The device's key is made before it is flashed; the operator pre-authorizes it.
    let mut config = ctl.agent_config("pre-1", 50);
    config.enroll_with_key = true;
    config.enrollment_retry_s = 1;
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let device_key = edgeloop_agent::enroll::device_key(&config.state_dir).unwrap();
    let (code, row) = ctl
        .post_as(
            "alice",
            "/api/v1/preauthorized-keys",
            json!({ "public_key": device_key.public().to_text(), "group": "line-k", "tags": ["t1"] }),
        )
        .await;
    assert_eq!(code, 201, "{row}");
    assert_eq!(row["id"], format!("key-{}", device_key.id()));
    assert_eq!(row["uses_left"], 1);
    let (code, again) = ctl
        .post_as(
            "alice",
            "/api/v1/preauthorized-keys",
            json!({ "public_key": device_key.public().to_text(), "group": "line-k" }),
        )
        .await;
    assert_eq!(code, 409, "pre-authorized once: {again}");

    let agent = ctl.spawn_agent_with(config.clone());
    wait_until(
        "the pre-authorized device is in the registry",
        WAIT,
        || async {
            ctl.device("pre-1")
                .await
                .is_some_and(|d| d["online"] == true && d["group"] == "line-k")
        },
    )
    .await;
    let enrolled = ctl.get("/api/v1/enrollments").await;
    let enrolled = &enrolled.as_array().unwrap()[0];
    assert_eq!(enrolled["status"], "approved", "{enrolled}");
    assert_eq!(enrolled["token_id"], format!("key-{}", device_key.id()));
    assert_eq!(enrolled["tags"], json!(["t1"]));

    // Only the holder of a pre-authorized key gets in, once, and only with a fresh proof.
    let now = edgeloop_agent::now_ms();
    let (code, row) = ctl
        .post_as(
            "alice",
            "/api/v1/preauthorized-keys",
            json!({ "public_key": public_key(20), "group": "line-k" }),
        )
        .await;
    assert_eq!(code, 201, "{row}");
    let mut unsigned = signed_enrollment(20, "pre-2", now);
    unsigned.as_object_mut().unwrap().remove("signature");
    unsigned.as_object_mut().unwrap().remove("issued_ms");
    let mut forged = signed_enrollment(21, "pre-2", now);
    forged["public_key"] = json!(public_key(20));
    let mut claimed = signed_enrollment(20, "pre-2", now);
    claimed["token"] = json!("edgeloop/v1/preauthorized-key\u{0}".to_string() + &public_key(20));
    for (body, status, needle) in [
        (unsigned, 400, "pre-authorized key and signs the request"),
        (forged, 401, "proof of key"),
        (
            signed_enrollment(20, "pre-2", now - 10 * 60 * 1000),
            401,
            "more than 5 minutes",
        ),
        (
            signed_enrollment(22, "pre-2", now),
            401,
            "is not pre-authorized",
        ),
        (claimed, 400, "visible text"),
    ] {
        let (code, answer) = ctl.post_as("x", "/api/v1/enroll", body.clone()).await;
        assert_eq!(code, status, "{body} -> {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message}");
    }
    let (code, ok) = ctl
        .post_as("x", "/api/v1/enroll", signed_enrollment(20, "pre-2", now))
        .await;
    assert_eq!(code, 200, "{ok}");
    assert_eq!(ok["group"], "line-k");
    let (code, used) = ctl
        .post_as("x", "/api/v1/enroll", signed_enrollment(20, "pre-3", now))
        .await;
    assert_eq!(code, 403, "the key's one use is spent: {used}");
    ctl.assert_audited("of the pre-authorization", |e| {
        e["action"] == "key.preauthorize" && e["actor"] == "alice"
    })
    .await;
    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(a_preauthorized_key_enrolls_its_device_without_a_token);

/// True when the broker at `url` accepts `client_id` with `login`.
async fn broker_admits(url: &str, client_id: &str, login: Option<(&str, &str)>) -> bool {
    let addr = edgeloop_agent::link::BrokerAddr::parse(url).unwrap();
    let mut options = rumqttc::MqttOptions::new(client_id, &addr.host, addr.port);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return ack.code == rumqttc::ConnectReturnCode::Success;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    outcome.unwrap_or(false)
}

/// With `broker_auth` the embedded broker admits the controller and enrolled devices only,
/// each as itself with the password it was issued when it enrolled and proved its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_broker_auth_only_enrolled_devices_connect_with_their_issued_login() {
    let ctl = TestController::start_with(BrokerChoice::Embedded, |c| {
        c.broker_auth = true;
        c.accept_unknown_devices = false;
    })
    .await
    .expect("the embedded broker needs nothing external");
    let url = ctl.controller.mqtt_url.clone();
    assert!(!broker_admits(&url, "stranger", None).await, "no login");
    assert!(
        !broker_admits(&url, "stranger", Some(("stranger", "guess"))).await,
        "a made-up login"
    );

    let t = token(&ctl, json!({ "group": "sealed", "uses": 3 })).await;
    let mut config = ctl.agent_config("auth-1", 50);
    config.enrollment_token = t["token"].as_str().unwrap().to_string();
    config.enrollment_retry_s = 1;
    let agent = ctl.spawn_agent_with(config.clone());
    // The agent could not connect before it enrolled; with its issued login it does, and
    // what it queued meanwhile arrives.
    ctl.wait_for_model("auth-1", None).await;
    let login = std::fs::read_to_string(
        config
            .state_dir
            .join(edgeloop_agent::enroll::BROKER_LOGIN_FILE),
    )
    .unwrap();
    let login: Value = serde_json::from_str(&login).unwrap();
    assert_eq!(login["username"], "auth-1");
    let password = login["password"].as_str().unwrap().to_string();
    assert!(
        !broker_admits(&url, "auth-9", Some(("auth-1", &password))).await,
        "its login under another client id"
    );
    // Commands reach it through the same broker: the controller's own login works.
    ctl.publish_example(1).await;
    let (code, _) = ctl
        .post_rollout(json!({ "model": "vibration", "version": 1, "devices": ["auth-1"] }))
        .await;
    assert_eq!(code, 201);
    ctl.wait_for_model("auth-1", Some(1)).await;
    // Its telemetry comes through the broker's front door, which holds it to its own topics.
    wait_until("drift summaries of auth-1", WAIT, || async {
        !ctl.stored_windows("auth-1").await.is_empty()
    })
    .await;

    // An enrollment that does not prove its key gets no login.
    let (code, unproven) = ctl
        .post_as(
            "x",
            "/api/v1/enroll",
            enrollment(t["token"].as_str().unwrap(), "auth-2", &public_key(30)),
        )
        .await;
    assert_eq!(code, 200, "{unproven}");
    assert!(unproven.get("mqtt_password").is_none(), "{unproven}");
    assert!(!broker_admits(&url, "auth-2", Some(("auth-2", ""))).await);
    agent.stop().await;
    ctl.stop().await;
}

/// With operators configured, the API wants an operator's token (as a bearer token or the
/// browser's Basic password) and records the operator as the actor whatever the request
/// says, while devices still enroll and download their bundles without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_operators_the_api_wants_a_token_and_devices_still_join() {
    use edgeloop_controller::login::Operator;
    let (alice_token, alice) = Operator::create("alice").unwrap();
    let (bob_token, bob) = Operator::create("bob").unwrap();
    let mut ctl = TestController::start_with(BrokerChoice::Embedded, |c| {
        c.accept_unknown_devices = false;
        c.operators = vec![alice, bob];
    })
    .await
    .unwrap();
    let devices = ctl.url("/api/v1/devices");

    // Without a token, or with one that is not an operator's: 401, and a browser asks.
    for authorization in [None, Some(format!("Bearer {alice_token}x"))] {
        let mut request = ctl.http.get(&devices);
        if let Some(a) = &authorization {
            request = request.header("authorization", a);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Basic realm=\"edgeloop\", charset=\"UTF-8\""
        );
        let said: Value = response.json().await.unwrap();
        assert!(
            said["error"].as_str().unwrap().contains("operator"),
            "{said}"
        );
    }
    let (code, _) = ctl
        .post_as(
            "mallory",
            "/api/v1/enrollment-tokens",
            json!({"group": "g"}),
        )
        .await;
    assert_eq!(code, 401);
    for page in ["/", "/api/v1/audit"] {
        let response = ctl.http.get(ctl.url(page)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{page}");
    }
    // The liveness check needs none.
    let health = ctl.http.get(ctl.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The browser's login: any user name, the token as password.
    let basic = ctl
        .http
        .get(&devices)
        .basic_auth("whoever", Some(&bob_token))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);

    // From here on as alice; the actor a request names does not count.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "authorization",
        format!("Bearer {alice_token}").parse().unwrap(),
    );
    ctl.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let created = token(
        &ctl,
        json!({ "group": "line-a", "uses": 1, "auto_approve": false }),
    )
    .await;
    assert_eq!(created["created_by"], "alice", "{created}");

    // A device enrolls with its token alone…
    let mut config = ctl.agent_config("op-1", 50);
    config.enrollment_token = created["token"].as_str().unwrap().to_string();
    config.enrollment_retry_s = 1;
    let agent = ctl.spawn_agent_with(config);
    wait_until("the enrollment is pending", WAIT, || async {
        ctl.get("/api/v1/enrollments").await[0]["status"] == "pending"
    })
    .await;
    // …bob approves it with his token, naming someone else…
    let approved = ctl
        .http
        .post(ctl.url("/api/v1/enrollments/op-1/approve"))
        .header("authorization", format!("Bearer {bob_token}"))
        .header(edgeloop_controller::api::ACTOR_HEADER, "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let approved: Value = approved.json().await.unwrap();
    assert_eq!(approved["decided_by"], "bob", "{approved}");
    // …and it downloads its bundle without one.
    ctl.wait_for_model("op-1", None).await;
    ctl.publish_example(1).await;
    let (code, rollout) = ctl
        .post_as(
            "mallory",
            "/api/v1/rollouts",
            json!({"model": "vibration", "version": 1}),
        )
        .await;
    assert_eq!(code, 201, "{rollout}");
    ctl.wait_for_model("op-1", Some(1)).await;
    let artifact = reqwest::get(ctl.url("/artifacts/vibration/1"))
        .await
        .unwrap();
    assert_eq!(artifact.status(), 200);

    let audit = ctl.get("/api/v1/audit?limit=100").await;
    let actors = who_did_what(&audit);
    for done in [
        ("alice", "token.create"),
        ("bob", "device.approve"),
        ("alice", "rollout.create"),
    ] {
        assert!(actors.contains(&done), "{done:?}: {audit}");
    }
    assert!(
        !actors.iter().any(|(actor, _)| *actor == "mallory"),
        "{audit}"
    );
    agent.stop().await;
    ctl.stop().await;
}
