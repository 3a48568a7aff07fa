//! Crash safety of installs: the agent process is SIGKILLed at a random point while it
//! installs a model, again and again: up with a delta bundle, down with a full one. Right after each kill, the bundle the active-slot
//! pointer names verifies; after each restart the agent serves a verified model, the old
//! one or the new one, never none and never a half-written one. Afterwards it still
//! updates normally.
//!
//! 50 cycles by default (CI); `EDGELOOP_INSTALL_CYCLES=200` runs more, and
//! `EDGELOOP_INSTALL_SEED` repeats a run's kill points (the seed is printed).

use std::time::{Duration, Instant};

use edgeloop_shared::bundle::{self, Limits};
use edgeloop_shared::signing::TrustedKeys;
use edgeloop_tests::{BrokerChoice, Process, TestController, free_port, spawn_agent_process};

const DEFAULT_CYCLES: usize = 50;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got `{v}`"))
    })
}

/// A small deterministic generator (xorshift64*), so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The model version the agent's local API serves, once it answers. `None` means it
/// answered that no model is serving.
async fn served_version(http: &reqwest::Client, url: &str, agent: &mut Process) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(!agent.exited(), "the agent process exited");
        if let Ok(response) = http.get(url).send().await {
            if response.status() == 503 {
                return None;
            }
            let body: serde_json::Value = response.json().await.unwrap();
            return Some(body["version"].as_u64().expect("a version"));
        }
        assert!(Instant::now() < deadline, "the agent's API never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bundle the active-slot pointer names verifies (a delta bundle with the model kept
/// beside it), and its version.
fn active_bundle_version(state_dir: &std::path::Path, trusted: &TrustedKeys) -> u64 {
    let slots = state_dir.join("slots");
    let active = std::fs::read_to_string(slots.join("active")).expect("an active slot");
    let slot = slots.join(active.trim());
    let bytes = std::fs::read(slot.join("bundle.elb")).unwrap();
    let kept = std::fs::read(slot.join("model.onnx")).ok();
    bundle::verify_expanded(&bytes, kept, trusted, &Limits::default())
        .unwrap_or_else(|e| panic!("the active slot holds a bundle that does not verify: {e}"))
        .manifest
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_installs_never_leaves_the_device_without_a_verified_model() {
    let cycles = env_number("EDGELOOP_INSTALL_CYCLES").map_or(DEFAULT_CYCLES, |n| n as usize);
    let seed = env_number("EDGELOOP_INSTALL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("{cycles} cycles, EDGELOOP_INSTALL_SEED={seed}");
    let mut rng = Rng(seed);

    let ctl = TestController::start(BrokerChoice::Embedded)
        .await
        .expect("the embedded broker always starts");
    // v2 retrains v1's head: a deploy of v2 to a device on v1 takes the delta bundle.
    ctl.publish_mlp(1, 3).await;
    ctl.publish_mlp(2, 4).await;
    assert_eq!(
        ctl.controller
            .store
            .model_deltas("vibration", 2)
            .await
            .unwrap()
            .len(),
        1
    );
    let trusted = TrustedKeys::new([ctl.controller.signing_key().public().clone()]);
    let mut config = ctl.agent_config("kill-1", 50);
    let api = format!("127.0.0.1:{}", free_port());
    config.api.listen = api.clone();
    let model_url = format!("http://{api}/v1/model");
    let config_path = ctl.dir.path().join("kill-1.toml");
    let http = reqwest::Client::new();

    let mut agent = spawn_agent_process(&config, &config_path);
    ctl.wait_for_model("kill-1", None).await;
    // One uninterrupted install, timed: kills then land anywhere in up to 1.5 times that.
    let started = Instant::now();
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("kill-1", Some(1)).await;
    let install_ms = started.elapsed().as_millis() as u64;
    let window_ms = (install_ms * 3 / 2).max(50);
    eprintln!("an install takes about {install_ms} ms; kills land within {window_ms} ms");

    let mut current = 1;
    let (mut switched, mut kept) = (0, 0);
    for cycle in 0..cycles {
        // Up to v2 with a deploy, back to v1 with a rollback.
        let target = if current == 1 { 2 } else { 1 };
        if target == 2 {
            ctl.controller.rollout("vibration", 2, None).await.unwrap();
        } else {
            ctl.controller.rollback("vibration", 1, None).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.below(window_ms))).await;
        agent.kill9();

        let on_disk = active_bundle_version(&config.state_dir, &trusted);
        assert!(
            on_disk == current || on_disk == target,
            "cycle {cycle}: v{on_disk} is neither the old v{current} nor the new v{target}"
        );
        if on_disk == target {
            switched += 1;
        } else {
            kept += 1;
        }
        agent = spawn_agent_process(&config, &config_path);
        let served = served_version(&http, &model_url, &mut agent)
            .await
            .unwrap_or_else(|| panic!("cycle {cycle}: the agent serves no model after a kill"));
        // It boots what the active slot holds; the broker may redeliver the command at
        // once, so the install may also have finished before the first answer.
        assert!(
            served == on_disk || served == target,
            "cycle {cycle}: serves v{served}, but the active slot held v{on_disk} and v{target} was being installed"
        );
        current = served;
    }
    eprintln!("{switched} kills after the switch, {kept} before it");
    assert!(
        switched > 0 && kept > 0,
        "kills should land both before and after the switch ({switched} after, {kept} before)"
    );

    // After all that, the device still updates.
    let target = if current == 1 { 2 } else { 1 };
    if target == 2 {
        ctl.controller.rollout("vibration", 2, None).await.unwrap();
    } else {
        ctl.controller.rollback("vibration", 1, None).await.unwrap();
    }
    ctl.wait_for_model("kill-1", Some(target)).await;
    let events = ctl
        .get("/api/v1/devices/kill-1/deployments?limit=1000")
        .await;
    let deltas = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["stage"] == "downloading"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("delta bundle of"))
        })
        .count();
    eprintln!("{deltas} downloads of the delta bundle");
    assert!(deltas > 0, "the upgrades took the delta bundle");
    agent.kill9();
    ctl.stop().await;
}

/// An install recorded in the journal when the process died is carried out at the next
/// start, without the controller asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_interrupted_by_a_restart_resumes_by_itself() {
    let ctl = TestController::start(BrokerChoice::Embedded)
        .await
        .expect("the embedded broker always starts");
    ctl.publish_example(1).await;
    let v2 = ctl.publish_example(2).await;
    let config = ctl.agent_config("resume-1", 50);
    let config_path = ctl.dir.path().join("resume-1.toml");
    let mut agent = spawn_agent_process(&config, &config_path);
    ctl.wait_for_model("resume-1", None).await;
    ctl.controller.rollout("vibration", 1, None).await.unwrap();
    ctl.wait_for_model("resume-1", Some(1)).await;
    agent.kill9();

    // As the agent leaves it when it dies between accepting a deploy of v2 and its switch.
    let journal = serde_json::json!({
        "seq": edgeloop_agent::now_ms() + 1_000_000,
        "rollback": false,
        "action": {
            "rollout_id": 777,
            "model": {"name": "vibration", "version": 2},
            "bundle_url": "/artifacts/vibration/2",
            "bundle_sha256": v2.bundle_sha256,
            "bundle_size": v2.bundle_size,
        },
    });
    let journal_path = config.state_dir.join("install.json");
    std::fs::write(&journal_path, serde_json::to_vec(&journal).unwrap()).unwrap();
    let mut agent = spawn_agent_process(&config, &config_path);
    ctl.wait_for_model("resume-1", Some(2)).await;
    edgeloop_tests::wait_until(
        "the resumed deployment is reported active",
        Duration::from_secs(30),
        || async {
            ctl.get("/api/v1/devices/resume-1/deployments?limit=50")
                .await
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["rollout_id"] == 777 && e["stage"] == "active")
        },
    )
    .await;
    assert!(
        !journal_path.exists(),
        "the journal is cleared once the install ends"
    );
    agent.kill9();
    ctl.stop().await;
}
