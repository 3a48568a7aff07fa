//! Fault tests with real processes: an agent killed with SIGKILL, a controller killed in
//! the middle of ingest (with the embedded broker that is the broker dying too, for a short
//! and for a long outage), and an outbox that fills its byte budget. Each runs against the
//! embedded broker and SQLite, and against Mosquitto and PostgreSQL when the environment
//! names them.

use std::time::Duration;

use edgeloop_tests::{
    BrokerChoice, ControllerProcess, TestAgent, TestController, agent_config, agent_outbox,
    agent_outbox_telemetry, agent_window_seq, on_both_brokers, spawn_agent_process, wait_until,
};
use tokio_util::sync::CancellationToken;

const WINDOW: u64 = 20;

fn skipped() {
    eprintln!("skipped: {} is not set", edgeloop_tests::MQTT_URL_VAR);
}

/// Asserts that every window numbered 1..=`upto` is stored exactly once, allowing only
/// the windows in `may_miss`.
fn assert_complete(seqs: &[u64], upto: u64, may_miss: &[u64]) {
    let mut seen = std::collections::BTreeSet::new();
    for s in seqs {
        assert!(seen.insert(*s), "window {s} stored twice: {seqs:?}");
    }
    let missing: Vec<u64> = (1..=upto)
        .filter(|s| !seen.contains(s) && !may_miss.contains(s))
        .collect();
    assert!(missing.is_empty(), "windows lost: {missing:?}");
}

/// Fault 2: an agent killed with SIGKILL mid-stream and restarted loses nothing it had queued.
async fn agent_sigkill_loses_nothing_queued(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        return skipped();
    };
    ctl.publish_example(1).await;
    let config = ctl.agent_config("crash-1", WINDOW);
    let config_path = ctl.dir.path().join("crash-1.toml");
    let mut agent = spawn_agent_process(&config, &config_path);
    ctl.wait_for_model("crash-1", None).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("crash-1", Some(1)).await;
    wait_until("windows flow", Duration::from_secs(30), || async {
        ctl.stored_windows("crash-1").await.len() >= 10
    })
    .await;

    agent.kill9();
    let killed_at = agent_window_seq(&config.state_dir, 1);
    let queued = agent_outbox_telemetry(&config.state_dir);
    let queued_seqs = edgeloop_tests::agent_outbox_window_seqs(&config.state_dir);
    let mut agent = spawn_agent_process(&config, &config_path);

    let store = ctl.controller.store.clone();
    wait_until(
        "everything queued at the kill arrives, and more after it",
        Duration::from_secs(60),
        || async {
            let rows = store.telemetry("crash-1", 1000).await.unwrap();
            let ids: Vec<&str> = rows.iter().map(|r| r.msg_id.as_str()).collect();
            queued.iter().all(|q| ids.contains(&q.as_str()))
                && rows.iter().any(|r| r.window_seq > killed_at + 5)
        },
    )
    .await;
    let seqs: Vec<u64> = ctl
        .stored_windows("crash-1")
        .await
        .iter()
        .filter(|w| w.0 == 1)
        .map(|w| w.1)
        .collect();
    // The kill may land between numbering a window and queuing it: that one never existed.
    // If it was queued, it must arrive like every other.
    let unqueued_last = if queued_seqs.contains(&killed_at) {
        vec![]
    } else {
        vec![killed_at]
    };
    assert_complete(&seqs, killed_at + 5, &unqueued_last);
    assert!(
        ctl.stored_windows("crash-1")
            .await
            .iter()
            .all(|w| w.2 == WINDOW),
        "every window whole"
    );
    agent.kill9();
    ctl.stop().await;
}
on_both_brokers!(agent_sigkill_loses_nothing_queued);

/// Fault 3 (and 1 with the embedded broker): the controller is killed with SIGKILL in the middle
/// of ingest and comes back after `down`: no window lost, none stored twice.
/// `window` small keeps many messages on their way when the kill lands.
async fn controller_killed_mid_ingest(broker: BrokerChoice, down: Duration, window: u64) {
    let Some(mut ctl) = ControllerProcess::start(broker).await else {
        return skipped();
    };
    let shutdown = CancellationToken::new();
    let devices = ["line-1", "line-2", "line-3"];
    let agents: Vec<TestAgent> = devices
        .iter()
        .map(|id| {
            let config = agent_config(id, window, &ctl.endpoints, &ctl.dir.path().join(id));
            TestAgent::spawn(config, &shutdown)
        })
        .collect();
    wait_until("devices register", Duration::from_secs(30), || async {
        ctl.get("/api/v1/devices").await.as_array().unwrap().len() == devices.len()
    })
    .await;
    ctl.publish_example(1);
    ctl.rollout(1).await;
    for id in devices {
        wait_until(
            &format!("{id} streams on v1"),
            Duration::from_secs(60),
            || async { ctl.stored_seqs(id, 1).await.len() >= 5 },
        )
        .await;
    }

    ctl.kill9();
    tokio::time::sleep(down).await;
    ctl.run().await;

    // Every window numbered by the time the controller is back must arrive.
    let targets: Vec<u64> = agents
        .iter()
        .map(|a| agent_window_seq(&a.config.state_dir, 1) + 3)
        .collect();
    for (id, target) in devices.iter().zip(&targets) {
        wait_until(
            &format!("{id} delivers every window up to {target}"),
            Duration::from_secs(120),
            || async {
                let seqs = ctl.stored_seqs(id, 1).await;
                (1..=*target).all(|s| seqs.contains(&s))
            },
        )
        .await;
        assert_complete(&ctl.stored_seqs(id, 1).await, *target, &[]);
    }
    let stats = ctl.get("/api/v1/stats").await;
    assert_eq!(stats["malformed"], 0, "{stats}");
    for agent in agents {
        agent.stop().await;
    }
    ctl.stop().await;
}

async fn controller_sigkill_loses_nothing(broker: BrokerChoice) {
    controller_killed_mid_ingest(broker, Duration::from_secs(2), 5).await;
}
on_both_brokers!(controller_sigkill_loses_nothing);

/// Fault 1, embedded broker: the broker lives in the controller, so a 60-second broker outage is
/// a 60-second controller outage. (The same outage of a separate Mosquitto is in
/// `outage.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_down_for_a_minute_loses_nothing() {
    controller_killed_mid_ingest(BrokerChoice::Embedded, Duration::from_secs(60), WINDOW).await;
}

/// Fault 4: the outbox fills its byte budget while the device is cut off: the oldest telemetry
/// goes, the newest stays, and the drop count reaches the controller.
async fn a_full_outbox_drops_the_oldest_and_says_so(broker: BrokerChoice) {
    let Some(ctl) = TestController::start(broker).await else {
        return skipped();
    };
    ctl.publish_example(1).await;
    let online = ctl.agent_config("tiny-1", WINDOW);
    let agent = ctl.spawn_agent_with(online.clone());
    ctl.wait_for_model("tiny-1", None).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("tiny-1", Some(1)).await;
    wait_until("windows flow", Duration::from_secs(30), || async {
        !ctl.stored_windows("tiny-1").await.is_empty()
    })
    .await;
    agent.stop().await;
    let before = agent_window_seq(&online.state_dir, 1);

    // Cut off (nothing listens at that port), with a budget of a few summaries.
    let mut offline = online.clone();
    offline.broker_url = format!("mqtt://127.0.0.1:{}", edgeloop_tests::free_port());
    offline.outbox.budget_bytes = 8192;
    let agent = ctl.spawn_agent_with(offline.clone());
    wait_until("the outbox overflows", Duration::from_secs(30), || async {
        agent_window_seq(&offline.state_dir, 1) >= before + 40
    })
    .await;
    agent.stop().await;
    let produced = agent_window_seq(&offline.state_dir, 1);
    let kept = agent_outbox_telemetry(&offline.state_dir).len() as u64;
    assert!(
        kept > 0 && kept < produced - before,
        "kept {kept} of {}",
        produced - before
    );

    // Back online with the same small budget.
    let mut back = online.clone();
    back.outbox.budget_bytes = 8192;
    let agent = ctl.spawn_agent_with(back);
    wait_until(
        "the drop count reaches the controller",
        Duration::from_secs(30),
        || async {
            ctl.device("tiny-1").await.unwrap()["outbox"]["dropped"]["telemetry"]
                .as_u64()
                .unwrap()
                > 0
        },
    )
    .await;
    wait_until("the survivors arrive", Duration::from_secs(30), || async {
        ctl.stored_windows("tiny-1")
            .await
            .iter()
            .any(|w| w.1 > produced)
    })
    .await;
    agent.stop().await;

    let seqs: Vec<u64> = ctl
        .stored_windows("tiny-1")
        .await
        .iter()
        .map(|w| w.1)
        .collect();
    let offline_seqs: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| (before + 1..=produced).contains(s))
        .collect();
    // What survived is the newest windows, without a hole: the oldest went first.
    let first = *offline_seqs.first().expect("some offline windows survive");
    assert!(
        first > before + 1,
        "the oldest offline windows were dropped"
    );
    assert_eq!(offline_seqs, (first..=produced).collect::<Vec<_>>());
    let dropped = ctl.device("tiny-1").await.unwrap()["outbox"]["dropped"]["telemetry"]
        .as_u64()
        .unwrap();
    assert!(
        dropped >= first - before - 1,
        "{dropped} drops counted, {} windows missing",
        first - before - 1
    );
    ctl.stop().await;
}
on_both_brokers!(a_full_outbox_drops_the_oldest_and_says_so);

/// A broker that acknowledges a message and then loses it (here: Mosquitto, with nobody
/// subscribed yet) loses nothing: the agent keeps every message until the controller's
/// receipt, and sends it again. Needs a broker that runs without the controller, so only
/// the external one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_broker_acknowledged_stay_until_the_controller_confirms_them() {
    let Some(mut ctl) = ControllerProcess::prepare(BrokerChoice::External).await else {
        return skipped();
    };
    let shutdown = CancellationToken::new();
    let mut config = agent_config(
        "early-1",
        WINDOW,
        &ctl.endpoints,
        &ctl.dir.path().join("early-1"),
    );
    config.outbox.receipt_timeout_s = 1;
    let agent = TestAgent::spawn(config.clone(), &shutdown);
    // Heartbeats every second, each acknowledged by Mosquitto and delivered to nobody.
    wait_until("heartbeats pile up", Duration::from_secs(20), || async {
        agent_outbox(&config.state_dir, "status").len() >= 3
    })
    .await;
    let early = agent_outbox(&config.state_dir, "status");

    ctl.run().await;
    wait_until(
        "the early heartbeats are stored and confirmed",
        Duration::from_secs(30),
        || async {
            let left = agent_outbox(&config.state_dir, "status");
            early.iter().all(|id| !left.contains(id))
        },
    )
    .await;
    let device = ctl.get("/api/v1/devices").await;
    assert_eq!(device[0]["id"], "early-1");
    agent.stop().await;
    ctl.stop().await;
}
