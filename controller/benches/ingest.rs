//! Telemetry on the wire and into the store, against the broker's own rate, in one run:
//!
//! 1. bytes per drift summary: one envelope alone, and in batches of 64 (plain and zstd),
//!    with MQTT's fixed header and topic counted, in JSON and in MessagePack;
//! 2. the broker's raw delivery rate: 8 publishers send 20 480 summaries at QoS 1 to a
//!    plain subscriber (automatic acknowledgements, nothing stored), paced in rounds so
//!    that no broker queue overflows;
//! 3. the controller's ingest rate for the same traffic through the same broker:
//!    validation, SQLite transactions of up to 128 publishes, manual acknowledgements after
//!    each commit, and a receipt per device and commit. Done with single envelopes and with
//!    zstd batches of 64 (81 920 summaries, so that a batched run lasts about a second too),
//!    in each format, each against the raw rate of single summaries in the same run; five
//!    runs of each (`EDGELOOP_BENCH_RUNS`), with the median and the range of the ratios.
//!
//! Run: `cargo bench -p edgeloop-controller --bench ingest` (embedded broker), or with
//! `EDGELOOP_BENCH_MQTT_URL=mqtt://127.0.0.1:1883` against another broker (Mosquitto).
//!
//! `EDGELOOP_BENCH_PACING=credit` keeps up to 256 publishes outstanding
//! (`EDGELOOP_BENCH_CREDIT` sets another number), sending the next as soon as one is done,
//! instead of rounds that each wait for the previous one to drain: the pipeline never
//! empties, so both runs measure capacity rather than round trips. With Mosquitto 2.0.11
//! (default limits) the raw subscriber then loses messages ("Outgoing messages are being
//! dropped" in its log) and the run stops as stalled; use it with the embedded broker, or
//! with a Mosquitto whose `max_queued_messages` holds the credit.
//!
//! `EDGELOOP_BENCH_DEVICES` sets how many devices (publishers, each on its own topic) share
//! the 20 480 summaries and each round's 256 publishes: 8 by default, up to 256, one
//! publish per device per round, as a fleet of many devices each sending its window's
//! summary would. `EDGELOOP_BENCH_FORMAT=json|msgpack` runs one format only.
//! `EDGELOOP_BENCH_BROKER_PID`, the process id of an external broker on this machine, adds
//! the broker's CPU to each run.
//!
//! `EDGELOOP_BENCH_STAGE=make|decode|store` runs only the controller's own work on the
//! summaries, with no broker and no clock: making them, then decoding them, then storing
//! them too. Under callgrind the differences between the three totals are the decode's
//! and the store's instructions per summary, repeatable whatever else the machine does
//! (`EDGELOOP_BENCH_FORMAT=msgpack` for MessagePack summaries):
//!
//! ```sh
//! for s in make decode store; do EDGELOOP_BENCH_STAGE=$s valgrind --tool=callgrind \
//!   target/release/deps/ingest-* --bench; done
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgeloop_agent::source::{InputSource, ShiftControl, VibrationGenerator};
use edgeloop_controller::broker::EmbeddedBroker;
use edgeloop_controller::config::ControllerConfig;
use edgeloop_controller::server::Controller;
use edgeloop_shared::batch::{self, Encoding};
use edgeloop_shared::drift::{DEFAULT_BINS, DriftWindow, ReferenceProfile};
use edgeloop_shared::protocol::{DriftSummary, Envelope, Format, Message, ModelRef};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Summaries in a single-envelope run, from all devices together.
const TOTAL: usize = 20_480;
const BATCH: usize = 64;
/// A batched run sends this many times the summaries of a single-envelope run, so that it
/// too lasts about a second instead of a fraction of one.
const BATCHED_RUN: usize = 4;

/// Drift summaries as the agent makes them: the example model's reference profile, 200
/// synthetic inputs per window.
fn summaries(device: &str, n: usize, format: Format) -> Vec<Vec<u8>> {
    let reader = csv::Reader::from_reader(edgeloop_controller::demo::REFERENCE_V1.as_bytes());
    let mut reader = reader;
    let names: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let mut columns = vec![Vec::new(); names.len()];
    for record in reader.records() {
        for (c, v) in record.unwrap().iter().enumerate() {
            columns[c].push(v.parse::<f64>().unwrap());
        }
    }
    let profile = ReferenceProfile::from_columns(&names, &columns, DEFAULT_BINS).unwrap();
    let mut source = VibrationGenerator::new(3, ShiftControl::default());
    (0..n)
        .map(|seq| {
            let mut window = DriftWindow::new(profile.clone(), 0);
            for _ in 0..200 {
                let row = source.next_row().unwrap();
                window.observe(&row, Some(seq % 2)).unwrap();
            }
            Envelope::new(
                device,
                uuid::Uuid::now_v7().to_string(),
                1_764_400_000_000,
                Message::DriftSummary(DriftSummary {
                    model: ModelRef {
                        name: "vibration".into(),
                        version: 1,
                    },
                    window_seq: seq as u64 + 1,
                    stats: window.finish(1_764_400_010_000),
                }),
            )
            .encode_as(format)
        })
        .collect()
}

/// MQTT PUBLISH size at QoS 1: fixed header (1 + up to 4 length bytes), topic length,
/// topic, packet id, payload.
fn publish_bytes(topic: &str, payload: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

fn client(url: &str, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let addr = edgeloop_agent::link::BrokerAddr::parse(url).unwrap();
    let mut options = MqttOptions::new(id, addr.host, addr.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(100);
    // As the agent's and the controller's connections: without Nagle's algorithm.
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    edgeloop_agent::link::no_delay(&mut eventloop);
    (client, eventloop)
}

/// This process's CPU time so far (user and system, all threads), from `/proc/self/stat`
/// in clock ticks of 10 ms; 0 where there is no such file.
fn cpu_seconds() -> f64 {
    process_cpu_seconds("self").unwrap_or(0.0)
}

/// The CPU time of the broker process named by `EDGELOOP_BENCH_BROKER_PID` (an external
/// broker on this machine), when there is one.
fn broker_cpu_seconds() -> Option<f64> {
    let pid = std::env::var("EDGELOOP_BENCH_BROKER_PID").ok()?;
    Some(process_cpu_seconds(&pid).expect("EDGELOOP_BENCH_BROKER_PID names no process"))
}

/// A process's CPU time so far (`self` for this one).
fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses): utime and stime are the 12th and
    // the 13th.
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// A run of traffic: how long it took, and the CPU this process spent meanwhile. With the
/// embedded broker that is all of it (publishers, broker, subscriber or controller); with
/// another broker, all but the broker's.
struct Run {
    envelopes: usize,
    publishes: usize,
    elapsed: Duration,
    cpu_s: f64,
    /// The external broker's, with `EDGELOOP_BENCH_BROKER_PID`.
    broker_cpu_s: Option<f64>,
}

impl Run {
    /// Envelopes per second.
    fn rate(&self) -> f64 {
        self.envelopes as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu(&self) -> String {
        // /proc counts CPU in ticks of 10 ms.
        if self.elapsed < Duration::from_millis(100) {
            return "too short to count CPU".into();
        }
        let broker = match self.broker_cpu_s {
            Some(s) => format!("; broker {:.2} cores", s / self.elapsed.as_secs_f64()),
            None => String::new(),
        };
        format!(
            "cpu {:.1} us per publish, {:.2} of the cores{broker}",
            self.cpu_s * 1e6 / self.publishes as f64,
            self.cpu_s / self.elapsed.as_secs_f64()
        )
    }
}

/// Devices, each publishing from its own client: 8 unless `EDGELOOP_BENCH_DEVICES` says
/// otherwise (a divisor of [`TOTAL`], at most [`ROUND`]).
fn devices() -> usize {
    let n = std::env::var("EDGELOOP_BENCH_DEVICES")
        .ok()
        .map(|n| n.parse().expect("EDGELOOP_BENCH_DEVICES is a number"))
        .unwrap_or(8);
    assert!(
        n > 0 && TOTAL.is_multiple_of(n) && n <= ROUND,
        "EDGELOOP_BENCH_DEVICES divides {TOTAL} and is at most {ROUND}"
    );
    n
}

/// Publishes per round, from all devices together (the same share from each); after each
/// round the publishers wait until `done` reaches everything sent so far (in envelopes).
/// The rounds bound what waits in the broker, so that no broker queue limit (Mosquitto's
/// `max_queued_messages` is 1000) drops anything and both runs measure delivery, not loss.
const ROUND: usize = 256;
/// With `EDGELOOP_BENCH_PACING=credit`: most publishes sent and not yet done, as many as
/// a round holds unless `EDGELOOP_BENCH_CREDIT` says otherwise.
const CREDIT: usize = ROUND;

fn credit() -> u64 {
    std::env::var("EDGELOOP_BENCH_CREDIT")
        .ok()
        .map(|c| {
            c.parse()
                .expect("EDGELOOP_BENCH_CREDIT is a number of publishes")
        })
        .unwrap_or(CREDIT as u64)
}

/// How the publishers pace themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pacing {
    /// Rounds of [`ROUND`] payloads per device, each waiting for everything before it.
    Rounds,
    /// At most [`CREDIT`] publishes outstanding at any time.
    Credit,
}

fn pacing() -> Pacing {
    match std::env::var("EDGELOOP_BENCH_PACING").as_deref() {
        Ok("credit") => Pacing::Credit,
        Ok("rounds") | Err(_) => Pacing::Rounds,
        Ok(other) => panic!("EDGELOOP_BENCH_PACING is rounds or credit, not `{other}`"),
    }
}

/// Waits until `done` reaches `target` envelopes. tokio's timers tick in milliseconds,
/// so each poll waits up to one (BENCHMARKS.md tells what a finer wait changed).
async fn wait_for(tag: &str, done: &(dyn Fn() -> u64 + Sync), target: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done() < target {
        assert!(
            Instant::now() < deadline,
            "{tag}: stalled at {} of {target}",
            done()
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn publish_paced(
    url: &str,
    tag: &str,
    traffic: &[(String, Vec<Vec<u8>>)],
    per_publish: usize,
    done: &(dyn Fn() -> u64 + Sync),
) -> Run {
    let mut clients = Vec::new();
    for i in 0..traffic.len() {
        let (client, mut eventloop) = client(url, &format!("bench-{tag}-pub-{i}"));
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    panic!("publisher connection: {e}");
                }
            }
        });
        clients.push((client, task));
    }
    let start = Instant::now();
    let cpu = cpu_seconds();
    let broker_cpu = broker_cpu_seconds();
    let credit = credit();
    let longest = traffic.iter().map(|t| t.1.len()).max().unwrap_or(0);
    let per_publish = per_publish as u64;
    let mut sent = 0u64;
    // Rounds send each device's share of a round and then wait for all of them; credit
    // sends one payload per device in turn, each when there is room for it.
    let pacing = pacing();
    let step = match pacing {
        Pacing::Rounds => ROUND / traffic.len(),
        Pacing::Credit => 1,
    };
    for first in (0..longest).step_by(step) {
        for ((topic, payloads), (client, _)) in traffic.iter().zip(&clients) {
            for p in payloads.iter().skip(first).take(step) {
                if pacing == Pacing::Credit {
                    let room = (sent + per_publish).saturating_sub(credit * per_publish);
                    wait_for(tag, done, room).await;
                }
                client
                    .publish(topic, QoS::AtLeastOnce, false, p.clone())
                    .await
                    .unwrap();
                sent += per_publish;
            }
        }
        if pacing == Pacing::Rounds {
            wait_for(tag, done, sent).await;
        }
    }
    wait_for(tag, done, sent).await;
    let run = Run {
        envelopes: sent as usize,
        publishes: traffic.iter().map(|t| t.1.len()).sum(),
        elapsed: start.elapsed(),
        cpu_s: cpu_seconds() - cpu,
        broker_cpu_s: broker_cpu_seconds()
            .zip(broker_cpu)
            .map(|(end, start)| end - start),
    };
    for (_, task) in clients {
        task.abort();
    }
    run
}

/// The broker's delivery of `traffic` to one plain subscriber (`per_publish` envelopes in
/// each payload). The same payloads go to topics under another root, which the controller
/// does not hear.
async fn raw_run(url: &str, traffic: &[(String, Vec<Vec<u8>>)], per_publish: usize) -> Run {
    let traffic: Vec<(String, Vec<Vec<u8>>)> = traffic
        .iter()
        .map(|(topic, payloads)| (format!("raw-{topic}"), payloads.clone()))
        .collect();
    let traffic = &traffic[..];
    let (sub, mut eventloop) = client(url, &format!("bench-raw-sub-{}", uuid::Uuid::new_v4()));
    let filter = format!("{}/#", traffic[0].0.split("/v1/").next().unwrap());
    sub.subscribe(&filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(per_publish as u64, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber connection: {e}"),
            }
        }
    });
    let run = publish_paced(url, "raw", traffic, per_publish, &|| {
        received.load(Ordering::Relaxed)
    })
    .await;
    receiver.abort();
    drop(sub);
    run
}

/// The controller's ingest of `traffic`, and how many publishes each store transaction
/// took in.
async fn ingest_run(
    controller: &Controller,
    traffic: &[(String, Vec<Vec<u8>>)],
    per_publish: usize,
) -> (Run, f64) {
    let start = controller.stats.snapshot();
    let before = start.stored;
    let run = publish_paced(
        &controller.mqtt_url,
        "ingest",
        traffic,
        per_publish,
        &|| {
            let s = controller.stats.snapshot();
            assert_eq!(s.malformed + s.duplicates + s.store_errors, 0, "{s:?}");
            s.stored - before
        },
    )
    .await;
    let end = controller.stats.snapshot();
    let per_commit =
        (end.received - start.received) as f64 / (end.commits - start.commits).max(1) as f64;
    (run, per_commit)
}

/// The median and the range of `ratios`, as `0.80x (0.75-0.90x)`.
fn spread(ratios: &mut [f64]) -> String {
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    format!(
        "median {median:.2}x (range {:.2}-{:.2}x)",
        ratios[0],
        ratios[ratios.len() - 1]
    )
}

/// Seconds to store `envelopes` into a new SQLite store at `path`, in groups of 80 (about
/// the size ingest forms), each moved into its group as ingest does.
async fn store_seconds(path: &std::path::Path, envelopes: Vec<Envelope>) -> f64 {
    let store = edgeloop_controller::store::SqliteStore::open(path).unwrap();
    let mut envelopes = envelopes.into_iter();
    let start = Instant::now();
    loop {
        let group: Vec<Envelope> = envelopes.by_ref().take(80).collect();
        if group.is_empty() {
            break;
        }
        edgeloop_controller::store::Store::ingest_many(&store, group.into(), 1_764_400_020_000)
            .await
            .unwrap();
    }
    // And the hourly aggregates ingest folded in memory, as the minute's flush writes them.
    edgeloop_controller::store::Store::flush_hourly(&store)
        .await
        .unwrap();
    start.elapsed().as_secs_f64()
}

/// Decodes and validates every publish as ingest does, taking the devices in turn as a
/// broker interleaves them.
fn decode_all(topics: &Topics, traffic: &[(String, Vec<Vec<u8>>)]) -> Vec<Envelope> {
    let mut decoded = Vec::with_capacity(traffic.iter().map(|t| t.1.len()).sum());
    let longest = traffic.iter().map(|t| t.1.len()).max().unwrap_or(0);
    for i in 0..longest {
        for (topic, payloads) in traffic {
            if let Some(payload) = payloads.get(i) {
                let checked =
                    edgeloop_controller::ingest::validate(topics, topic, payload).unwrap();
                decoded.extend(checked.accepted);
            }
        }
    }
    decoded
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let external = std::env::var("EDGELOOP_BENCH_MQTT_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let (url, _broker) = match &external {
        Some(url) => (url.clone(), None),
        None => {
            let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
            (broker.url(), Some(broker))
        }
    };
    let root = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topics = Topics::new(&root).unwrap();
    let devices: Vec<String> = (0..devices()).map(|i| format!("bench-{i:03}")).collect();
    let per_device = TOTAL / devices.len();
    // Every call makes new summaries with new message ids.
    let traffic_of = |format: Format, per_device: usize| -> Vec<(String, Vec<Vec<u8>>)> {
        devices
            .iter()
            .map(|d| {
                (
                    topics.device(d, Channel::Telemetry).unwrap(),
                    summaries(d, per_device, format),
                )
            })
            .collect()
    };
    let traffic = |format: Format| traffic_of(format, per_device);
    let only = match std::env::var("EDGELOOP_BENCH_FORMAT").as_deref() {
        Ok("msgpack") => Some(Format::Msgpack),
        Ok("json") => Some(Format::Json),
        Err(_) => None,
        Ok(other) => panic!("EDGELOOP_BENCH_FORMAT is json or msgpack, not `{other}`"),
    };
    if let Ok(stage) = std::env::var("EDGELOOP_BENCH_STAGE") {
        let singles = traffic(only.unwrap_or(Format::Json));
        let decoded = match stage.as_str() {
            "make" => return,
            "decode" | "store" => decode_all(&topics, &singles),
            other => panic!("EDGELOOP_BENCH_STAGE is make, decode or store, not `{other}`"),
        };
        if stage == "store" {
            store_seconds(&dir.path().join("stage.db"), decoded).await;
        }
        return;
    }
    let batched = |singles: &[(String, Vec<Vec<u8>>)]| {
        singles
            .iter()
            .enumerate()
            .map(|(i, (topic, items))| {
                let payloads = items
                    .chunks(BATCH)
                    .map(|c| {
                        let refs: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
                        batch::encode(&devices[i], &refs, Encoding::Zstd)
                    })
                    .collect();
                (topic.clone(), payloads)
            })
            .collect::<Vec<_>>()
    };

    // 1. Bytes on the wire.
    let topic = topics.device(&devices[0], Channel::Telemetry).unwrap();
    println!(
        "bytes per drift summary on the wire (4 features x 12 bins, MQTT header and topic included):"
    );
    for format in [Format::Json, Format::Msgpack] {
        let sample = summaries(&devices[0], BATCH, format);
        let refs: Vec<&[u8]> = sample.iter().map(Vec::as_slice).collect();
        let plain = batch::encode(&devices[0], &refs, Encoding::Identity);
        let zstd = batch::encode(&devices[0], &refs, Encoding::Zstd);
        let per = |bytes: usize| publish_bytes(&topic, bytes) as f64 / BATCH as f64;
        let alone = publish_bytes(&topic, sample[0].len());
        let name = format.as_str();
        println!("  {name:<7} alone            {alone:>7} B");
        println!(
            "  {name:<7} batch of {BATCH}       {:>7.0} B",
            per(plain.len())
        );
        println!(
            "  {name:<7} batch of {BATCH}, zstd {:>7.0} B  ({:.1}x smaller than alone)",
            per(zstd.len()),
            alone as f64 / per(zstd.len())
        );
    }

    // 2 and 3.
    let key = edgeloop_controller::keys::generate().unwrap();
    let shutdown = CancellationToken::new();
    let controller = Controller::start(
        ControllerConfig {
            data_dir: dir.path().join("controller"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            mqtt_url: url.clone(),
            mqtt_client_id: format!("{root}-controller"),
            topic_root: root.clone(),
            // One controller: no shared-subscription group (rumqttd 0.20's router panics
            // when a member of a shared group disconnects).
            mqtt_shared_group: String::new(),
            ..ControllerConfig::default()
        },
        key,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let total = TOTAL as u64;
    println!(
        "\nbroker: {}; pacing: {}",
        if external.is_some() {
            url.as_str()
        } else {
            "embedded rumqttd"
        },
        match pacing() {
            Pacing::Rounds => format!("rounds of {} publishes per device", ROUND / devices.len()),
            Pacing::Credit => format!("{} publishes outstanding", credit()),
        }
    );
    // The controller's own costs per summary, without a broker: decoding and validating
    // a publish, and storing decoded envelopes in groups the size ingest forms.
    println!("controller work per summary, no broker ({total} summaries):");
    // Each format's summaries serve its measures of controller work, then its raw and
    // ingest rates (the raw run's topics are not the controller's); its batches are new
    // summaries, so that none is a duplicate of one the controller has stored.
    let formats: Vec<Format> = [Format::Json, Format::Msgpack]
        .into_iter()
        .filter(|f| only.is_none_or(|o| o == *f))
        .collect();
    let singles: Vec<_> = formats.iter().map(|f| traffic(*f)).collect();
    for (format, singles) in formats.iter().zip(&singles) {
        let start = Instant::now();
        let decoded = decode_all(&topics, singles);
        let decode_s = start.elapsed().as_secs_f64();
        let db = dir.path().join(format!("alone-{}.db", format.as_str()));
        let n = decoded.len() as f64;
        let store_s = store_seconds(&db, decoded).await;
        let name = format.as_str();
        println!(
            "  {name:<7} decode and validate {:>6.1} us ({:.0}/s)",
            decode_s * 1e6 / n,
            n / decode_s
        );
        println!(
            "  {name:<7} store, groups of 80 {:>6.1} us ({:.0}/s)",
            store_s * 1e6 / n,
            n / store_s
        );
    }
    // Each run is short (a fraction of a second at these rates), so there are several, each
    // pair (raw, then ingest) back to back; a run after the first makes new summaries, so
    // that none is a duplicate of one the controller has stored.
    let runs: usize = std::env::var("EDGELOOP_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(5);
    for (format, singles) in formats.into_iter().zip(singles) {
        let name = format.as_str();
        println!(
            "{name}: {runs} runs of {total} summaries from {} devices as single envelopes, \
             then {} in zstd batches of {BATCH}; each ratio is ingest over the same run's raw \
             rate of single summaries",
            devices.len(),
            total as usize * BATCHED_RUN
        );
        let mut first = Some(singles);
        let (mut single_ratios, mut batch_ratios) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let singles = first.take().unwrap_or_else(|| traffic(format));
            let raw = raw_run(&url, &singles, 1).await;
            let (ingest, per_commit) = ingest_run(&controller, &singles, 1).await;
            let batches = batched(&traffic_of(format, per_device * BATCHED_RUN));
            let raw_batched = raw_run(&url, &batches, BATCH).await;
            let (ingest_batched, per_commit_batched) =
                ingest_run(&controller, &batches, BATCH).await;
            single_ratios.push(ingest.rate() / raw.rate());
            batch_ratios.push(ingest_batched.rate() / raw.rate());
            println!(
                "  run {run}: broker raw delivery {:>7.0} summaries/s  ({})",
                raw.rate(),
                raw.cpu()
            );
            println!(
                "    single: controller ingest {:>7.0} summaries/s  {:.2}x  ({}; {per_commit:.1} \
                 publishes per commit)",
                ingest.rate(),
                ingest.rate() / raw.rate(),
                ingest.cpu()
            );
            println!(
                "    batches: broker raw delivery {:.0} publishes/s ({:.0} summaries/s, not \
                 decoded); controller ingest {:>7.0} summaries/s  {:.2}x  ({}; \
                 {per_commit_batched:.1} publishes per commit)",
                raw_batched.rate() / BATCH as f64,
                raw_batched.rate(),
                ingest_batched.rate(),
                ingest_batched.rate() / raw.rate(),
                ingest_batched.cpu()
            );
        }
        println!("  {name} single envelopes: {}", spread(&mut single_ratios));
        println!(
            "  {name} zstd batches of {BATCH}: {}",
            spread(&mut batch_ratios)
        );
    }
    shutdown.cancel();
    controller.stop().await;
}
