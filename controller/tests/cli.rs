//! The `edgeloop` binary as people use it: the README tour and the demo.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::{Agent, source};
use tokio_util::sync::CancellationToken;

const EDGELOOP: &str = env!("CARGO_BIN_EXE_edgeloop");
const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/vibration");

fn edgeloop(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(EDGELOOP)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "edgeloop {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `edgeloop serve` on free ports; returns it with its HTTP and MQTT URLs, read from
/// the line it prints once it runs.
fn serve(data_dir: &Path, cwd: &Path) -> (Daemon, String, String) {
    serve_with(data_dir, cwd, &[])
}

/// [`serve`] with more arguments.
fn serve_with(data_dir: &Path, cwd: &Path, args: &[&str]) -> (Daemon, String, String) {
    let mut child = Command::new(EDGELOOP)
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--http-addr", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let daemon = Daemon(child);
    let mut lines = BufReader::new(stderr).lines();
    let line = loop {
        let line = lines
            .next()
            .expect("serve exited before it was ready")
            .unwrap();
        if line.starts_with("edgeloop controller:") {
            break line;
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let words: Vec<&str> = line.split_whitespace().collect();
    let http = words[words.iter().position(|w| *w == "on").unwrap() + 1]
        .trim_end_matches(',')
        .to_string();
    let mqtt = words.last().unwrap().to_string();
    (daemon, http, mqtt)
}

async fn devices(http: &str) -> serde_json::Value {
    reqwest::get(format!("{http}/api/v1/devices"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let data = cwd.join("edgeloop-data");

    // 1. A signing key, private to its owner.
    let out = edgeloop(&["keygen", "--out", "edgeloop-data/keys"], cwd);
    assert!(out.contains("key id"), "{out}");
    let public = std::fs::read_to_string(data.join("keys/signing.pub")).unwrap();
    assert!(public.starts_with("ed25519:"));
    let again = Command::new(EDGELOOP)
        .args(["keygen", "--out", "edgeloop-data/keys"])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen never overwrites a key");

    // 2. The controller with its embedded broker.
    let (_serve, http, mqtt) = serve(&data, cwd);

    // 3. Publish the example model, with its own drift policy.
    std::fs::write(cwd.join("drift.toml"), "method = \"js\"\njs = 0.12\n").unwrap();
    std::fs::write(
        cwd.join("bad-drift.toml"),
        "method = \"ks\"\nks_alpha = 2.0\n",
    )
    .unwrap();
    let out = edgeloop(
        &[
            "model",
            "publish",
            &format!("{ASSETS}/model_v1.onnx"),
            "--name",
            "vibration",
            "--version",
            "1",
            "--reference",
            &format!("{ASSETS}/reference_v1.csv"),
            "--labels",
            "normal,fault",
            // What the device checks before it activates the model (it runs it below).
            "--latency-budget-ms",
            "1000",
            "--min-agent-version",
            "0.1.0",
            "--targets",
            std::env::consts::ARCH,
            "--drift-policy",
            "drift.toml",
            "--data-dir",
            "edgeloop-data",
        ],
        cwd,
    );
    assert!(out.contains("published vibration v1"), "{out}");
    let bundle_path = std::fs::read_dir(data.join("artifacts/vibration"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("1-"))
        .unwrap();
    let bundle = std::fs::read(bundle_path).unwrap();
    let layout = edgeloop_shared::bundle::layout(&bundle, &Default::default()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bundle[layout.manifest]).unwrap();
    assert_eq!(manifest["drift"]["method"], "js", "{}", manifest["drift"]);
    assert_eq!(manifest["drift"]["js"], 0.12);
    assert_eq!(
        manifest["drift"]["psi_alert"], 0.25,
        "unset keys keep their defaults"
    );
    // Publishing v2 of the same model with a bad option fails and names it.
    for (option, value, needle) in [
        ("--drift-policy", "bad-drift.toml", "ks_alpha"),
        ("--min-agent-version", "latest", "`latest`"),
    ] {
        let refused = Command::new(EDGELOOP)
            .args(["model", "publish"])
            .arg(format!("{ASSETS}/model_v1.onnx"))
            .args(["--name", "vibration", "--version", "2", "--reference"])
            .arg(format!("{ASSETS}/reference_v1.csv"))
            .args([option, value, "--data-dir", "edgeloop-data"])
            .current_dir(cwd)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && err.contains(needle), "{err}");
    }
    // A model with an operator tract cannot run is refused at publish, by the operator's
    // name (the agent's compatibility suite holds it).
    let refused = Command::new(EDGELOOP)
        .args(["model", "publish"])
        .arg(format!(
            "{}/../agent/tests/compat/unsupported_op.onnx",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(["--name", "vibration", "--version", "2", "--reference"])
        .arg(format!("{ASSETS}/reference_v1.csv"))
        .args(["--labels", "normal,fault", "--data-dir", "edgeloop-data"])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("Frobnicate"), "{err}");
    let models: serde_json::Value = reqwest::get(format!("{http}/api/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models[0]["version"], 1);

    // The quality gate: v2, retrained on the shifted regime, passes against v1 on a
    // holdout from that regime, also per temperature quartile; judged the other way round,
    // v1 fails.
    let out = edgeloop(
        &[
            "model",
            "publish",
            &format!("{ASSETS}/model_v2.onnx"),
            "--name",
            "vibration",
            "--version",
            "2",
            "--reference",
            &format!("{ASSETS}/reference_v2.csv"),
            "--labels",
            "normal,fault",
            "--holdout",
            &format!("{ASSETS}/holdout_v2.csv"),
            "--segment-by",
            "temperature:4",
            "--data-dir",
            "edgeloop-data",
        ],
        cwd,
    );
    assert!(out.contains("quality gate passed: accuracy"), "{out}");
    let compared = Command::new(EDGELOOP)
        .args(["model", "compare", "vibration", "2", "1", "--holdout"])
        .arg(format!("{ASSETS}/holdout_v2.csv"))
        .args(["--data-dir", "edgeloop-data"])
        .current_dir(cwd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&compared.stdout);
    assert!(!compared.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("vibration v1 against v2: failed"),
        "{stdout}"
    );
    let listed: serde_json::Value = serde_json::from_str(&edgeloop(
        &[
            "model",
            "list",
            "--output",
            "json",
            "--data-dir",
            "edgeloop-data",
        ],
        cwd,
    ))
    .unwrap();
    assert_eq!(listed[1]["lineage"]["parent_version"], 1, "{listed}");

    // 4. An agent from a config file like the README's.
    let agent_toml = cwd.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "device_id = \"pump-1\"\nbroker_url = \"{mqtt}\"\ncontroller_url = \"{http}\"\ntrusted_keys = [\"{}\"]\nstate_dir = \"{}\"\n",
            public.trim(),
            cwd.join("agent-state").display()
        ),
    )
    .unwrap();
    let config = AgentConfig::load(Some(&agent_toml)).unwrap();
    let shutdown = CancellationToken::new();
    let agent = Agent::new(config.clone(), source::from_config(&config.source).unwrap()).unwrap();
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    wait(Duration::from_secs(30), || async {
        devices(&http).await.as_array().unwrap().len() == 1
    })
    .await;

    // 5. Roll it out.
    let out = edgeloop(
        &[
            "rollout",
            "create",
            "--model",
            "vibration",
            "--version",
            "1",
            "--waves",
            "1,100%",
            "--failure-threshold",
            "0.5",
            "--reason",
            "first model",
            "--controller",
            &http,
        ],
        cwd,
    );
    assert!(
        out.starts_with("rollout 1 vibration v1: in_progress, wave 1 of 2"),
        "{out}"
    );
    wait(Duration::from_secs(30), || async {
        devices(&http).await[0]["model_version"] == 1
    })
    .await;
    let listed: serde_json::Value = serde_json::from_str(&edgeloop(
        &["rollout", "list", "--output", "json", "--controller", &http],
        cwd,
    ))
    .unwrap();
    assert_eq!(listed[0]["plan"]["waves"], serde_json::json!(["1", "100%"]));
    assert_eq!(listed[0]["plan"]["failure_threshold"], 0.5);
    let shown = edgeloop(&["rollout", "show", "1", "--controller", &http], cwd);
    assert!(shown.contains("wave 0"), "{shown}");
    let audit = edgeloop(&["audit", "--controller", &http], cwd);
    assert!(
        audit.contains("rollout.create") && audit.contains("first model"),
        "{audit}"
    );
    // Pausing a finished rollout is refused with the reason.
    wait(Duration::from_secs(30), || async {
        reqwest::get(format!("{http}/api/v1/rollouts/1"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["status"]
            == "completed"
    })
    .await;
    let refused = Command::new(EDGELOOP)
        .args(["rollout", "pause", "1", "--controller", &http])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("is completed"),
        "{stderr}"
    );

    // Provisioning a device: a bundle with the agent's configuration and a token of its
    // own; an agent started from it enrolls into its group.
    let out = edgeloop(
        &[
            "device",
            "provision",
            "--device-id",
            "pump-9",
            "--board",
            "rpi4",
            "--group",
            "line-a",
            "--tags",
            "hall-2",
            "--out",
            "pump-9-bundle",
            "--controller",
            &http,
        ],
        cwd,
    );
    assert!(out.starts_with("provisioning bundle for pump-9"), "{out}");
    let bundle = cwd.join("pump-9-bundle");
    let unit = std::fs::read_to_string(bundle.join("edgeloop-agent.service")).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/edgeloop-agent run --config /etc/edgeloop/agent.toml"
        ),
        "{unit}"
    );
    assert!(
        std::fs::read_to_string(bundle.join("board.toml"))
            .unwrap()
            .contains("aarch64-unknown-linux-gnu")
    );
    let mut provisioned = AgentConfig::load(Some(&bundle.join("agent.toml"))).unwrap();
    assert_eq!(provisioned.device_id, "pump-9");
    assert_eq!(provisioned.board, "rpi4");
    assert!(provisioned.enrollment_token.starts_with("elt_"));
    assert_eq!(provisioned.trusted_keys, [public.trim().to_string()]);
    provisioned.state_dir = cwd.join("pump-9-state");
    provisioned.api.listen.clear();
    let enrolled = Agent::new(
        provisioned.clone(),
        source::from_config(&provisioned.source).unwrap(),
    )
    .unwrap();
    let enrolled_task = tokio::spawn(enrolled.run(shutdown.clone()));
    wait(Duration::from_secs(30), || async {
        devices(&http)
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == "pump-9" && d["group"] == "line-a" && d["board"] == "rpi4")
    })
    .await;
    let enrollments = edgeloop(&["device", "enrollments", "--controller", &http], cwd);
    assert!(
        enrollments.contains("pump-9") && enrollments.contains("approved"),
        "{enrollments}"
    );
    for (args, expected) in [
        (
            vec!["--board", "toaster", "--out", "x"],
            "is not one of rpi4",
        ),
        (
            vec!["--board", "rpi4", "--out", "pump-9-bundle"],
            "exists already",
        ),
    ] {
        let refused = Command::new(EDGELOOP)
            .current_dir(cwd)
            .args([
                "device",
                "provision",
                "--device-id",
                "pump-10",
                "--group",
                "g",
            ])
            .args(&args)
            .args(["--controller", &http])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    }
    let created = edgeloop(
        &[
            "token",
            "create",
            "--group",
            "line-b",
            "--review",
            "--controller",
            &http,
        ],
        cwd,
    );
    assert!(created.contains("for group line-b: elt_"), "{created}");
    let tokens: serde_json::Value = serde_json::from_str(&edgeloop(
        &["token", "list", "--output", "json", "--controller", &http],
        cwd,
    ))
    .unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 2, "{tokens}");

    // A rollout of a model that does not exist is refused with the controller's reason.
    let refused = Command::new(EDGELOOP)
        .args([
            "rollout",
            "create",
            "--model",
            "vibration",
            "--version",
            "7",
            "--controller",
            &http,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("404"));

    // Key rotation: an offline root key signs a document adding a second signing key. This
    // controller has no root_keys configured, so it cannot check the document and refuses
    // to relay it (tests/tests/trust.rs relays one end to end).
    edgeloop(&["keygen", "--out", "root"], cwd);
    edgeloop(&["keygen", "--out", "next"], cwd);
    edgeloop(
        &[
            "trust",
            "sign",
            "--root-key",
            "root/signing.key",
            "--version",
            "1",
            "--root-keys",
            "root/signing.pub",
            "--signing-keys",
            "edgeloop-data/keys/signing.pub,next/signing.pub",
            "--out",
            "trust-1.json",
        ],
        cwd,
    );
    let signed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cwd.join("trust-1.json")).unwrap()).unwrap();
    assert_eq!(signed["key_id"].as_str().unwrap().len(), 16, "{signed}");
    let unchecked = Command::new(EDGELOOP)
        .current_dir(cwd)
        .args(["trust", "publish", "trust-1.json", "--controller", &http])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&unchecked.stderr);
    assert!(
        !unchecked.status.success() && stderr.contains("400") && stderr.contains("root_keys"),
        "{stderr}"
    );
    let unsigned = Command::new(EDGELOOP)
        .current_dir(cwd)
        .args([
            "trust",
            "sign",
            "--root-key",
            "root/signing.key",
            "--version",
            "2",
            "--root-keys",
            "root/signing.pub",
            "--signing-keys",
            "nope.pub",
        ])
        .output()
        .unwrap();
    assert!(!unsigned.status.success());
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("nope.pub"));

    shutdown.cancel();
    agent_task.await.unwrap().unwrap();
    enrolled_task.await.unwrap().unwrap();
}

async fn wait<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_demo_runs_the_loop_and_ends_with_a_json_line() {
    let out = Command::new(EDGELOOP)
        .args([
            "demo",
            "--devices",
            "2",
            "--duration",
            "45",
            "--http-addr",
            "127.0.0.1:0",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("covariate shift injected"), "{stdout}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let devices = last["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for d in devices {
        assert_eq!(d["online"], true, "{d}");
        assert_eq!(d["model_version"], 2, "{d}");
        assert!(d["last_psi_max"].as_f64().is_some(), "{d}");
    }
    assert_eq!(last["models"].as_array().unwrap().len(), 2);
    assert!(
        last["rollouts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "completed")
    );
    // The loop closed by itself: one retraining, gated, rolled out in waves.
    let retrainings = last["retrainings"].as_array().unwrap();
    assert_eq!(retrainings.len(), 1, "{last}");
    let r = &retrainings[0];
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("drifted"), "{r}");
    assert!(r["gate"].as_str().unwrap().starts_with("passed"), "{r}");
    assert_eq!(r["candidate_version"], 2, "{r}");
    let rollout = last["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == r["rollout_id"])
        .unwrap();
    assert_eq!(rollout["plan"]["waves"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_flags_get_clear_errors() {
    let out = Command::new(EDGELOOP)
        .args(["demo", "--duration", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 30"));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(EDGELOOP)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("edgeloop keygen"),
        "serve without a key says how to make one"
    );
}

#[test]
fn devices_are_registered_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let out = edgeloop(
        &["device", "add", "pump-1", "pump-2", "--data-dir", data],
        dir.path(),
    );
    assert!(
        out.contains("2 device(s) added, 0 already registered"),
        "{out}"
    );
    let out = edgeloop(
        &["device", "add", "pump-2", "pump-3", "--data-dir", data],
        dir.path(),
    );
    assert!(
        out.contains("1 device(s) added, 1 already registered"),
        "{out}"
    );
    let bad = Command::new(EDGELOOP)
        .args(["device", "add", "a/b", "--data-dir", data])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid device id"));
}

/// An operator made with `edgeloop operator add` logs in with the token it printed: the
/// configuration keeps only its hash, the CLI sends it from `EDGELOOP_API_TOKEN`, and the
/// audit log names the operator, not the actor the CLI claims.
#[test]
fn an_operator_added_from_the_cli_logs_in_with_its_token() {
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let data = cwd.join("edgeloop-data");
    edgeloop(&["keygen", "--out", "edgeloop-data/keys"], cwd);
    let printed = edgeloop(&["operator", "add", "carol"], cwd);
    let token = printed.lines().nth(1).unwrap().to_string();
    assert!(token.starts_with("elo_"), "{printed}");
    let entry = printed.split_once("then restart it:\n").unwrap().1;
    assert!(!entry.contains(&token[4..]), "only a hash is kept: {entry}");
    std::fs::write(cwd.join("controller.toml"), entry).unwrap();
    let (_serve, http, _) = serve_with(&data, cwd, &["--config", "controller.toml"]);

    let cli = |token: &str, args: &[&str]| {
        let out = Command::new(EDGELOOP)
            .args(args)
            .args(["--controller", &http])
            .current_dir(cwd)
            .env("EDGELOOP_ACTOR", "mallory")
            .env("EDGELOOP_API_TOKEN", token)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            said,
        )
    };
    let create = ["token", "create", "--group", "line-a"];
    let (ok, _, said) = cli("", &create);
    assert!(
        !ok && said.contains("401") && said.contains("operator"),
        "{said}"
    );
    let (ok, _, said) = cli("elo_0000", &create);
    assert!(!ok && said.contains("401"), "{said}");
    let (ok, out, said) = cli(&token, &create);
    assert!(ok, "{out}{said}");

    let (ok, out, said) = cli(&token, &["audit", "--output", "json"]);
    assert!(ok, "{said}");
    let audit: serde_json::Value = serde_json::from_str(&out).unwrap();
    let created = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "token.create")
        .unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(created["actor"], "carol", "{audit}");

    // A bad entry stops the controller with the reason.
    std::fs::write(
        cwd.join("bad.toml"),
        "[[operators]]\nname = \"dave\"\ntoken_sha256 = \"abc\"\n",
    )
    .unwrap();
    let mut bad = Command::new(EDGELOOP)
        .args(["serve", "--config", "bad.toml", "--data-dir"])
        .arg(&data)
        .args(["--http-addr", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bad.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = bad.kill();
            panic!("serve ran with an invalid operator entry");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut bad.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("operators") && said.contains("64 lowercase hex"),
        "{said}"
    );
}
