//! A broker that sends the controller more than it can store at once: with a large
//! in-flight window (Mosquitto's `max_inflight_messages 5000`) thousands of unacknowledged
//! publishes reach the controller in a burst. It must keep reading its connection while it stores,
//! acknowledges and answers them (its acknowledgements leave through that connection), and
//! take in every one.
//!
//! Runs its own Mosquitto on a free port; skipped without the binary unless
//! `EDGELOOP_TEST_MQTT_URL` says real services are expected, then it fails.

use std::time::Duration;

use edgeloop_shared::protocol::{DeviceStatus, Envelope, Message};
use edgeloop_shared::topics::{Channel, Topics};
use edgeloop_tests::{
    BrokerChoice, Mosquitto, RawClient, TestController, free_port, wait_for_port, wait_until,
};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2_000;

fn heartbeat(device: &str) -> Vec<u8> {
    Envelope::new(
        device,
        uuid::Uuid::now_v7().to_string(),
        edgeloop_agent::now_ms(),
        Message::Status(DeviceStatus {
            online: true,
            ..DeviceStatus::default()
        }),
    )
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_request_window_is_taken_in_whole() {
    edgeloop_tests::init_tracing();
    if !Mosquitto::available() {
        eprintln!("skipped: no mosquitto binary");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = Mosquitto::write_config(
        dir.path(),
        port,
        "max_inflight_messages 5000\nmax_queued_messages 0\n",
    );
    let _broker = Mosquitto::start(&config);
    wait_for_port(port).await;
    let url = format!("mqtt://127.0.0.1:{port}");
    let ctl = TestController::start_with(BrokerChoice::Embedded, |c| c.mqtt_url = url.clone())
        .await
        .unwrap();
    let topics = Topics::new(&ctl.root).unwrap();

    // The controller hears devices once its subscription is in place: probe until one is
    // stored, then wait for every probe that can still arrive, so the count below is exact.
    let probe = RawClient::connect(&url, "backlog-probe").await;
    let topic = topics.device("probe", Channel::Status).unwrap();
    let stats = &ctl.controller.stats;
    let mut probes = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().stored == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the controller never subscribed"
        );
        probe.publish(&topic, heartbeat("probe")).await;
        probes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Probes sent before the subscription are lost (QoS 1 with nobody subscribed); the
    // others arrive. Wait until nothing more comes for a second.
    let mut last = stats.snapshot().received;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = stats.snapshot().received;
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last <= probes);
    let before = stats.snapshot().stored;

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        publishers.push(RawClient::connect(&url, &format!("backlog-pub-{p}")).await);
    }
    let payloads: Vec<Vec<(String, Vec<u8>)>> = (0..PUBLISHERS)
        .map(|p| {
            (0..PER_PUBLISHER)
                .map(|i| {
                    let device = format!("dev-{p}-{}", i % 4);
                    (
                        topics.device(&device, Channel::Status).unwrap(),
                        heartbeat(&device),
                    )
                })
                .collect()
        })
        .collect();
    let sending: Vec<_> = publishers
        .iter()
        .zip(payloads)
        .map(|(raw, items)| {
            let client = raw.client.clone();
            tokio::spawn(async move {
                for (topic, payload) in items {
                    client
                        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in sending {
        task.await.unwrap();
    }

    let expected = (PUBLISHERS * PER_PUBLISHER) as u64;
    wait_until(
        "every heartbeat of the burst is stored",
        Duration::from_secs(120),
        || async { stats.snapshot().stored - before >= expected },
    )
    .await;
    let s = stats.snapshot();
    assert_eq!(s.stored - before, expected, "{s:?}");
    assert_eq!(
        (s.duplicates, s.malformed, s.store_errors),
        (0, 0, 0),
        "{s:?}"
    );
    ctl.stop().await;
}
