//! An agent whose inputs come from I2C sensors: the ADXL345 and TMP102 drivers of
//! `edgeloop-firmware-targets` on the simulated bus, through the whole loop.

use std::time::Duration;

use edgeloop_agent::config::SourceKind;
use edgeloop_tests::{BrokerChoice, TestController, on_both_brokers};

const WINDOW: u64 = 50;

/// The simulated machine's windows, turned into features on the device, are served by the
/// example model; the drift summaries reach the controller with the machine's ground truth
/// as confusion counts, and the model is right about nearly every window.
async fn sensor_windows_flow_through_the_loop(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
        return;
    };
    let mut config = ctl.agent_config("press-1", WINDOW);
    config.source.kind = SourceKind::Sensor;
    config.source.labels = true;
    config.source.sensor.fault_rate = 0.3;
    let agent = ctl.spawn_agent_with(config);
    ctl.wait_for_model("press-1", None).await;
    ctl.publish_example(1).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("press-1", Some(1)).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let summary = loop {
        let rows = ctl.controller.store.telemetry("press-1", 10).await.unwrap();
        if let Some(row) = rows.into_iter().find(|r| r.samples == WINDOW) {
            break row.summary;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full window of sensor inputs after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = &summary["stats"];
    let confusion: Vec<Vec<u64>> = serde_json::from_value(stats["confusion"].clone()).unwrap();
    let labelled: u64 = confusion.iter().flatten().sum();
    assert_eq!(labelled, WINDOW, "{stats}");
    let faults: u64 = confusion[1].iter().sum();
    assert!(
        (3..=30).contains(&faults),
        "{faults} faults at a rate of 0.3: {stats}"
    );
    let accuracy = stats["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "{accuracy}: {stats}");
    // Every feature was read: no missing values.
    for feature in stats["features"].as_array().unwrap() {
        assert_eq!(feature["nan"], 0, "{feature}");
    }

    agent.stop().await;
    ctl.stop().await;
}
on_both_brokers!(sensor_windows_flow_through_the_loop);
