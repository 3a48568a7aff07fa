//! The dashboard in a real browser: headless Chromium loads the page from a running
//! controller, its script reads the API, and the page it renders is checked against what
//! the API says; under ChromeDriver, the operator's clicks steer the fleet.
//! `EDGELOOP_TEST_CHROMIUM` names the browser and `EDGELOOP_TEST_CHROMEDRIVER` the driver (CI
//! sets both: then they must run); without them Debian's `chromium` and `chromedriver` are
//! used when installed, and the tests are skipped when there are none.

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
        assert!(
            std::env::var_os(CHROMEDRIVER_VAR).is_none(),
            "{CHROMEDRIVER_VAR} is set but there is no chromium ({CHROMIUM_VAR})"
        );
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

const CHROMEDRIVER_VAR: &str = "EDGELOOP_TEST_CHROMEDRIVER";

/// Chromium under ChromeDriver (W3C WebDriver over HTTP), for tests that click. The driver
/// runs in a process group of its own, which is killed with its browsers when dropped.
struct Driver {
    http: reqwest::Client,
    session: String,
    process: tokio::process::Child,
}

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Driver {
    /// Starts ChromeDriver (`EDGELOOP_TEST_CHROMEDRIVER`, else Debian's) and a session of
    /// `browser`; `None` (said on stderr) to skip when neither is there and CI did not ask.
    async fn start(browser: &std::path::Path) -> Option<Driver> {
        let driver = match std::env::var_os(CHROMEDRIVER_VAR).filter(|p| !p.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => {
                let debian = PathBuf::from("/usr/bin/chromedriver");
                if !debian.exists() {
                    // CI names the browser: then the driver must be there too.
                    assert!(
                        std::env::var_os(CHROMIUM_VAR).is_none(),
                        "{CHROMIUM_VAR} is set but there is no chromedriver ({CHROMEDRIVER_VAR})"
                    );
                    eprintln!("skipped: no chromedriver and {CHROMEDRIVER_VAR} is not set");
                    return None;
                }
                debian
            }
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({CHROMEDRIVER_VAR}): {e}", driver.display())
            });
        let mut driver = Driver {
            // A wedged driver fails the test instead of hanging it.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            session: format!("http://127.0.0.1:{port}"),
            process,
        };
        wait_until("chromedriver is ready", Duration::from_secs(20), || async {
            driver
                .http
                .get(format!("{}/status", driver.session))
                .send()
                .await
                .is_ok()
        })
        .await;
        let created = driver
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": browser,
                        "args": ["--headless", "--no-sandbox", "--disable-gpu",
                                 "--disable-background-networking", "--disable-dev-shm-usage"],
                    },
                }}}),
            )
            .await
            .unwrap_or_else(|e| panic!("no browser session: {e}"));
        let id = created["sessionId"].as_str().expect("a session id");
        driver.session = format!("{}/session/{id}", driver.session);
        Some(driver)
    }

    /// One WebDriver command (`path` below the session, or `/session` to make one); its
    /// value, or the error WebDriver answered.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let ok = response.status().is_success();
        let answer: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        let value = answer["value"].clone();
        if ok {
            Ok(value)
        } else {
            Err(format!("{}: {}", value["error"], value["message"]))
        }
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await
            .unwrap();
    }

    /// The element `css` selects once the page has it (its script fills the tables
    /// after it loads), then `act` on it; again while the page replaces it meanwhile.
    async fn on(&self, css: &str, act: &str, body: serde_json::Value) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let done = match self.find(css).await {
                Ok(id) => {
                    let method = if body.is_null() {
                        reqwest::Method::GET
                    } else {
                        reqwest::Method::POST
                    };
                    self.call(method, &format!("/element/{id}/{act}"), body.clone())
                        .await
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(value) => return value,
                Err(e) if e.contains("no such element") || e.contains("stale element") => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{css} to {act} within 30 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{act} {css}: {e}"),
            }
        }
    }

    async fn click(&self, css: &str) {
        self.on(css, "click", json!({})).await;
    }

    /// Replaces what the input `css` holds with `text`, typed.
    async fn type_into(&self, css: &str, text: &str) {
        self.on(css, "clear", json!({})).await;
        self.on(css, "value", json!({ "text": text })).await;
    }

    /// The text the element `css` shows, once it shows something.
    async fn text(&self, css: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.on(css, "text", serde_json::Value::Null).await;
            let text = text.as_str().expect("text").to_string();
            if !text.is_empty() || std::time::Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The element's attribute `name`: its value, or null when it has none.
    async fn attribute(&self, css: &str, name: &str) -> serde_json::Value {
        self.on(css, &format!("attribute/{name}"), serde_json::Value::Null)
            .await
    }

    /// Whether the page has an element `css` now.
    async fn has(&self, css: &str) -> bool {
        self.find(css).await.is_ok()
    }

    /// The WebDriver id of the element `css` selects now, or WebDriver's error.
    async fn find(&self, css: &str) -> Result<String, String> {
        let element = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        let id = element[ELEMENT].as_str();
        Ok(id
            .unwrap_or_else(|| panic!("an element: {element}"))
            .to_string())
    }

    /// Waits until the page says `want` as the outcome of the operator's last change.
    async fn outcome_is(&self, want: &str) {
        wait_until(
            &format!("the page to say {want:?}"),
            Duration::from_secs(30),
            || async { self.text("#outcome").await == want },
        )
        .await;
    }

    /// The question the page asked with `prompt()`, answered with `text` or cancelled.
    async fn answer_prompt(&self, text: Option<&str>) -> String {
        let mut question = Err(String::new());
        for _ in 0..100 {
            question = self
                .call(reqwest::Method::GET, "/alert/text", serde_json::Value::Null)
                .await;
            if question.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let question = question.unwrap_or_else(|e| panic!("the page asked nothing: {e}"));
        let answer = match text {
            Some(text) => {
                self.call(
                    reqwest::Method::POST,
                    "/alert/text",
                    json!({ "text": text }),
                )
                .await
                .unwrap();
                "/alert/accept"
            }
            None => "/alert/dismiss",
        };
        self.call(reqwest::Method::POST, answer, json!({}))
            .await
            .unwrap();
        question.as_str().expect("a question").to_string()
    }

    /// Ends the session: the browser exits (the driver goes when dropped).
    async fn quit(self) {
        let _ = self
            .call(reqwest::Method::DELETE, "", serde_json::Value::Null)
            .await;
    }
}

impl Drop for Driver {
    /// A test that failed leaves no browser behind: the driver's whole group goes.
    fn drop(&mut self) {
        if let Some(pid) = self.process.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
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

    // A retraining as the loop leaves one whose candidate rolls out.
    use edgeloop_controller::store::{RetrainingStatus, RetrainingUpdate};
    let store = &ctl.controller.store;
    let now = edgeloop_agent::now_ms();
    let fired = store
        .start_retraining("vibration", 1, "3 of 5 devices drift <b>", now, now)
        .await
        .unwrap()
        .unwrap();
    let update = RetrainingUpdate {
        candidate_version: Some(2),
        gate: Some("passed: accuracy 0.97 vs 0.95".into()),
        rollout_id: Some(7),
        ..RetrainingUpdate::status(RetrainingStatus::RollingOut, "rolling out v2")
    };
    assert!(
        store
            .update_retraining(fired.id, &update, now)
            .await
            .unwrap()
    );

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
            "1 of 1",
            "1 committed",
            // A rollout that finished has nothing left to change.
            "",
        ],
        "{dom}"
    );

    // The device's drift windows, opened by the page's address: the newest first, as the
    // API has them (more may have come since).
    assert!(
        dom.contains("<section id=\"device-windows\" hidden=\"\">"),
        "{dom}"
    );
    let dom = render(&browser, &ctl.url("/#device=dash-1")).await;
    assert!(dom.contains("<section id=\"device-windows\">"), "{dom}");
    assert!(
        dom.contains("<span id=\"windows-device\">dash-1</span>"),
        "{dom}"
    );
    let windows = rows(&dom, "windows");
    assert!((1..=10).contains(&windows.len()), "{dom}");
    let api = ctl.get("/api/v1/devices/dash-1/telemetry?limit=100").await;
    for shown in &windows {
        let shown = texts(shown);
        let seq: u64 = shown[0].parse().unwrap();
        let stored = api
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["window_seq"] == seq)
            .unwrap_or_else(|| panic!("window {seq}: {api}"));
        assert_local_time(shown[1]);
        assert_eq!(shown[2], "vibration v1");
        assert_eq!(shown[3], stored["samples"].to_string());
        // Three decimals (JavaScript rounds a tie up, Rust to even: compare the figures).
        let psi: f64 = shown[4].parse().unwrap();
        assert_eq!(shown[4].split('.').nth(1).map(str::len), Some(3), "{dom}");
        assert!(
            (psi - stored["psi_max"].as_f64().unwrap()).abs() <= 0.0005 + 1e-9,
            "{dom}"
        );
        // The most shifted features, by name (their figures are rounded in the page).
        let mut features: Vec<(&str, f64)> = stored["summary"]["stats"]["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["name"].as_str().unwrap(), f["psi"].as_f64().unwrap()))
            .filter(|(_, psi)| *psi >= 0.1)
            .collect();
        features.sort_by(|a, b| b.1.total_cmp(&a.1));
        let names: Vec<&str> = shown[5]
            .split(", ")
            .filter(|f| *f != "–")
            .map(|f| f.rsplit_once(' ').unwrap().0)
            .collect();
        let want: Vec<&str> = features.iter().take(3).map(|f| f.0).collect();
        assert_eq!(names, want, "{dom}");
    }

    // An address naming no valid device, or one without windows, says so beside them; the
    // rest of the page is drawn as ever.
    for (hash, says) in [
        (
            "#device=a%2Fb",
            "cannot show them: `a/b` is not a valid device id",
        ),
        (
            "#device=%E0",
            "cannot show them: `%E0` is not a valid device id",
        ),
        ("#device=ghost", "no drift windows from this device yet"),
    ] {
        let dom = render(&browser, &ctl.url(&format!("/{hash}"))).await;
        assert!(dom.contains("<div id=\"error\"></div>"), "{hash}: {dom}");
        let note = dom
            .split("<p id=\"windows-note\">")
            .nth(1)
            .and_then(|rest| rest.split("</p>").next())
            .unwrap();
        assert!(note.starts_with(says), "{hash}: {note}");
        assert_eq!(rows(&dom, "devices").len(), 1, "{hash}: {dom}");
        assert!(rows(&dom, "windows").is_empty(), "{hash}: {dom}");
    }

    let retrainings = rows(&dom, "retrainings");
    assert_eq!(retrainings.len(), 1, "{dom}");
    let row = texts(&retrainings[0]);
    assert_eq!(
        [row[0], row[1], row[3], row[4], row[5], row[6], row[7]],
        [
            fired.id.to_string().as_str(),
            "vibration v1",
            // Escaped, as everything the API says.
            "3 of 5 devices drift &lt;b&gt;",
            "rolling_out",
            "v2",
            "passed: accuracy 0.97 vs 0.95",
            "7"
        ],
        "{dom}"
    );
    assert_local_time(row[2]);

    // Recent changes: the audit log, newest first, as the API has it.
    let audit = ctl.get("/api/v1/audit?limit=15").await;
    let shown = rows(&dom, "audit");
    assert_eq!(shown.len(), audit.as_array().unwrap().len(), "{dom}");
    let newest = texts(&shown[0]);
    assert_local_time(newest[0]);
    assert_eq!(
        newest[1..4],
        [
            audit[0]["actor"].as_str().unwrap(),
            audit[0]["action"].as_str().unwrap(),
            audit[0]["target"].as_str().unwrap()
        ],
        "{dom}"
    );
    assert!(
        shown
            .iter()
            .any(|r| texts(r)[1..3] == ["api", "rollout.create"]),
        "{dom}"
    );

    agent.stop().await;
    ctl.stop().await;
}

/// `YYYY-MM-DD HH:MM:SS`, as the page shows a time.
fn assert_local_time(text: &str) {
    let shape: String = text
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert_eq!(shape, "9999-99-99 99:99:99", "{text}");
}

/// A device that asked to enroll with a token that needs an operator's approval.
async fn ask_to_enroll(ctl: &TestController, device: &str) {
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
            json!({"token": token["token"], "device_id": device, "public_key": key,
                   "board": "rpi4", "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .await;
    assert_eq!(code, 202, "{pending}");
}

/// The operator steers from the page: approves a pending device, starts a rollout in
/// waves, pauses, resumes and aborts it (the abort asks first), and sees the controller's
/// refusal of a bad plan. Every change reaches the API and its audit log as `dashboard`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_steers_the_fleet() {
    let Some(browser) = chromium() else {
        return;
    };
    let Some(driver) = Driver::start(&browser).await else {
        return;
    };
    let ctl = TestController::start(BrokerChoice::Embedded).await.unwrap();
    ask_to_enroll(&ctl, "newcomer").await;
    ctl.publish_example(1).await;
    driver.goto(&ctl.url("/")).await;

    let approve = r#"#enrollments button[data-action="approve"][data-device="newcomer"]"#;
    assert_eq!(
        driver
            .text(r#"#enrollments tr[data-device="newcomer"] td"#)
            .await,
        "newcomer"
    );
    driver.click(approve).await;
    wait_until(
        "the approval reaches the API",
        Duration::from_secs(30),
        || async { ctl.get("/api/v1/enrollments").await[0]["status"] == "approved" },
    )
    .await;
    let enrollment = ctl.get("/api/v1/enrollments").await;
    assert_eq!(enrollment[0]["decided_by"], "dashboard", "{enrollment}");
    driver.outcome_is("approve newcomer: done").await;
    wait_until(
        "the page drops the approved row",
        Duration::from_secs(30),
        || async { !driver.has(approve).await },
    )
    .await;
    // The new device's drift windows: none yet. Its button again closes them.
    let windows = r#"#devices button[data-action="windows"][data-device="newcomer"]"#;
    driver.click(windows).await;
    assert_eq!(driver.text("#windows-device").await, "newcomer");
    assert_eq!(
        driver.attribute("#device-windows", "hidden").await,
        serde_json::Value::Null
    );
    assert!(!driver.has("#windows tbody tr").await);
    driver.click(windows).await;
    wait_until("the windows close", Duration::from_secs(30), || async {
        driver.attribute("#device-windows", "hidden").await == "true"
    })
    .await;

    // A plan the controller refuses: its answer is shown, and nothing starts.
    assert_eq!(
        driver.text("#new-rollout select option:checked").await,
        "vibration v1"
    );
    driver
        .type_into("#new-rollout input[name=waves]", "0%")
        .await;
    driver.click("#new-rollout button[type=submit]").await;
    wait_until("the refusal is shown", Duration::from_secs(30), || async {
        driver.text("#outcome").await.contains("failed")
    })
    .await;
    let outcome = driver.text("#outcome").await;
    assert!(
        outcome.starts_with("roll out vibration v1 failed: ")
            && outcome.contains("`0%` is not a percentage above 0"),
        "{outcome}"
    );
    assert_eq!(driver.attribute("#outcome", "class").await, "failed");
    assert_eq!(ctl.get("/api/v1/rollouts").await, json!([]));

    // The device never connects, so the rollout stays in progress while it is steered.
    driver
        .type_into("#new-rollout input[name=waves]", "1, 100%")
        .await;
    driver
        .type_into("#new-rollout input[name=group]", "line-a")
        .await;
    driver.click("#new-rollout button[type=submit]").await;
    wait_until("the rollout starts", Duration::from_secs(30), || async {
        ctl.get("/api/v1/rollouts").await.as_array().unwrap().len() == 1
    })
    .await;
    let rollout = ctl.get("/api/v1/rollouts").await[0].clone();
    assert_eq!(
        (&rollout["model_name"], &rollout["model_version"]),
        (&json!("vibration"), &json!(1)),
        "{rollout}"
    );
    assert_eq!(rollout["plan"]["waves"], json!(["1", "100%"]), "{rollout}");
    assert!(rollout["plan"]["telemetry_gate"].is_object(), "{rollout}");
    let id = rollout["id"].as_u64().unwrap();
    let path = format!("/api/v1/rollouts/{id}");
    let status_is = |want: &'static str| {
        let path = path.clone();
        let ctl = &ctl;
        move || {
            let path = path.clone();
            async move { ctl.get(&path).await["status"] == want }
        }
    };
    let row = format!("#rollouts button[data-rollout=\"{id}\"]");

    driver.click(&format!("{row}[data-action=pause]")).await;
    driver
        .outcome_is(&format!("pause rollout {id}: done"))
        .await;
    wait_until("paused", Duration::from_secs(30), status_is("paused")).await;
    driver.click(&format!("{row}[data-action=resume]")).await;
    driver
        .outcome_is(&format!("resume rollout {id}: done"))
        .await;
    wait_until("resumed", Duration::from_secs(30), status_is("in_progress")).await;
    // Abort asks first, and cancelled sends nothing (the page would say "abort rollout…").
    driver.click(&format!("{row}[data-action=abort]")).await;
    let question = driver.answer_prompt(None).await;
    assert!(
        question.starts_with(&format!(
            "Abort rollout {id}? Devices that have the new model"
        )),
        "{question}"
    );
    assert_eq!(
        driver.text("#outcome").await,
        format!("resume rollout {id}: done")
    );
    assert_eq!(ctl.get(&path).await["status"], "in_progress");
    // Abort and roll back, with the operator's reason.
    driver.click(&format!("{row}[data-action=rollback]")).await;
    let question = driver.answer_prompt(Some("v1 misreads newcomer")).await;
    assert!(
        question.starts_with(&format!("Abort rollout {id} and send its devices back")),
        "{question}"
    );
    driver
        .outcome_is(&format!("abort rollout {id}: done"))
        .await;
    assert_eq!(ctl.get(&path).await["status"], "aborted");
    wait_until(
        "the page has no buttons for it",
        Duration::from_secs(30),
        || async { !driver.has(&row).await },
    )
    .await;

    let audit = ctl.get("/api/v1/audit").await;
    let by_dashboard: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "dashboard")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "device.approve",
        "rollout.create",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
    ] {
        assert!(by_dashboard.contains(&action), "{action}: {audit}");
    }
    let abort = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "rollout.abort")
        .unwrap();
    assert_eq!(abort["detail"], "v1 misreads newcomer", "{audit}");
    driver.quit().await;
    ctl.stop().await;
}

/// Behind operator logins the browser logs in (any name, the token as password) and the
/// page works as without: its requests carry the login. Without it there is no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_behind_an_operator_login() {
    let Some(browser) = chromium() else {
        return;
    };
    let (token, alice) = edgeloop_controller::login::Operator::create("alice").unwrap();
    let ctl = TestController::start_with(BrokerChoice::Embedded, |c| c.operators = vec![alice])
        .await
        .unwrap();
    ctl.publish_example(1).await;
    let port = ctl.controller.http_addr.port();
    let dom = render(&browser, &format!("http://alice:{token}@localhost:{port}/")).await;
    assert!(dom.contains("<div id=\"error\"></div>"), "{dom}");
    let models = rows(&dom, "models");
    assert_eq!(texts(&models[0])[..2], ["vibration", "1"], "{dom}");
    let dom = render(&browser, &format!("http://localhost:{port}/")).await;
    assert!(!dom.contains("<table"), "{dom}");
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
    ask_to_enroll(&ctl, "intruder").await;

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
