//! The edgeloop agent: the on-device daemon.
//!
//! An [`agent::Agent`] reads inputs from an [`source::InputSource`], runs them through the
//! active model with tract ([`runtime`]), counts them into a drift window and publishes a
//! summary every N inputs. Every outgoing message goes through the durable
//! [`outbox`] and the MQTT [`link`]; signed deploy commands are verified and carried out
//! by the [`updater`] into A/B [`slots`]. [`sim`] runs many agents in one process.

pub mod agent;
pub mod config;
pub mod link;
pub mod outbox;
pub mod report;
pub mod runtime;
pub mod sim;
pub mod slots;
pub mod source;
pub mod updater;

pub use agent::Agent;
pub use config::AgentConfig;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This agent's version, reported in heartbeats.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
