//! Wires the controller together: store, broker (embedded or external), ingest, rollout
//! dispatcher and the HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_agent::link::{BrokerAddr, TlsFiles};
use edgeloop_shared::signing::SecretKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, AppState};
use crate::broker::{BrokerAuth, BrokerError, EmbeddedBroker};
use crate::config::{ConfigError, ControllerConfig};
use crate::ingest::{self, BusConfig, IngestStats};
use crate::registry::{self, ArtifactStore, PublishError, PublishRequest};
use crate::rollout::{self, Dispatcher, RolloutError, RolloutRequest};
use crate::store::{ModelRow, PgStore, RolloutRow, SqliteStore, Store, StoreError};

pub const DATABASE_FILE: &str = "edgeloop.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Trust(#[from] crate::trust::RelayError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store the configuration names: PostgreSQL for a `database_url`, otherwise
/// SQLite in the data directory (which must exist).
pub async fn open_store(config: &ControllerConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(if config.database_url.is_empty() {
        Arc::new(SqliteStore::open(&config.data_dir.join(DATABASE_FILE))?)
    } else {
        Arc::new(PgStore::connect(&config.database_url).await?)
    })
}

/// A running controller.
pub struct Controller {
    /// Where the HTTP API actually listens (the configured port may have been 0).
    pub http_addr: SocketAddr,
    /// The broker devices should connect to.
    pub mqtt_url: String,
    pub store: Arc<dyn Store>,
    pub stats: Arc<IngestStats>,
    pub artifacts: ArtifactStore,
    pub config: ControllerConfig,
    key: SecretKey,
    dispatcher_wake: Arc<Notify>,
    shutdown: CancellationToken,
    http_task: tokio::task::JoinHandle<()>,
}

impl Controller {
    /// Starts every part; returns once the broker and the HTTP API accept connections.
    pub async fn start(
        config: ControllerConfig,
        key: SecretKey,
        shutdown: CancellationToken,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = open_store(&config).await?;
        let artifacts = ArtifactStore::new(config.data_dir.join("artifacts"));

        let topics = config.topics();
        let auth = if config.broker_auth {
            Some(BrokerAuth::new(
                store.clone(),
                &config.mqtt_client_id,
                topics.clone(),
            )?)
        } else {
            None
        };
        let credentials = match &auth {
            Some(a) => Some(a.controller_login()),
            None if !config.mqtt_username.is_empty() => {
                Some((config.mqtt_username.clone(), config.mqtt_password.clone()))
            }
            None => None,
        };
        // Where devices connect, and where the controller's own connection goes.
        let (mqtt_url, own_url) = if config.mqtt_url.is_empty() {
            let listen = config.mqtt_listen;
            let embedded = tokio::task::spawn_blocking(move || EmbeddedBroker::start(listen, auth))
                .await
                .expect("broker start does not panic")?;
            (embedded.url(), embedded.controller_url())
        } else {
            (config.mqtt_url.clone(), config.mqtt_url.clone())
        };
        let broker = BrokerAddr::parse(&own_url).map_err(|e| ConfigError::Invalid {
            key: "mqtt_url",
            reason: e.to_string(),
        })?;
        let tls = if broker.tls {
            let files = TlsFiles {
                ca_file: config.mqtt_ca_file.clone(),
                cert_file: config.mqtt_cert_file.clone(),
                key_file: config.mqtt_key_file.clone(),
            };
            Some(files.client_config().map_err(|e| ConfigError::Invalid {
                key: "mqtt_ca_file/mqtt_cert_file/mqtt_key_file",
                reason: e.to_string(),
            })?)
        } else {
            None
        };

        let stats = Arc::new(IngestStats::default());
        let client = ingest::start(
            BusConfig {
                broker,
                client_id: config.mqtt_client_id.clone(),
                credentials,
                topics: topics.clone(),
                accept_unknown_devices: config.accept_unknown_devices,
                tls,
                // The embedded broker serves one controller: no group needed.
                shared_group: if config.mqtt_url.is_empty() {
                    None
                } else {
                    Some(config.mqtt_shared_group.clone()).filter(|g| !g.is_empty())
                },
                artifacts: artifacts.clone(),
            },
            store.clone(),
            stats.clone(),
            shutdown.child_token(),
        );
        let trust = Arc::new(
            crate::trust::TrustRelay::start(
                store.clone(),
                config.root_keys.clone(),
                topics.trust(),
                client.clone(),
                key.clone(),
            )
            .await?,
        );
        let dispatcher_wake = Arc::new(Notify::new());
        tokio::spawn(
            Dispatcher {
                store: store.clone(),
                key: key.clone(),
                topics,
                client,
                command_ttl: Duration::from_secs(config.command_ttl_s),
                resend_after: Duration::from_secs(config.resend_after_s),
                wake: dispatcher_wake.clone(),
                holder: config.mqtt_client_id.clone(),
            }
            .run(shutdown.child_token()),
        );
        tokio::spawn(
            crate::retention::Retention {
                store: store.clone(),
                raw_days: config.retention_raw_days,
                hourly_days: config.retention_hourly_days,
            }
            .run(shutdown.child_token()),
        );

        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| ServeError::Http {
                addr: config.http_addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| ServeError::Http {
            addr: config.http_addr,
            source,
        })?;
        tokio::spawn(
            crate::retrain::Retrainer {
                store: store.clone(),
                artifacts: artifacts.clone(),
                key: key.clone(),
                policies: config.retraining.clone(),
                data_dir: config.data_dir.clone(),
                controller_url: format!(
                    "http://{}:{}",
                    crate::reachable_host(http_addr),
                    http_addr.port()
                ),
                interval: Duration::from_secs(config.retraining_check_s),
                dispatcher_wake: dispatcher_wake.clone(),
                holder: config.mqtt_client_id.clone(),
            }
            .run(shutdown.child_token()),
        );
        let app = api::router(
            AppState {
                store: store.clone(),
                stats: stats.clone(),
                artifacts: artifacts.clone(),
                offline_after: Duration::from_secs(config.offline_after_s),
                dispatcher_wake: dispatcher_wake.clone(),
                trust,
                key: key.clone(),
                policies: Arc::new(config.retraining.clone()),
                issue_broker_passwords: config.broker_auth,
                device_settings: Arc::new(api::DeviceSettings {
                    mqtt_url: mqtt_url.clone(),
                    topic_root: config.topic_root.clone(),
                    trusted_keys: vec![key.public().to_text()],
                }),
            },
            http_addr.ip().is_loopback(),
            crate::login::Logins::new(&config.operators),
        );
        let stop = shutdown.clone();
        let http_task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        if config.operators.is_empty() && !http_addr.ip().is_loopback() {
            tracing::warn!(
                http = %http_addr,
                "the API listens beyond loopback without operators: anyone who reaches it may \
                 steer the fleet (configure [[operators]], or put an authenticating proxy in front)"
            );
        }
        info!(http = %http_addr, mqtt = %mqtt_url, key_id = %key.id(), "controller running");
        Ok(Controller {
            http_addr,
            mqtt_url,
            store,
            stats,
            artifacts,
            config,
            key,
            dispatcher_wake,
            shutdown,
            http_task,
        })
    }

    pub fn signing_key(&self) -> &SecretKey {
        &self.key
    }

    /// The controller's base URL, for devices' `controller_url`.
    pub fn http_url(&self) -> String {
        format!(
            "http://{}:{}",
            crate::reachable_host(self.http_addr),
            self.http_addr.port()
        )
    }

    pub async fn publish(&self, request: PublishRequest<'_>) -> Result<ModelRow, PublishError> {
        registry::publish(self.store.as_ref(), &self.artifacts, &self.key, request).await
    }

    /// A rollout of `name` v`version` to `devices` (every known device when none), all at
    /// once.
    pub async fn rollout(
        &self,
        name: &str,
        version: u64,
        devices: Option<Vec<String>>,
    ) -> Result<RolloutRow, RolloutError> {
        self.create_rollout(RolloutRequest {
            devices,
            ..RolloutRequest::new(name, version)
        })
        .await
    }

    /// A rollout of an older version, sent as rollback commands (see [`RolloutRequest`]).
    pub async fn rollback(
        &self,
        name: &str,
        version: u64,
        devices: Option<Vec<String>>,
    ) -> Result<RolloutRow, RolloutError> {
        self.create_rollout(RolloutRequest {
            rollback: true,
            devices,
            ..RolloutRequest::new(name, version)
        })
        .await
    }

    /// Creates a rollout and wakes the dispatcher so its first wave goes out at once.
    pub async fn create_rollout(
        &self,
        request: RolloutRequest,
    ) -> Result<RolloutRow, RolloutError> {
        let row = rollout::create(self.store.as_ref(), request).await?;
        self.dispatcher_wake.notify_one();
        Ok(row)
    }

    /// Stops every task and waits for the HTTP server to finish its requests.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.http_task.await;
    }
}
