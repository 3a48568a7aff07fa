//! Staged rollouts with real agents: waves open one after another, a failing wave pauses
//! or aborts the rollout at its threshold, an abort rolls back the devices that took the new
//! version, and the audit log says who did what.
//!
//! The failures are real: model v2 was trained on the shifted regime, so its health window
//! rolls it back on a device that sees unshifted data, and commits it on a shifted one.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeloop_controller::plan::RolloutPlan;
use edgeloop_tests::{
    BrokerChoice, ControllerProcess, TestAgent, TestController, agent_config, on_both_brokers,
    wait_until,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// 200 inputs a window at 100 a second.
const WINDOW: u64 = 200;
const MAX_PSI: f64 = 0.3;
const HEALTH_WINDOW_S: u64 = 4;
const WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    ctl: TestController,
    agents: Vec<TestAgent>,
    ids: Vec<String>,
}

impl Fleet {
    /// `n` agents watching new models for a health window, those `shifted` says seeing the
    /// shifted regime; all on model v1 (rollout 1), with v2 published.
    /// Devices are named `{prefix}-0`…: each test its own prefix, because tests run at once
    /// against the one external broker, where a device id is an MQTT client id.
    async fn start(
        broker: BrokerChoice,
        prefix: &str,
        n: usize,
        shifted: impl Fn(&str) -> bool,
    ) -> Option<Self> {
        Self::start_with(broker, prefix, n, shifted, MAX_PSI).await
    }

    /// [`Fleet::start`] with the health window's PSI limit (0: drift not watched).
    async fn start_with(
        broker: BrokerChoice,
        prefix: &str,
        n: usize,
        shifted: impl Fn(&str) -> bool,
        max_psi: f64,
    ) -> Option<Self> {
        Self::start_configured(broker, prefix, n, shifted, |c| c.health.max_psi = max_psi).await
    }

    /// [`Fleet::start`] with changes to each agent's configuration.
    async fn start_configured(
        broker: BrokerChoice,
        prefix: &str,
        n: usize,
        shifted: impl Fn(&str) -> bool,
        configure: impl Fn(&mut edgeloop_agent::config::AgentConfig),
    ) -> Option<Self> {
        let ctl = TestController::start(broker).await?;
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let mut agents = Vec::new();
        for id in &ids {
            let mut config = ctl.agent_config(id, WINDOW);
            config.health.window_s = HEALTH_WINDOW_S;
            configure(&mut config);
            let agent = ctl.spawn_agent_with(config);
            if shifted(id) {
                agent.shift.set(1.0);
            }
            agents.push(agent);
        }
        for id in &ids {
            ctl.wait_for_model(id, None).await;
        }
        ctl.publish_example(1).await;
        let v1 = ctl.controller.rollout("vibration", 1, None).await.unwrap();
        assert_eq!(v1.id, 1);
        for id in &ids {
            ctl.wait_for_model(id, Some(1)).await;
        }
        ctl.publish_example(2).await;
        Some(Fleet { ctl, agents, ids })
    }

    /// Publishes `onnx` as v3 of the example model, with v1's reference data.
    async fn publish_v3(&self, onnx: &[u8], label: &str) {
        let reference = self.ctl.dir.path().join("reference-v3.csv");
        std::fs::write(&reference, edgeloop_controller::demo::REFERENCE_V1).unwrap();
        self.ctl
            .controller
            .publish(edgeloop_controller::registry::PublishRequest {
                label: Some(label.into()),
                class_labels: vec!["normal".into(), "fault".into()],
                ..edgeloop_controller::registry::PublishRequest::new(
                    "vibration",
                    3,
                    onnx,
                    &reference,
                )
            })
            .await
            .unwrap();
    }

    /// Rolls `version` out to a canary, then everyone, under `plan`'s telemetry gate (a
    /// plan's fields beyond the waves), and checks that the gate stops it at the canary:
    /// paused for a reason that starts with `reason`, the canary committed, no command sent
    /// to the second wave.
    async fn stops_at_the_canary(&self, version: u64, plan: Value, reason: &str) {
        let mut plan = plan;
        plan["waves"] = json!(["1", "100%"]);
        let (code, created) = self
            .ctl
            .post_rollout(json!({ "model": "vibration", "version": version, "plan": plan }))
            .await;
        assert_eq!(code, 201, "{created}");
        let id = created["id"].as_u64().unwrap();
        let waves = waves_of(&created);
        let canary = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();
        let paused = self.wait_for_status(id, "paused").await;
        let said = paused["reason"].as_str().unwrap();
        assert!(said.starts_with(reason), "{said}");
        assert_eq!(
            deployment(&paused, &canary)["status"],
            "committed",
            "{paused}"
        );
        for (device, _) in waves.iter().filter(|(_, w)| **w == 1) {
            assert!(
                deployment(&paused, device)["command_seq"].is_null(),
                "{paused}"
            );
        }
    }

    async fn rollout(&self, id: u64) -> Value {
        self.ctl.get(&format!("/api/v1/rollouts/{id}")).await
    }

    /// Waits until rollout `id` exists and has `status` (a rollback rollout is created
    /// only after the abort that causes it is recorded).
    async fn wait_for_status(&self, id: u64, status: &str) -> Value {
        let url = self.ctl.url(&format!("/api/v1/rollouts/{id}"));
        wait_until(&format!("rollout {id} {status}"), WAIT, || async {
            let response = reqwest::get(&url).await.expect("GET");
            response.status().is_success()
                && response.json::<Value>().await.expect("JSON")["status"] == status
        })
        .await;
        self.rollout(id).await
    }

    async fn audit(&self) -> Vec<(String, String, String)> {
        let log = self.ctl.get("/api/v1/audit?limit=100").await;
        let mut entries: Vec<_> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["actor"].as_str().unwrap().to_string(),
                    e["action"].as_str().unwrap().to_string(),
                    e["target"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        entries.reverse();
        entries
    }

    async fn stop(self) {
        for agent in self.agents {
            agent.stop().await;
        }
        self.ctl.stop().await;
    }
}

fn waves_of(rollout: &Value) -> BTreeMap<String, u64> {
    rollout["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                d["wave"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A completed rollout whose every device has committed the model.
fn all_committed(rollout: &Value) -> bool {
    rollout["status"] == "completed"
        && rollout["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "committed")
}

fn deployment<'a>(rollout: &'a Value, device: &str) -> &'a Value {
    rollout["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .unwrap()
}

async fn waves_open_one_after_another_until_the_rollout_completes(broker: BrokerChoice) {
    let Some(fleet) = Fleet::start(broker, "wv-ok", 3, |_| true).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let (code, created) = fleet
        .ctl
        .post_rollout(json!({
            "model": "vibration", "version": 2,
            "plan": { "waves": ["1", "2", "100%"] },
        }))
        .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let waves = waves_of(&created);
    assert_eq!(waves.values().filter(|&&w| w == 0).count(), 1, "{created}");
    assert_eq!(waves.values().filter(|&&w| w == 1).count(), 1, "{created}");
    assert_eq!(waves.values().filter(|&&w| w == 2).count(), 1, "{created}");

    // The last wave's devices count as running once active; their health windows then
    // commit them.
    fleet.wait_for_status(id, "completed").await;
    wait_until("every device committed", WAIT, || async {
        all_committed(&fleet.rollout(id).await)
    })
    .await;
    // No device of a wave heard of the rollout before every device of the wave before it
    // had committed.
    let mut first_report = BTreeMap::new();
    let mut committed = BTreeMap::new();
    for device in &fleet.ids {
        let events = fleet
            .ctl
            .get(&format!("/api/v1/devices/{device}/deployments?limit=100"))
            .await;
        let ours: Vec<&Value> = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["rollout_id"] == id)
            .collect();
        let times = ours.iter().map(|e| e["received_ms"].as_u64().unwrap());
        first_report.insert(device.clone(), times.min().unwrap());
        let commit = ours.iter().find(|e| e["stage"] == "committed").unwrap();
        committed.insert(device.clone(), commit["received_ms"].as_u64().unwrap());
    }
    for wave in 1..3 {
        let previous_done = waves
            .iter()
            .filter(|(_, w)| **w == wave - 1)
            .map(|(d, _)| committed[d])
            .max()
            .unwrap();
        for (device, _) in waves.iter().filter(|(_, w)| **w == wave) {
            assert!(
                first_report[device] >= previous_done,
                "{device} (wave {wave}) reported at {} before wave {} had committed at {previous_done}",
                first_report[device],
                wave - 1
            );
        }
    }
    let audit = fleet.audit().await;
    let advances = audit
        .iter()
        .filter(|(actor, action, target)| {
            actor == "controller"
                && action == "rollout.advance"
                && *target == format!("rollout/{id}")
        })
        .count();
    assert_eq!(advances, 2, "{audit:?}");

    // A finished rollout cannot be paused or aborted: a conflict that says why.
    let (code, body) = fleet
        .ctl
        .post_as("ops", &format!("/api/v1/rollouts/{id}/abort"), json!({}))
        .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("is completed"),
        "{body}"
    );
    fleet.stop().await;
}
on_both_brokers!(waves_open_one_after_another_until_the_rollout_completes);

async fn a_failing_canary_pauses_the_rollout_until_an_operator_acts(broker: BrokerChoice) {
    let Some(fleet) = Fleet::start(broker, "wv-pause", 3, |_| false).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    // A plan with a bad field is refused with the field's name, and creates nothing.
    for (plan, field) in [
        (json!({ "waves": ["50%"] }), "waves"),
        (json!({ "failure_threshold": 2.0 }), "failure_threshold"),
        (json!({ "wave": ["1"] }), "wave"),
    ] {
        let (code, body) = fleet
            .ctl
            .post_rollout(json!({ "model": "vibration", "version": 2, "plan": plan }))
            .await;
        assert_eq!(code, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(field), "{body}");
    }

    let (code, created) = fleet
        .ctl
        .post_as(
            "alice",
            "/api/v1/rollouts",
            json!({
                "model": "vibration", "version": 2, "reason": "canary first",
                "plan": { "waves": ["1", "100%"], "failure_threshold": 0.5 },
            }),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let waves = waves_of(&created);
    let canary = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();

    // The canary rolls v2 back by itself; the rollout pauses; the others never hear of it.
    let paused = fleet.wait_for_status(id, "paused").await;
    assert_eq!(deployment(&paused, &canary)["status"], "rolled_back");
    let reason = paused["reason"].as_str().unwrap();
    assert!(reason.contains("wave 0: 1 of 1 executed"), "{reason}");
    for (device, _) in waves.iter().filter(|(_, w)| **w == 1) {
        let d = deployment(&paused, device);
        assert_eq!(d["status"], "pending", "{paused}");
        assert!(d["command_seq"].is_null(), "{paused}");
    }
    let (code, body) = fleet
        .ctl
        .post_as("bob", &format!("/api/v1/rollouts/{id}/pause"), json!({}))
        .await;
    assert_eq!(code, 409, "already paused: {body}");

    // Resuming overrides the failed wave: the next one opens, fails the same way, and the
    // threshold pauses the rollout again.
    let (code, resumed) = fleet
        .ctl
        .post_as(
            "bob",
            &format!("/api/v1/rollouts/{id}/resume"),
            json!({ "reason": "the canary's data is odd" }),
        )
        .await;
    assert_eq!(code, 200, "{resumed}");
    assert_eq!(resumed["rollout"]["current_wave"], 1, "{resumed}");
    wait_until("wave 1 fails too", WAIT, || async {
        let r = fleet.rollout(id).await;
        r["status"] == "paused" && r["reason"].as_str().unwrap().starts_with("wave 1:")
    })
    .await;
    // The threshold trips on the first failure; a device of the wave that was still
    // installing then rolls v2 back by itself too. Once every deployment that went out
    // has ended, nobody runs v2.
    wait_until("every deployment that went out has ended", WAIT, || async {
        let r = fleet.rollout(id).await;
        r["deployments"].as_array().unwrap().iter().all(|d| {
            d["command_seq"].is_null()
                || matches!(d["status"].as_str(), Some("failed" | "rolled_back"))
        })
    })
    .await;

    // Abort: nobody runs v2 any more, so there is nothing to roll back.
    let (code, aborted) = fleet
        .ctl
        .post_as(
            "bob",
            &format!("/api/v1/rollouts/{id}/abort"),
            json!({ "reason": "v2 does not fit", "rollback": true }),
        )
        .await;
    assert_eq!(code, 200, "{aborted}");
    assert_eq!(aborted["rollout"]["status"], "aborted");
    assert_eq!(aborted["rollbacks"], json!([]), "{aborted}");
    for device in &fleet.ids {
        assert_eq!(fleet.ctl.device(device).await.unwrap()["model_version"], 1);
    }
    let audit = fleet.audit().await;
    let target = format!("rollout/{id}");
    let ours: Vec<(&str, &str)> = audit
        .iter()
        .filter(|(_, _, t)| *t == target)
        .map(|(actor, action, _)| (actor.as_str(), action.as_str()))
        .collect();
    assert_eq!(
        ours,
        [
            ("alice", "rollout.create"),
            ("controller", "rollout.pause"),
            ("bob", "rollout.advance"),
            ("bob", "rollout.resume"),
            ("controller", "rollout.pause"),
            ("bob", "rollout.abort"),
        ],
        "{audit:?}"
    );
    fleet.stop().await;
}
on_both_brokers!(a_failing_canary_pauses_the_rollout_until_an_operator_acts);

async fn a_candidate_that_drifts_stops_at_the_canary_on_the_telemetry_gate(broker: BrokerChoice) {
    // The devices' health windows judge failed inferences only, so every device would
    // commit v2 (trained on the shifted regime) although it does not fit what they see:
    // the fleet-level gate compares its drift with v1's over the same period and stops it.
    let Some(fleet) = Fleet::start_with(broker, "wv-gate", 3, |_| false, 0.0).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    fleet
        .stops_at_the_canary(
            2,
            json!({
                "telemetry_gate": { "max_drift_ratio": 2.0, "min_windows": 3 },
            }),
            "telemetry gate: v2's median drift",
        )
        .await;
    fleet.stop().await;
}
on_both_brokers!(a_candidate_that_drifts_stops_at_the_canary_on_the_telemetry_gate);

async fn a_slower_candidate_stops_at_the_canary_on_the_latency_gate(broker: BrokerChoice) {
    // v3 answers like a classifier, with 16 MiB of weights: every inference costs
    // milliseconds where v1's cost microseconds. No device judges latency by itself (no
    // budget in the bundle); the fleet-level gate compares the canary's p99 with v1's over
    // the same period and stops the rollout there.
    let Some(fleet) = Fleet::start_with(broker, "wv-slow", 3, |_| false, 0.0).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let onnx = edgeloop_controller::trainer::random_mlp(4, 2, 16 << 20);
    fleet.publish_v3(&onnx, "slow").await;
    fleet
        .stops_at_the_canary(
            3,
            json!({
                "telemetry_gate": { "max_latency_ratio": 1.5, "min_windows": 3 },
            }),
            "telemetry gate: v3's median p99 latency",
        )
        .await;
    fleet.stop().await;
}
on_both_brokers!(a_slower_candidate_stops_at_the_canary_on_the_latency_gate);

/// A broken candidate: whatever the input, it calls it a fault (class 1).
fn calls_everything_a_fault() -> Vec<u8> {
    use edgeloop_controller::trainer::{encode_model, float_value, node, tensor};
    encode_model(tract_onnx::pb::GraphProto {
        name: "always_fault".into(),
        node: vec![
            node("MatMul", &["features", "w"], "zero"),
            node("Add", &["zero", "b"], "logits"),
            node("Softmax", &["logits"], "scores"),
        ],
        initializer: vec![
            tensor("w", &[4, 2], vec![0.0; 8]),
            tensor("b", &[2], vec![0.0, 3.0]),
        ],
        input: vec![float_value("features", 4)],
        output: vec![float_value("scores", 2)],
        ..Default::default()
    })
}

async fn a_less_accurate_candidate_stops_at_the_canary_on_the_accuracy_gate(broker: BrokerChoice) {
    // Ground truth comes back for every input, as inspections would report it. v3 calls
    // every input a fault: it runs without an error and its inputs are v1's, so neither the
    // health windows nor the drift gate object, and the canary commits it. The accuracy
    // gate pools the canary's labelled windows against v1's over the same period and stops
    // the rollout there.
    let Some(fleet) = Fleet::start_configured(
        broker,
        "wv-acc",
        3,
        |_| false,
        |c| {
            c.health.max_psi = 0.0;
            c.source.labels = true;
        },
    )
    .await
    else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    fleet
        .publish_v3(&calls_everything_a_fault(), "always a fault")
        .await;
    fleet
        .stops_at_the_canary(
            3,
            json!({
                // PSI below 100 counts as noise here: accuracy alone decides.
                "telemetry_gate": {
                    "drift_floor": 100.0, "max_accuracy_drop": 0.05, "min_labels": 400,
                    "min_windows": 3,
                },
            }),
            "telemetry gate: v3's accuracy",
        )
        .await;
    fleet.stop().await;
}
on_both_brokers!(a_less_accurate_candidate_stops_at_the_canary_on_the_accuracy_gate);

async fn a_failed_wave_aborts_and_rolls_back_the_devices_that_took_the_new_version(
    broker: BrokerChoice,
) {
    // Rollout 2's first wave has two devices: one sees the shifted regime and commits v2,
    // the other does not and rolls it back. The cohorts are a pure function of the
    // rollout id, so the test knows them in advance (and checks it did).
    let plan: RolloutPlan = serde_json::from_value(json!({
        "waves": ["2", "100%"], "failure_threshold": 0.5, "min_executed": 2,
        "on_failure": "abort",
    }))
    .unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("wv-abort-{i}")).collect();
    let predicted = plan.assign(2, &ids);
    let canaries: Vec<&String> = ids
        .iter()
        .zip(&predicted)
        .filter(|(_, w)| **w == 0)
        .map(|(d, _)| d)
        .collect();
    let (taker, refuser) = (canaries[0].clone(), canaries[1].clone());
    let Some(fleet) = Fleet::start(broker, "wv-abort", 4, |id| id == taker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let (code, created) = fleet
        .ctl
        .post_rollout(json!({ "model": "vibration", "version": 2, "plan": plan }))
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["id"], 2);
    assert_eq!(deployment(&created, &taker)["wave"], 0, "{created}");
    assert_eq!(deployment(&created, &refuser)["wave"], 0, "{created}");

    let aborted = fleet.wait_for_status(2, "aborted").await;
    assert_eq!(deployment(&aborted, &taker)["status"], "committed");
    assert_eq!(deployment(&aborted, &refuser)["status"], "rolled_back");
    let reason = aborted["reason"].as_str().unwrap();
    assert!(reason.contains("wave 0: 1 of 2 executed"), "{reason}");
    for (device, wave) in ids.iter().zip(&predicted) {
        if *wave == 1 {
            let d = deployment(&aborted, device);
            assert_eq!(d["status"], "cancelled", "{aborted}");
            assert!(d["command_seq"].is_null(), "{aborted}");
        }
    }

    // The device that took v2 is rolled back to v1 by a rollback rollout of its own.
    let rollback = fleet.wait_for_status(3, "completed").await;
    assert_eq!(rollback["rollback"], true, "{rollback}");
    assert_eq!(rollback["model_version"], 1, "{rollback}");
    assert_eq!(
        waves_of(&rollback).into_keys().collect::<Vec<_>>(),
        std::slice::from_ref(&taker)
    );
    fleet.ctl.wait_for_model(&taker, Some(1)).await;
    for device in &fleet.ids {
        assert_eq!(fleet.ctl.device(device).await.unwrap()["model_version"], 1);
    }
    let audit = fleet.audit().await;
    assert!(
        audit.contains(&(
            "controller".into(),
            "rollout.abort".into(),
            "rollout/2".into()
        )),
        "{audit:?}"
    );
    assert!(
        audit.contains(&(
            "controller".into(),
            "rollout.create".into(),
            "rollout/3".into()
        )),
        "{audit:?}"
    );
    fleet.stop().await;
}
on_both_brokers!(a_failed_wave_aborts_and_rolls_back_the_devices_that_took_the_new_version);

async fn a_controller_killed_mid_rollout_resumes_it_and_deploys_no_device_twice(
    broker: BrokerChoice,
) {
    let Some(mut ctl) = ControllerProcess::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let shutdown = CancellationToken::new();
    let ids: Vec<String> = (0..3).map(|i| format!("wv-kill-{i}")).collect();
    let agents: Vec<TestAgent> = ids
        .iter()
        .map(|id| {
            let mut config = agent_config(id, WINDOW, &ctl.endpoints, &ctl.dir.path().join(id));
            config.health.window_s = HEALTH_WINDOW_S;
            config.health.max_psi = MAX_PSI;
            let agent = TestAgent::spawn(config, &shutdown);
            agent.shift.set(1.0);
            agent
        })
        .collect();
    wait_until("devices register", WAIT, || async {
        ctl.get("/api/v1/devices").await.as_array().unwrap().len() == ids.len()
    })
    .await;
    ctl.publish_example(1);
    ctl.rollout(1).await;
    let on_version = |version: u64| {
        let ctl = &ctl;
        async move {
            ctl.get("/api/v1/devices")
                .await
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["model_version"] == version)
        }
    };
    wait_until("every device on v1", WAIT, || on_version(1)).await;
    ctl.publish_example(2);
    let created = ctl
        .post(
            "/api/v1/rollouts",
            json!({ "model": "vibration", "version": 2, "plan": { "waves": ["1", "100%"] } }),
        )
        .await;
    let id = created["id"].as_u64().unwrap();
    let canary = waves_of(&created)
        .into_iter()
        .find(|(_, w)| *w == 0)
        .unwrap()
        .0;

    // The controller dies while the canary is in its health window; its verdict arrives
    // while the controller is down, and waits in the device's outbox.
    wait_until("the canary activates v2", WAIT, || async {
        let r = ctl.get(&format!("/api/v1/rollouts/{id}")).await;
        deployment(&r, &canary)["status"] == "active"
    })
    .await;
    ctl.kill9();
    tokio::time::sleep(Duration::from_secs(HEALTH_WINDOW_S + 2)).await;
    ctl.run().await;

    wait_until("the rollout completes after the restart", WAIT, || async {
        all_committed(&ctl.get(&format!("/api/v1/rollouts/{id}")).await)
    })
    .await;
    // Each device installed v2 once: one activation, one verdict.
    for device in &ids {
        let events = ctl
            .get(&format!("/api/v1/devices/{device}/deployments?limit=100"))
            .await;
        let stages: Vec<&str> = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["rollout_id"] == id)
            .map(|e| e["stage"].as_str().unwrap())
            .collect();
        for stage in ["active", "committed"] {
            assert_eq!(
                stages.iter().filter(|s| **s == stage).count(),
                1,
                "{device}: {stages:?}"
            );
        }
    }
    shutdown.cancel();
    for agent in agents {
        agent.stop().await;
    }
    ctl.stop().await;
}
on_both_brokers!(a_controller_killed_mid_rollout_resumes_it_and_deploys_no_device_twice);
