//! The edgeloop agent: the on-device daemon.
//!
//! An [`agent::Agent`] reads inputs from an [`source::InputSource`], runs them through the
//! active model with tract ([`runtime`]), counts them into a drift window and publishes a
//! summary every N inputs. Every outgoing message goes through the durable
//! [`outbox`] and the MQTT [`link`]; signed deploy commands are verified and carried out
//! by the [`updater`] into A/B [`slots`]. [`sim`] runs many agents in one process.

pub mod agent;
pub mod api;
pub mod config;
pub mod enroll;
pub mod health;
pub mod link;
pub mod modelbench;
pub mod onnx_ops;
pub mod outbox;
pub mod report;
pub mod reservoir;
pub mod runtime;
pub mod sensor;
pub mod sim;
pub mod slots;
pub mod source;
pub mod transfer;
pub mod trust;
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

/// A token cancelled when the process receives Ctrl-C (SIGINT). Call inside a tokio runtime.
pub fn shutdown_on_ctrl_c() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        cancel.cancel();
    });
    token
}

/// The exit status of a command-line program: success, or failure after printing the
/// error and its causes on one line.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// One line for people: the error and each cause the text so far does not already contain
/// (library errors often include their source in their own message).
pub fn describe_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[from] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;
    #[derive(Debug, thiserror::Error)]
    #[error("context")]
    struct Context(#[source] Inner);

    #[test]
    fn causes_are_listed_once() {
        assert_eq!(super::describe_error(&Outer(Inner)), "outer: inner");
        assert_eq!(super::describe_error(&Context(Inner)), "context: inner");
    }
}
