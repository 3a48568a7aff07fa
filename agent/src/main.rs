//! `edgeloop-agent`: the on-device daemon.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeloop_agent::config::{AgentConfig, DEFAULT_CONFIG_TOML};
use edgeloop_agent::sim::Fleet;
use edgeloop_agent::{Agent, source};

#[derive(Parser)]
#[command(
    name = "edgeloop-agent",
    version,
    about = "edgeloop on-device agent: inference, drift monitoring, verified model updates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run several simulated devices in this process (real agent code, synthetic sensors).
    Simulate {
        #[command(flatten)]
        overrides: Overrides,
        /// Number of simulated devices.
        #[arg(long, default_value_t = 5)]
        devices: usize,
        /// Device ids are `{prefix}-001`, `{prefix}-002`, …
        #[arg(long, default_value = "sim")]
        id_prefix: String,
    },
    /// Print the built-in default configuration (a commented TOML file).
    PrintDefaultConfig,
    /// Load and validate a configuration, then print the effective values.
    CheckConfig {
        #[command(flatten)]
        overrides: Overrides,
    },
}

#[derive(clap::Args)]
struct Overrides {
    /// TOML configuration file (defaults, then this file, then EDGELOOP_AGENT_* variables, then flags).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    device_id: Option<String>,
    #[arg(long)]
    broker_url: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl Overrides {
    fn load(&self) -> anyhow::Result<AgentConfig> {
        let mut config = AgentConfig::load(self.config.as_deref())?;
        if let Some(v) = &self.device_id {
            config.device_id = v.clone();
        }
        if let Some(v) = &self.broker_url {
            config.broker_url = v.clone();
        }
        if let Some(v) = &self.state_dir {
            config.state_dir = v.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    edgeloop_agent::exit_with(run().await)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::PrintDefaultConfig => print!("{DEFAULT_CONFIG_TOML}"),
        Command::CheckConfig { overrides } => {
            let config = overrides.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
        }
        Command::Run { overrides } => {
            let config = overrides.load()?;
            let source = source::from_config(&config.source).context("opening the input source")?;
            Agent::new(config, source)?
                .run(edgeloop_agent::shutdown_on_ctrl_c())
                .await?;
        }
        Command::Simulate {
            overrides,
            devices,
            id_prefix,
        } => {
            let config = overrides.load()?;
            let shutdown = edgeloop_agent::shutdown_on_ctrl_c();
            let fleet = Fleet::spawn(&config, devices, &id_prefix, &config.state_dir, &shutdown)?;
            fleet.join().await;
        }
    }
    Ok(())
}
