//! The health window: a model that passes its smoke test but degrades live metrics is rolled
//! back by the device itself, which reports why; a healthy one is committed once the window
//! has passed.

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
