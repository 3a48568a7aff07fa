//! The `sensor` input source: an ADXL345 accelerometer and a TMP102 thermometer on an
//! I2C bus, read by `edgeloop-firmware-targets`' drivers, each window of vibration turned
//! into one row of features.
//!
//! The bus is read on a thread of its own, because a window takes real time on hardware
//! (256 samples at 3200 Hz is 80 ms, and each sample two bus transactions); the agent's
//! loop takes finished rows without waiting. The thread reads the next window only once
//! the agent has taken the previous row, so a slow agent never queues stale windows.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::time::Duration;

use edgeloop_firmware_targets::adxl345::{Adxl345, Axis, DataRate, Range};
use edgeloop_firmware_targets::features::VibrationFeatures;
use edgeloop_firmware_targets::sim::{MachineSettings, SimBus};
use edgeloop_firmware_targets::tmp102::Tmp102;
use edgeloop_firmware_targets::{SharedI2c, linux};
use embedded_hal::i2c::I2c;
use tracing::{info, warn};

use crate::config::{SensorAxis, SensorConfig};
use crate::source::{InputSource, SourceError, VIBRATION_FEATURES};

/// How long the reader waits before trying a failed bus again. Each failed attempt
/// yields one row of NaN, so an outage shows in the drift summaries as missing values
/// (about one per second) rather than as silence.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One window's row, with the simulated machine's ground truth when asked for.
struct Reading {
    row: Vec<f32>,
    label: Option<usize>,
}

pub struct SensorSource {
    columns: Vec<String>,
    rows: Receiver<Reading>,
    last_label: Option<usize>,
    /// The reader thread ended (it never does unless it panicked).
    ended: bool,
}

/// What the reader thread needs besides the bus.
#[derive(Debug, Clone)]
struct ReaderSettings {
    accelerometer: u8,
    thermometer: u8,
    axis: Axis,
    window: usize,
    range: Range,
    rate: DataRate,
}

impl SensorSource {
    /// Opens the configured bus and starts reading it. `seed` and `labels` apply to the
    /// simulated bus only.
    pub fn open(config: &SensorConfig, seed: u64, labels: bool) -> Result<Self, SourceError> {
        let settings = ReaderSettings {
            accelerometer: config.accelerometer_address,
            thermometer: config.thermometer_address,
            axis: match config.axis {
                SensorAxis::X => Axis::X,
                SensorAxis::Y => Axis::Y,
                SensorAxis::Z => Axis::Z,
            },
            window: config.window as usize,
            range: match config.range_g {
                2 => Range::G2,
                4 => Range::G4,
                8 => Range::G8,
                _ => Range::G16,
            },
            rate: DataRate::at_least(config.sample_rate_hz),
        };
        let (tx, rows) = sync_channel(0);
        if config.bus == "sim" {
            // The simulated board is wired for the default addresses, as most boards are:
            // configuring others finds nothing there, as it would on such a board.
            let bus = SharedI2c::new(SimBus::new(MachineSettings {
                seed,
                samples_per_condition: config.window,
                fault_rate: config.fault_rate,
            }));
            let truth = bus.clone();
            let ground_truth =
                labels.then_some(move || usize::from(truth.lock().condition().fault));
            spawn(bus, settings, ground_truth, tx)?;
        } else {
            let path = std::path::Path::new(&config.bus);
            let bus = linux::open(path).map_err(|e| SourceError::Sensor(e.to_string()))?;
            spawn(SharedI2c::new(bus), settings, None::<fn() -> usize>, tx)?;
        }
        Ok(SensorSource {
            columns: VIBRATION_FEATURES.iter().map(|s| s.to_string()).collect(),
            rows,
            last_label: None,
            ended: false,
        })
    }
}

fn spawn<B, T>(
    bus: SharedI2c<B>,
    settings: ReaderSettings,
    ground_truth: Option<T>,
    rows: SyncSender<Reading>,
) -> Result<(), SourceError>
where
    B: I2c + Send + 'static,
    B::Error: std::fmt::Debug,
    T: Fn() -> usize + Send + 'static,
{
    std::thread::Builder::new()
        .name("sensor".into())
        .spawn(move || read_forever(bus, &settings, ground_truth, &rows))
        .map_err(|e| SourceError::Sensor(format!("cannot start the sensor thread: {e}")))?;
    Ok(())
}

/// Reads windows until the source is dropped. A bus failure (at setup or mid-window) is
/// logged once per outage, yields a row of NaN and is retried after [`RETRY_AFTER`],
/// setting the devices up afresh (they may have lost power).
fn read_forever<B, T>(
    bus: SharedI2c<B>,
    settings: &ReaderSettings,
    ground_truth: Option<T>,
    rows: &SyncSender<Reading>,
) where
    B: I2c,
    B::Error: std::fmt::Debug,
    T: Fn() -> usize,
{
    let mut window = vec![0.0f32; settings.window];
    let mut failing = false;
    loop {
        let devices = Adxl345::new(
            bus.clone(),
            settings.accelerometer,
            settings.range,
            settings.rate,
        )
        .map_err(|e| e.to_string())
        .and_then(|accel| {
            Tmp102::new(bus.clone(), settings.thermometer)
                .map(|thermometer| (accel, thermometer))
                .map_err(|e| e.to_string())
        });
        let error = match devices {
            Ok((mut accel, mut thermometer)) => loop {
                let row = accel
                    .read_window(settings.axis, &mut window)
                    .map_err(|e| e.to_string())
                    .and_then(|()| thermometer.read_celsius().map_err(|e| e.to_string()))
                    .map(|celsius| {
                        let f = VibrationFeatures::of(&window);
                        let (rms, peak, kurtosis) = f.map_or((f32::NAN, f32::NAN, f32::NAN), |f| {
                            (f.rms, f.peak, f.kurtosis)
                        });
                        vec![rms, peak, kurtosis, celsius]
                    });
                match row {
                    Ok(row) => {
                        if failing {
                            info!("the sensors read again");
                            failing = false;
                        }
                        let label = ground_truth.as_ref().map(|truth| truth());
                        if rows.send(Reading { row, label }).is_err() {
                            return;
                        }
                    }
                    Err(e) => break e,
                }
            },
            Err(e) => e,
        };
        if !failing {
            warn!(error = %error, "cannot read the sensors; retrying every {RETRY_AFTER:?}, missing values meanwhile");
            failing = true;
        }
        let gap = Reading {
            row: vec![f32::NAN; VIBRATION_FEATURES.len()],
            label: None,
        };
        if rows.send(gap).is_err() {
            return;
        }
        std::thread::sleep(RETRY_AFTER);
    }
}

impl InputSource for SensorSource {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next_row(&mut self) -> Option<Vec<f32>> {
        match self.rows.try_recv() {
            Ok(reading) => {
                self.last_label = reading.label;
                Some(reading.row)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                if !self.ended {
                    warn!("the sensor thread ended: no more sensor inputs");
                    self.ended = true;
                }
                None
            }
        }
    }

    fn label(&self) -> Option<edgeloop_shared::drift::Target> {
        self.last_label.map(edgeloop_shared::drift::Target::Class)
    }

    fn finished(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{AgentConfig, SourceKind};
    use crate::runtime::Plan;

    const MODEL_V1: &[u8] = include_bytes!("../../controller/assets/vibration/model_v1.onnx");

    fn sensor_config(fault_rate: f64) -> SensorConfig {
        SensorConfig {
            fault_rate,
            ..AgentConfig::default().source.sensor
        }
    }

    /// The next `n` rows with their labels, waiting for the reader thread.
    fn take(source: &mut dyn InputSource, n: usize) -> Vec<(Vec<f32>, Option<usize>)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut rows = Vec::new();
        while rows.len() < n {
            assert!(Instant::now() < deadline, "{} rows after 60 s", rows.len());
            match source.next_row() {
                Some(row) => rows.push((
                    row,
                    source.label().map(|l| match l {
                        edgeloop_shared::drift::Target::Class(c) => c,
                        other => panic!("the simulated bus gives classes, not {other:?}"),
                    }),
                )),
                None => {
                    assert!(!source.finished());
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        rows
    }

    /// Raw windows from the simulated ADXL345 and TMP102, through the drivers and the
    /// window features, are classified by the example model as the machine's ground truth
    /// says: the features mean what the model learned they mean.
    #[test]
    fn the_example_model_recognises_faults_from_simulated_sensor_windows() {
        let config = AgentConfig {
            source: crate::config::SourceConfig {
                kind: SourceKind::Sensor,
                labels: true,
                seed: 9,
                sensor: sensor_config(0.3),
                ..AgentConfig::default().source
            },
            ..AgentConfig::default()
        };
        config.validate().unwrap();
        let mut source = crate::source::from_config(&config.source).unwrap();
        assert_eq!(source.columns(), VIBRATION_FEATURES);
        let plan = Plan::compile(MODEL_V1, 4).unwrap();
        let names: Vec<String> = VIBRATION_FEATURES.iter().map(|s| s.to_string()).collect();
        let rows = take(source.as_mut(), 300);
        let (mut right, mut faults) = (0, 0);
        for (row, label) in &rows {
            assert!(row.iter().all(|v| v.is_finite()), "{row:?}");
            let label = label.expect("the simulated bus gives ground truth");
            faults += label;
            right += usize::from(plan.infer(row, &names).unwrap().class == label);
        }
        let accuracy = right as f64 / rows.len() as f64;
        assert!((60..=120).contains(&faults), "{faults} faults in 300");
        assert!(accuracy > 0.97, "accuracy {accuracy}");
    }

    #[test]
    fn without_labels_the_rows_carry_none_and_seeds_repeat() {
        let open = |seed| SensorSource::open(&sensor_config(0.1), seed, false).unwrap();
        let (mut a, mut b, mut c) = (open(4), open(4), open(5));
        let (ra, rb, rc) = (take(&mut a, 5), take(&mut b, 5), take(&mut c, 5));
        assert_eq!(ra, rb);
        assert_ne!(ra, rc);
        assert!(ra.iter().all(|(_, label)| label.is_none()));
    }

    /// A bus with nothing at the configured address: the source keeps going, giving rows
    /// of NaN (the drift window counts them as missing) instead of ending or stalling.
    #[test]
    fn a_sensor_missing_from_the_bus_yields_missing_values() {
        let config = SensorConfig {
            accelerometer_address: 0x1D,
            ..sensor_config(0.0)
        };
        let mut source = SensorSource::open(&config, 1, true).unwrap();
        let rows = take(&mut source, 1);
        assert!(rows[0].0.iter().all(|v| v.is_nan()), "{rows:?}");
        assert_eq!(rows[0].1, None);
        assert!(!source.finished());
    }

    #[test]
    fn a_missing_i2c_adapter_is_a_clear_error() {
        let config = SensorConfig {
            bus: "/dev/i2c-edgeloop-test".into(),
            ..sensor_config(0.0)
        };
        let Err(err) = SensorSource::open(&config, 1, false) else {
            panic!("opened a missing adapter");
        };
        let message = err.to_string();
        assert!(message.contains("/dev/i2c-edgeloop-test"), "{message}");
    }

    #[test]
    fn sensor_settings_are_validated() {
        for (key, patch) in [
            ("source.sensor.window", "window = 4"),
            ("source.sensor.range_g", "range_g = 3"),
            ("source.sensor.sample_rate_hz", "sample_rate_hz = 6400"),
            (
                "source.sensor.accelerometer_address",
                "accelerometer_address = 0x7F",
            ),
            (
                "source.sensor.thermometer_address",
                "thermometer_address = 0x53",
            ),
            ("source.sensor.fault_rate", "fault_rate = 1.5"),
            ("source.sensor.bus", "bus = \"\""),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.toml");
            std::fs::write(
                &path,
                format!("[source]\ntype = \"sensor\"\n[source.sensor]\n{patch}\n"),
            )
            .unwrap();
            let err = AgentConfig::load(Some(&path)).unwrap_err().to_string();
            assert!(err.contains(key), "{patch}: {err}");
        }
    }
}
