//! The embedded broker's front door (with `broker_auth`): what reading every device packet
//! costs, against the same broker without it, in one run.
//!
//! 8 enrolled devices publish 20 480 payloads the size of a MessagePack drift summary
//! (1 600 B) at QoS 1 to one plain subscriber, paced in rounds of 32 per device as the
//! ingest bench is: once through the door, as devices do, and once straight to rumqttd's
//! own port with the controller's login, which the door does not read. Five runs of each,
//! alternating; each ratio is the door's rate over the direct rate of the same run.
//!
//! Run: `cargo bench -p edgeloop-controller --bench door`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgeloop_controller::broker::{BrokerAuth, EmbeddedBroker};
use edgeloop_controller::store::{SqliteStore, approve_device};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEVICES: usize = 8;
const PER_DEVICE: usize = 2_560;
const ROUND: usize = 32;
const PAYLOAD: usize = 1_600;
const RUNS: usize = 5;
const PASSWORD: &str = "bench-password";

fn client(url: &str, id: &str, login: (String, String)) -> (AsyncClient, rumqttc::EventLoop) {
    let addr = edgeloop_agent::link::BrokerAddr::parse(url).unwrap();
    let mut options = MqttOptions::new(id, addr.host, addr.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_credentials(login.0, login.1)
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    edgeloop_agent::link::no_delay(&mut eventloop);
    (client, eventloop)
}

/// Publishes every device's payloads from one client each (`logins` gives each client's
/// URL, id and login), in rounds, each waiting until the subscriber has them all. Messages
/// per second.
async fn run(
    logins: Vec<(String, String, (String, String))>,
    topics: &[String],
    received: &AtomicU64,
) -> f64 {
    let mut clients = Vec::new();
    for (url, id, login) in logins {
        let (client, mut eventloop) = client(&url, &id, login);
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    panic!("publisher connection: {e}");
                }
            }
        });
        clients.push((client, task));
    }
    let payload = vec![0x5a_u8; PAYLOAD];
    let start = Instant::now();
    let before = received.load(Ordering::Relaxed);
    let mut sent = 0;
    for _ in 0..PER_DEVICE / ROUND {
        for ((client, _), topic) in clients.iter().zip(topics) {
            for _ in 0..ROUND {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .unwrap();
                sent += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.load(Ordering::Relaxed) - before < sent {
            assert!(Instant::now() < deadline, "stalled");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    for (_, task) in clients {
        task.abort();
    }
    rate
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("bench.db")).unwrap());
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("bench-{i:02}")).collect();
    for device in &devices {
        approve_device(store.as_ref(), device, PASSWORD)
            .await
            .unwrap();
    }
    let topics = Topics::default();
    let auth = BrokerAuth::new(store.clone(), "bench-controller", topics.clone()).unwrap();
    let broker = tokio::task::spawn_blocking({
        let auth = auth.clone();
        move || EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), Some(auth))
    })
    .await
    .unwrap()
    .unwrap();

    let (subscriber, mut eventloop) = client(
        &broker.controller_url(),
        "bench-subscriber",
        auth.controller_login(),
    );
    subscriber
        .subscribe(topics.all_devices(Channel::Telemetry), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    tokio::spawn({
        let received = received.clone();
        async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("subscriber connection: {e}"),
                }
            }
        }
    });

    let device_topics: Vec<String> = devices
        .iter()
        .map(|d| topics.device(d, Channel::Telemetry).unwrap())
        .collect();
    println!(
        "{} messages of {PAYLOAD} B from {DEVICES} devices at QoS 1 to one subscriber, \
         embedded rumqttd, rounds of {ROUND} per device",
        DEVICES * PER_DEVICE
    );
    let mut ratios = Vec::new();
    for i in 1..=RUNS {
        let direct = devices
            .iter()
            .map(|d| {
                let id = format!("{d}-direct");
                (broker.controller_url(), id, auth.controller_login())
            })
            .collect();
        let direct = run(direct, &device_topics, &received).await;
        let door = devices
            .iter()
            .map(|d| (broker.url(), d.clone(), (d.clone(), PASSWORD.to_string())))
            .collect();
        let door = run(door, &device_topics, &received).await;
        ratios.push(door / direct);
        println!(
            "  run {i}: straight to rumqttd {direct:>7.0}/s; through the door {door:>7.0}/s  \
             {:.2}x",
            door / direct
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "through the door: median {:.2}x (range {:.2}-{:.2}x) the direct rate",
        ratios[RUNS / 2],
        ratios[0],
        ratios[RUNS - 1]
    );
}
