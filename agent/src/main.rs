//! `edgeloop-agent`: the on-device daemon.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
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
    /// Time a model on this device: load (parse, type, optimize, plan), then inference on
    /// random inputs; prints load time, p50/p99 latency and peak resident memory.
    Bench {
        /// The ONNX model file.
        model: PathBuf,
        /// A concrete shape, and optionally a dtype (f32, f64, i64, i32, u8, bool), for an
        /// input: `NAME:DIMS[:DTYPE]`, for example `image:1x3x224x224`. Inputs not named
        /// keep the shape the model declares, with symbolic axes set to 1.
        #[arg(long = "input", value_name = "NAME:DIMS[:DTYPE]")]
        inputs: Vec<edgeloop_agent::modelbench::InputSpec>,
        /// Timed runs.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Threads tract's matrix multiplications (dense layers, convolutions) may split
        /// across, as the agent's `inference_threads` allows.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// `json` makes the last line of output one JSON object (`load_ms`, `p50_ms`,
        /// `p99_ms`, `peak_rss_kb`, …).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write the sample of inputs the agent keeps for retraining as CSV (the model's
    /// features, `predicted`, `label`), to stdout or `--out`; a summary goes to stderr.
    Samples {
        #[command(flatten)]
        overrides: Overrides,
        /// The file to write: CSV for a table model; NPY for a tensor model, which needs it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print this device's public key (`ed25519:…`), creating the key pair in the state
    /// directory if there is none yet: what an operator pre-authorizes.
    DeviceKey {
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the built-in default configuration (a commented TOML file).
    PrintDefaultConfig,
    /// Load and validate a configuration, then print the effective values.
    CheckConfig {
        #[command(flatten)]
        overrides: Overrides,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
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
        Command::Bench {
            model,
            inputs,
            runs,
            warmup,
            threads,
            output,
        } => {
            let onnx = std::fs::read(&model)
                .with_context(|| format!("reading the model {}", model.display()))?;
            let options = edgeloop_agent::modelbench::BenchOptions {
                inputs,
                runs,
                warmup,
                threads: usize::from(threads),
            };
            let report = tokio::task::spawn_blocking(move || {
                edgeloop_agent::modelbench::bench(&onnx, &options)
            })
            .await?
            .with_context(|| format!("benchmarking {}", model.display()))?;
            match output {
                Output::Text => print!("{}", report.text(&model.display().to_string())),
                Output::Json => println!("{}", serde_json::to_string(&report)?),
            }
        }
        Command::Samples { overrides, out } => {
            let config = overrides.load()?;
            let path = config.state_dir.join(edgeloop_agent::reservoir::FILE);
            anyhow::ensure!(
                path.exists(),
                "{} does not exist: the agent has kept no sample in this state directory",
                path.display()
            );
            let mut reservoir =
                edgeloop_agent::reservoir::Reservoir::open(&path, config.reservoir_bytes)?;
            let status = reservoir.status()?;
            let export = reservoir.export(None, u64::MAX, None)?;
            match (&out, export.format) {
                (Some(file), _) => std::fs::write(file, &export.bytes)
                    .with_context(|| format!("writing {}", file.display()))?,
                (None, edgeloop_agent::reservoir::SampleFormat::Csv) => {
                    std::io::Write::write_all(&mut std::io::stdout().lock(), &export.bytes)?
                }
                (None, edgeloop_agent::reservoir::SampleFormat::Npy) => anyhow::bail!(
                    "the sample is of a tensor model's inputs, an NPY file: name it with --out"
                ),
            }
            eprintln!(
                "{} inputs of {} kept ({} labelled) from {} seen; capacity {}",
                status.kept,
                export.model.map_or("no model".to_string(), |m| format!(
                    "{} v{}",
                    m.name, m.version
                )),
                status.labelled,
                status.seen,
                status.capacity
            );
        }
        Command::DeviceKey { overrides } => {
            let config = overrides.load()?;
            std::fs::create_dir_all(&config.state_dir)
                .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
            let key = edgeloop_agent::enroll::device_key(&config.state_dir)?;
            println!("{}", key.public().to_text());
        }
        Command::CheckConfig { overrides } => {
            let config = overrides.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
        }
        Command::Run { overrides } => {
            let config = overrides.load()?;
            let source = source::from_config(&config.source).context("opening the input source")?;
            edgeloop_agent::runtime::set_inference_threads(config.inference_threads);
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
            // One setting for the process: every simulated device's plans share it.
            edgeloop_agent::runtime::set_inference_threads(config.inference_threads);
            let shutdown = edgeloop_agent::shutdown_on_ctrl_c();
            let fleet = Fleet::spawn(&config, devices, &id_prefix, &config.state_dir, &shutdown)?;
            fleet.join().await;
        }
    }
    Ok(())
}
