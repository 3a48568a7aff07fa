//! The edgeloop fleet controller and the operator CLI `edgeloop`.
//!
//! [`server::Controller`] runs the broker (embedded [`broker`] or external), telemetry
//! [`ingest`], the model [`registry`], the [`rollout`] dispatcher, [`retention`] and the
//! HTTP [`api`], over a [`store::Store`]. [`demo`] runs the whole loop with simulated devices.

pub mod api;
pub mod broker;
pub mod config;
pub mod datasets;
pub mod demo;
pub mod gate;
pub mod ingest;
pub mod keys;
pub mod login;
pub mod plan;
pub mod provision;
pub mod registry;
pub mod retention;
pub mod retrain;
pub mod rollout;
pub mod server;
pub mod store;
pub mod trainer;
pub mod transfer;
pub mod trust;

/// `http://` / `mqtt://` host for a listening address: a wildcard address is reached on
/// loopback from this machine.
pub fn reachable_host(addr: std::net::SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}
