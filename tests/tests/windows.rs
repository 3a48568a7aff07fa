//! Drift windows close by time as well as by count: an agent whose count would take hours
//! to fill still reports every `drift_window_s` seconds, and never an empty window.

use std::time::Duration;

use edgeloop_tests::{BrokerChoice, TestController, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closes_by_time_long_before_it_fills() {
    const NEVER_FULL: u64 = 1_000_000;
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let mut config = ctl.agent_config("timed-1", NEVER_FULL);
    config.drift_window_s = 1;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("timed-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("timed-1", Some(1)).await;

    wait_until(
        "three windows closed by time",
        Duration::from_secs(30),
        || async {
            ctl.stored_windows("timed-1")
                .await
                .iter()
                .filter(|w| w.0 == 1)
                .count()
                >= 3
        },
    )
    .await;
    let windows = ctl.stored_windows("timed-1").await;
    for (version, seq, samples, _) in windows.iter().filter(|w| w.0 == 1) {
        assert!(
            *samples > 0 && *samples < NEVER_FULL,
            "v{version} window {seq} holds {samples} inputs"
        );
    }
    agent.stop().await;
    ctl.stop().await;
}
