//! The dashboard in a real browser: headless Chromium loads the page from a running
//! controller, its script reads the API, and the page it renders is checked against what
//! the API says. `EDGELOOP_TEST_CHROMIUM` names the browser (CI sets it: then it must run);
//! without it Debian's `chromium` is used when installed, and the tests are skipped when
//! there is none.

use std::path::PathBuf;
use std::time::Duration;

use edgeloop_tests::{BrokerChoice, TestController, wait_until};
use serde_json::json;

const CHROMIUM_VAR: &str = "EDGELOOP_TEST_CHROMIUM";

/// The browser to run, or `None` (said on stderr) to skip.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CHROMIUM_VAR).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!("skipped: no chromium and {CHROMIUM_VAR} is not set");
    }
    found
}

/// Serves `page` at `/` on a port of its own, so of another origin than the controller's,
/// for as long as the test runs; returns its address.
async fn serve_page(page: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

/// The page at `url` as the browser leaves it once its script has run for 5 s of virtual
/// time (the script's fetches complete within it: virtual time waits for the network).
async fn render(browser: &PathBuf, url: &str) -> String {
    render_with(browser, url, &[]).await
}

/// [`render`] with more of the browser's flags.
async fn render_with(browser: &PathBuf, url: &str, flags: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{} did not render {url} within 60 s", browser.display()))
        .unwrap_or_else(|e| panic!("cannot run {} ({CHROMIUM_VAR}): {e}", browser.display()));
    assert!(
        output.status.success(),
        "{} failed on {url}: {}",
        browser.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// A table cell as rendered: its class (empty when it has none) and its text.
#[derive(Debug, PartialEq)]
struct Cell {
    class: String,
    text: String,
}

/// The body rows of the table with this id, each as its cells.
fn rows(dom: &str, table: &str) -> Vec<Vec<Cell>> {
    let start = dom
        .find(&format!("<table id=\"{table}\">"))
        .unwrap_or_else(|| panic!("no table {table} in {dom}"));
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").expect("a body") + "<tbody>".len()..];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let (attributes, rest) = cell.split_once('>').unwrap();
                    let class = attributes
                        .split_once("class=\"")
                        .map(|(_, c)| c.split('"').next().unwrap().to_string())
                        .unwrap_or_default();
                    let text = rest.split("</td>").next().unwrap().to_string();
                    Cell { class, text }
                })
                .collect()
        })
        .collect()
}

fn texts(row: &[Cell]) -> Vec<&str> {
    row.iter().map(|c| c.text.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_as_the_api_does() {
    let Some(browser) = chromium() else {
        return;
    };
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let agent = ctl.spawn_agent("dash-1", 40);
    ctl.wait_for_model("dash-1", None).await;
    let model = ctl.publish_example(1).await;
    let (status, rollout) = ctl
        .post_rollout(json!({"model": "vibration", "version": 1}))
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rollout_path = format!("/api/v1/rollouts/{}", rollout["id"]);
    wait_until(
        "the rollout completes and the device reports drift and inferences",
        Duration::from_secs(60),
        || async {
            let rollout = ctl.get(&rollout_path).await;
            // The drift summary and the heartbeat that counts inferences travel apart: the
            // status sent on commit may still say 0 when the summary has arrived.
            rollout["status"] == "completed"
                && rollout["deployments"][0]["status"] == "committed"
                && ctl.device("dash-1").await.is_some_and(|d| {
                    d["last_psi_max"].is_f64() && d["inferences"].as_u64().is_some_and(|n| n > 0)
                })
        },
    )
    .await;

    let dom = render(&browser, &ctl.url("/")).await;
    let device = ctl.device("dash-1").await.unwrap();

    assert!(dom.contains("<div id=\"error\"></div>"), "{dom}");
    let devices = rows(&dom, "devices");
    assert_eq!(devices.len(), 1, "{dom}");
    let row = &devices[0];
    assert_eq!(
        texts(row)[..3],
        ["dash-1", "online", "vibration v1"],
        "{dom}"
    );
    assert_eq!(row[1].class, "on");
    // The drift figure with three decimals, marked as the page's thresholds say.
    let psi: f64 = row[3].text.parse().unwrap();
    assert!(psi.is_finite() && psi >= 0.0, "{dom}");
    assert_eq!(
        row[3].text.split('.').nth(1).map(str::len),
        Some(3),
        "{dom}"
    );
    let marked = match psi {
        p if p >= 0.25 => "alert",
        p if p >= 0.1 => "warn",
        _ => "",
    };
    assert_eq!(row[3].class, marked, "{dom}");
    // Counters only grow: the page's are at most what the API says after it.
    let inferences: u64 = row[4].text.parse().unwrap();
    assert!(
        inferences > 0 && inferences <= device["inferences"].as_u64().unwrap(),
        "{dom}"
    );
    let errors: u64 = row[5].text.parse().unwrap();
    assert!(errors <= device["errors"].as_u64().unwrap(), "{dom}");
    assert!(row[6].text.ends_with(" (0)"), "no drops: {dom}");
    // The browser's clock is virtual time, which may trail the real one.
    let seen = row[7].text.strip_suffix(" s ago").expect("seconds ago");
    assert!((-30..30).contains(&seen.parse::<i64>().unwrap()), "{dom}");

    let models = rows(&dom, "models");
    assert_eq!(models.len(), 1, "{dom}");
    let sha = model.bundle_sha256.as_str();
    assert_eq!(
        texts(&models[0]),
        [
            "vibration",
            "1",
            "rms, peak, kurtosis, temperature",
            &format!("{} B, sha256 {}…", model.bundle_size, &sha[..12]),
            ctl.get("/api/v1/models").await[0]["signed_by"]
                .as_str()
                .unwrap(),
        ],
        "{dom}"
    );

    let rollouts = rows(&dom, "rollouts");
    assert_eq!(rollouts.len(), 1, "{dom}");
    assert_eq!(
        texts(&rollouts[0]),
        [
            rollout["id"].to_string().as_str(),
            "vibration v1",
            "completed",
            "1 committed"
        ],
        "{dom}"
    );

    agent.stop().await;
    ctl.stop().await;
}

/// Without the API the page says so, with what went wrong, instead of showing empty tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_says_when_it_cannot_reach_the_controller() {
    let Some(browser) = chromium() else {
        return;
    };
    // The controller's page from a server that has no API: every call answers 404.
    let page = include_str!("../../controller/src/dashboard.html");
    let dom = render(&browser, &serve_page(page.into()).await).await;
    let error = dom
        .split("<div id=\"error\">")
        .nth(1)
        .and_then(|rest| rest.split("</div>").next())
        .unwrap();
    assert!(
        error.starts_with("cannot reach the controller: Error: /api/v1/")
            && error.ends_with("answered HTTP 404"),
        "{error}: {dom}"
    );
    assert!(rows(&dom, "devices").is_empty(), "{dom}");
}

/// A page of another origin that the operator happens to open cannot approve a pending
/// device, though the browser sends its requests: the controller refuses them (403). A page
/// on another port of 127.0.0.1 is of the same site to the browser (`Sec-Fetch-Site:
/// same-site`): the guard must refuse that too, not only `cross-site`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_cannot_approve_a_device() {
    let Some(browser) = chromium() else {
        return;
    };
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let (code, token) = ctl
        .post_as(
            "alice",
            "/api/v1/enrollment-tokens",
            json!({"group": "line-a", "uses": 1, "auto_approve": false}),
        )
        .await;
    assert_eq!(code, 201, "{token}");
    let key = edgeloop_shared::signing::SecretKey::from_seed([7; 32])
        .public()
        .to_text();
    let (code, pending) = ctl
        .post_as(
            "device",
            "/api/v1/enroll",
            json!({"token": token["token"], "device_id": "intruder", "public_key": key,
                   "board": "rpi4", "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .await;
    assert_eq!(code, 202, "{pending}");

    // What a hostile page can send without asking: a form's POST and a no-cors fetch.
    let approve = ctl.url("/api/v1/enrollments/intruder/approve");
    let page = format!(
        r#"<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="f" method="post" action="{approve}" target="sink"></form>
<script>
fetch("{approve}", {{method: "POST", mode: "no-cors", body: "{{}}"}})
  .then(() => document.title = "answered", e => document.title = "not sent: " + e);
document.getElementById("f").submit();
</script></body></html>"#
    );
    let dom = render(&browser, &serve_page(page).await).await;
    // The browser sent it and had an answer (opaque to the page: a 403).
    assert!(dom.contains("<title>answered</title>"), "{dom}");

    let enrollments = ctl.get("/api/v1/enrollments").await;
    assert_eq!(enrollments[0]["status"], "pending", "{enrollments}");
    assert!(ctl.device("intruder").await.is_none());
    // The operator's own tools still approve it.
    let (code, approved) = ctl
        .post_as("bob", "/api/v1/enrollments/intruder/approve", json!({}))
        .await;
    assert_eq!(code, 200, "{approved}");
    ctl.stop().await;
}

/// DNS rebinding: a page whose name was made to point at 127.0.0.1 is of the same origin
/// as the controller it reaches, so the browser lets it read and post. A controller that
/// listens on loopback answers only requests for loopback names, so the page gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_rebound_to_loopback_gets_nothing_from_the_controller() {
    let Some(browser) = chromium() else {
        return;
    };
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    let port = ctl.controller.http_addr.port();
    // The same request for a loopback name and for another one.
    for (host, status) in [
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("rebound.example:{port}"), 403),
    ] {
        let response = ctl
            .http
            .get(ctl.url("/api/v1/devices"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{host}");
    }
    // In the browser: the name resolves to 127.0.0.1, and the dashboard does not load.
    let rebound = format!("http://rebound.example:{port}/");
    let rules = "--host-resolver-rules=MAP rebound.example 127.0.0.1";
    let dom = render_with(&browser, &rebound, &[rules]).await;
    assert!(!dom.contains("<table"), "{dom}");
    assert!(dom.contains("answers only requests for localhost"), "{dom}");
    // The same browser, by the loopback name, does.
    let dom = render(&browser, &format!("http://localhost:{port}/")).await;
    assert!(dom.contains("<table id=\"devices\">"), "{dom}");
    ctl.stop().await;
}
