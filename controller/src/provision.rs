//! `edgeloop device provision`: a provisioning bundle to copy onto a device's image before
//! it is flashed. It holds the agent's configuration (the controller's address and keys, a
//! new enrollment token for the device's group), a systemd unit, and the board's settings.
//! On first boot the agent creates its own key pair and enrolls with the token.

use std::path::{Path, PathBuf};

use edgeloop_agent::config::AgentConfig;
use serde::{Deserialize, Serialize};

/// Where the bundle's files go on the device.
pub const CONFIG_PATH: &str = "/etc/edgeloop/agent.toml";
pub const BINARY_PATH: &str = "/usr/local/bin/edgeloop-agent";
pub const UNIT_NAME: &str = "edgeloop-agent.service";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} exists already; provisioning never overwrites")]
    Exists(PathBuf),
    #[error("the controller at {url}: {message}")]
    Controller { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent configuration written does not load: {0}")]
    Config(String),
}

/// What to provision (also the arguments of `edgeloop device provision`).
#[derive(Debug, Clone, clap::Args)]
pub struct Request {
    /// The device's id (1-64 characters of [A-Za-z0-9_.-]).
    #[arg(long)]
    pub device_id: String,
    /// The board: rpi4, rpi5, jetson-orin-nano, beaglebone-black, linux-x86_64,
    /// linux-aarch64 or android-arm64.
    #[arg(long)]
    pub board: String,
    #[arg(long)]
    pub group: String,
    #[arg(long, value_delimiter = ',')]
    pub tags: Vec<String>,
    /// The device waits for `edgeloop device approve` instead of joining at once.
    #[arg(long)]
    pub review: bool,
    /// How long the token is valid.
    #[arg(long, default_value_t = 7 * 86_400)]
    pub ttl_s: u64,
    /// The broker as the device reaches it (default: the controller's own view).
    #[arg(long)]
    pub broker_url: Option<String>,
    /// The controller as the device reaches it (default: --controller).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Where to write the bundle (created; must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub device_id: String,
    pub dir: PathBuf,
    pub token_id: String,
    pub group: String,
    pub expires_ms: u64,
    pub files: Vec<String>,
}

#[derive(Deserialize)]
struct Settings {
    mqtt_url: String,
    topic_root: String,
    trusted_keys: Vec<String>,
}

#[derive(Deserialize)]
struct Token {
    id: String,
    token: String,
    expires_ms: u64,
}

/// The agent configuration a bundle carries: only what differs from the defaults.
#[derive(Serialize)]
struct AgentFile<'a> {
    config_version: u32,
    device_id: &'a str,
    board: &'a str,
    broker_url: &'a str,
    topic_root: &'a str,
    controller_url: &'a str,
    trusted_keys: &'a [String],
    state_dir: &'a str,
    enrollment_token: &'a str,
}

async fn call(request: reqwest::RequestBuilder, url: &str) -> Result<String, ProvisionError> {
    let failed = |message: String| ProvisionError::Controller {
        url: url.to_string(),
        message,
    };
    let response = request.send().await.map_err(|e| failed(e.to_string()))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| failed(e.to_string()))?;
    if !status.is_success() {
        return Err(failed(format!("{status}: {text}")));
    }
    Ok(text)
}

/// Creates a token for the device on the controller at `controller` and writes the bundle;
/// `client` carries what the controller needs of the caller (the actor header for the audit
/// log, an operator's token).
pub async fn write(
    controller: &str,
    request: Request,
    client: &reqwest::Client,
) -> Result<Written, ProvisionError> {
    let invalid = |m: String| Err(ProvisionError::Invalid(m));
    if !edgeloop_shared::is_valid_identifier(&request.device_id) {
        return invalid(format!(
            "device id `{}`: use 1-64 characters of [A-Za-z0-9_.-]",
            request.device_id
        ));
    }
    let Some(board) = edgeloop_firmware_targets::board(&request.board) else {
        let known: Vec<&str> = edgeloop_firmware_targets::BOARDS
            .iter()
            .map(|b| b.id)
            .collect();
        return invalid(format!(
            "board `{}` is not one of {}",
            request.board,
            known.join(", ")
        ));
    };
    if request.out.exists() {
        return Err(ProvisionError::Exists(request.out));
    }
    let base = controller.trim_end_matches('/');
    let settings_url = format!("{base}/api/v1/device-settings");
    let settings: Settings = serde_json::from_str(
        &call(client.get(&settings_url), &settings_url).await?,
    )
    .map_err(|e| ProvisionError::Controller {
        url: settings_url.clone(),
        message: e.to_string(),
    })?;
    let tokens_url = format!("{base}/api/v1/enrollment-tokens");
    let body = serde_json::json!({
        "group": request.group,
        "tags": request.tags,
        "ttl_s": request.ttl_s,
        "uses": 1,
        "auto_approve": !request.review,
    });
    let token: Token =
        serde_json::from_str(&call(client.post(&tokens_url).json(&body), &tokens_url).await?)
            .map_err(|e| ProvisionError::Controller {
                url: tokens_url.clone(),
                message: e.to_string(),
            })?;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ProvisionError::Io { path, source }
    };
    std::fs::create_dir_all(&request.out).map_err(io(&request.out))?;
    let broker_url = request.broker_url.as_deref().unwrap_or(&settings.mqtt_url);
    let controller_url = request.public_url.as_deref().unwrap_or(base);
    let agent = AgentFile {
        config_version: edgeloop_agent::config::CONFIG_VERSION,
        device_id: &request.device_id,
        board: board.id,
        broker_url,
        topic_root: &settings.topic_root,
        controller_url,
        trusted_keys: &settings.trusted_keys,
        state_dir: "/var/lib/edgeloop-agent",
        enrollment_token: &token.token,
    };
    let agent_toml = format!(
        "# edgeloop-agent configuration for {} ({}), written by `edgeloop device provision`.\n\
         # Install as {CONFIG_PATH}. Every other key keeps its default\n\
         # (`edgeloop-agent print-default-config` lists them). The enrollment token is for\n\
         # this device alone and expires at {} ms since the epoch.\n{}",
        request.device_id,
        board.name,
        token.expires_ms,
        toml::to_string(&agent).expect("the agent file serializes")
    );
    let unit = format!(
        "[Unit]\n\
         Description=edgeloop agent ({id})\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={BINARY_PATH} run --config {CONFIG_PATH}\n\
         Restart=always\n\
         RestartSec=5\n\
         # The agent's outbox, model slots and keys, kept across restarts.\n\
         DynamicUser=yes\n\
         StateDirectory=edgeloop-agent\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        id = request.device_id
    );
    let board_toml = format!(
        "# The board this bundle is for; build the agent for its target (see cross/README.md).\n\
         id = \"{}\"\nname = \"{}\"\narch = \"{:?}\"\nrust_target = \"{}\"\ncpu_cores = {}\n",
        board.id, board.name, board.arch, board.rust_target, board.cpu_cores
    );
    let install = format!(
        "Provisioning bundle for {id} ({name})\n\n\
         With the device's root file system mounted at $ROOT (for a Raspberry Pi image, the\n\
         second partition of the SD card):\n\n\
         \x20 install -D -m 0755 edgeloop-agent \"$ROOT{BINARY_PATH}\"   # built for {target}\n\
         \x20 install -D -m 0600 agent.toml \"$ROOT{CONFIG_PATH}\"\n\
         \x20 install -D -m 0644 {UNIT_NAME} \"$ROOT/etc/systemd/system/{UNIT_NAME}\"\n\
         \x20 ln -s /etc/systemd/system/{UNIT_NAME} \"$ROOT/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}\"\n\n\
         On first boot the agent creates its key pair in /var/lib/edgeloop-agent and enrolls\n\
         into group {group}{review}.\n",
        id = request.device_id,
        name = board.name,
        target = board.rust_target,
        group = request.group,
        review = if request.review {
            "; approve it with `edgeloop device approve ID`"
        } else {
            ", approved at once"
        },
    );
    let files = [
        ("agent.toml", agent_toml.as_str()),
        (UNIT_NAME, unit.as_str()),
        ("board.toml", board_toml.as_str()),
        ("INSTALL.txt", install.as_str()),
    ];
    for (name, text) in files {
        let path = request.out.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    // What was written must be what the agent reads.
    AgentConfig::load(Some(&request.out.join("agent.toml")))
        .map_err(|e| ProvisionError::Config(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let path = request.out.join("agent.toml");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
    }
    Ok(Written {
        device_id: request.device_id,
        dir: request.out,
        token_id: token.id,
        group: request.group,
        expires_ms: token.expires_ms,
        files: files.iter().map(|(n, _)| n.to_string()).collect(),
    })
}
