//! Many simulated devices in one process: each is a real [`Agent`] with its own id, state
//! directory, MQTT connection and synthetic vibration sensor. A shared [`ShiftControl`]
//! moves every sensor's distribution at once, to show drift.

use std::path::Path;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::agent::{Agent, AgentError};
use crate::config::AgentConfig;
use crate::source::{ShiftControl, VibrationGenerator};

/// A running simulated fleet.
pub struct Fleet {
    pub device_ids: Vec<String>,
    pub shift: ShiftControl,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts `devices` agents from `template`, named `{prefix}-001`…, keeping their state
    /// under `state_root/{id}`. Each gets its own sensor seed.
    pub fn spawn(
        template: &AgentConfig,
        devices: usize,
        prefix: &str,
        state_root: &Path,
        shutdown: &CancellationToken,
    ) -> Result<Self, AgentError> {
        let shift = ShiftControl::default();
        let base_seed = template.source.seed;
        let mut tasks = JoinSet::new();
        let mut device_ids = Vec::with_capacity(devices);
        for i in 1..=devices {
            let mut config = template.clone();
            config.device_id = format!("{prefix}-{i:03}");
            config.state_dir = state_root.join(&config.device_id);
            // Many devices in one process cannot share one port: no local API.
            config.api.listen.clear();
            let seed = base_seed.wrapping_add(i as u64 * 7919);
            let source =
                VibrationGenerator::new(seed, shift.clone()).with_labels(config.source.labels);
            let agent = Agent::new(config.clone(), Box::new(source))?;
            let token = shutdown.child_token();
            let id = config.device_id.clone();
            tasks.spawn(async move {
                if let Err(e) = agent.run(token).await {
                    warn!(device = %id, error = %e, "simulated agent stopped with an error");
                }
            });
            device_ids.push(config.device_id);
        }
        Ok(Fleet {
            device_ids,
            shift,
            tasks,
        })
    }

    /// Waits for every agent to stop (after the shutdown token is cancelled).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}
