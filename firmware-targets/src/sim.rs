//! A simulated I2C bus carrying an ADXL345 and a TMP102 mounted on a machine.
//!
//! The devices are modelled at the register level, so the real drivers run against them
//! unchanged: identity registers, configuration, standby, data-ready flags, two's
//! complement encodings, register auto-increment and missing acknowledgements are all
//! as on the data sheets. Simulated time advances one sample each time the driver finds
//! a new one ready, so a window of samples costs only the bus calls.
//!
//! The machine ([`SimulatedMachine`]) keeps one condition for a window of samples,
//! then draws the next: normal most of the time (Gaussian vibration of about 1 g rms,
//! 45 °C), sometimes faulty (impulsive, Laplace-distributed vibration of about 1.8 g rms,
//! 55 °C). These are the regimes the agent's example models were trained on, seen
//! through the features of [`crate::features`].

use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};

use crate::{adxl345, tmp102};

/// A small, seedable generator (xorshift64*): the simulation must be reproducible and
/// must not need `std`.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 spreads nearby seeds apart; a zero state would stay zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)).max(1))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self, mean: f64, std: f64) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        mean + std * libm::sqrt(-2.0 * libm::log(u)) * libm::cos(2.0 * core::f64::consts::PI * v)
    }

    /// Laplace-distributed with standard deviation `std`.
    fn laplace(&mut self, std: f64) -> f64 {
        let b = std / core::f64::consts::SQRT_2;
        let u = self.uniform() - 0.5;
        -b * libm::copysign(1.0, u) * libm::log(1.0 - 2.0 * libm::fabs(u))
    }
}

/// The machine's state while one window of samples is taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    pub fault: bool,
    /// Standard deviation of the vibration on the sensing axis, in g.
    pub vibration_g: f64,
    pub temperature_c: f64,
}

/// How the simulated machine behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineSettings {
    pub seed: u64,
    /// Samples taken under one condition before the next is drawn: the agent's window.
    pub samples_per_condition: u32,
    /// Share of conditions that are faults.
    pub fault_rate: f64,
}

impl Default for MachineSettings {
    fn default() -> Self {
        MachineSettings {
            seed: 1,
            samples_per_condition: 256,
            fault_rate: 0.1,
        }
    }
}

/// A machine vibrating along the accelerometer's z axis, which also reads gravity.
#[derive(Debug, Clone)]
pub struct SimulatedMachine {
    rng: Rng,
    settings: MachineSettings,
    condition: Condition,
    samples_left: u32,
}

impl SimulatedMachine {
    pub fn new(settings: MachineSettings) -> SimulatedMachine {
        let mut machine = SimulatedMachine {
            rng: Rng::new(settings.seed),
            settings,
            condition: Condition {
                fault: false,
                vibration_g: 0.0,
                temperature_c: 0.0,
            },
            samples_left: settings.samples_per_condition.max(1),
        };
        machine.condition = machine.draw_condition();
        machine
    }

    fn draw_condition(&mut self) -> Condition {
        let fault = self.rng.uniform() < self.settings.fault_rate;
        let (vibration_g, temperature_c) = if fault {
            (self.rng.normal(1.8, 0.3), self.rng.normal(55.0, 4.0))
        } else {
            (self.rng.normal(1.0, 0.15), self.rng.normal(45.0, 3.0))
        };
        Condition {
            fault,
            vibration_g: vibration_g.max(0.05),
            temperature_c,
        }
    }

    /// The condition the samples taken last were taken under.
    pub fn condition(&self) -> Condition {
        self.condition
    }

    /// The next acceleration sample (x, y, z), in g.
    pub fn acceleration(&mut self) -> [f64; 3] {
        if self.samples_left == 0 {
            self.condition = self.draw_condition();
            self.samples_left = self.settings.samples_per_condition.max(1);
        }
        self.samples_left -= 1;
        let vibration = if self.condition.fault {
            self.rng.laplace(self.condition.vibration_g)
        } else {
            self.rng.normal(0.0, self.condition.vibration_g)
        };
        [
            self.rng.normal(0.0, 0.02),
            self.rng.normal(0.0, 0.02),
            1.0 + vibration,
        ]
    }

    /// The machine's temperature now, in °C.
    pub fn temperature(&mut self) -> f64 {
        self.condition.temperature_c + self.rng.normal(0.0, 0.05)
    }
}

/// Register model of an ADXL345.
#[derive(Debug, Clone)]
struct Accelerometer {
    registers: [u8; 0x40],
    pointer: u8,
    /// A sample is latched in the data registers and not yet read.
    fresh: bool,
}

impl Accelerometer {
    fn new() -> Accelerometer {
        let mut registers = [0; 0x40];
        registers[adxl345::reg::DEVID as usize] = adxl345::DEVICE_ID;
        registers[adxl345::reg::BW_RATE as usize] = adxl345::DataRate::Hz100 as u8;
        Accelerometer {
            registers,
            pointer: 0,
            fresh: false,
        }
    }

    fn measuring(&self) -> bool {
        self.registers[adxl345::reg::POWER_CTL as usize] & adxl345::MEASURE != 0
    }

    /// The register value for `g` under the current DATA_FORMAT, saturating at the range.
    fn encode(&self, g: f64) -> [u8; 2] {
        let format = self.registers[adxl345::reg::DATA_FORMAT as usize];
        let code = format & 0x03;
        let range = f64::from(2u8 << code);
        let (per_lsb, bits) = if format & adxl345::FULL_RES != 0 {
            // 10 bits at ±2 g, one more for each doubling of the range.
            (f64::from(adxl345::G_PER_LSB), 10 + code)
        } else {
            // 10 bits across ±range.
            (range / 512.0, 10)
        };
        let limit = f64::from(1u16 << (bits - 1));
        let lsb = libm::round(g / per_lsb).clamp(-limit, limit - 1.0) as i16;
        lsb.to_le_bytes()
    }

    fn write(&mut self, bytes: &[u8]) {
        let Some((&pointer, values)) = bytes.split_first() else {
            return;
        };
        self.pointer = pointer & 0x3F;
        for &value in values {
            let register = self.pointer as usize;
            // Identity, interrupt source and data registers are read-only.
            if register != adxl345::reg::DEVID as usize
                && register != adxl345::reg::INT_SOURCE as usize
                && !(0x32..=0x39).contains(&register)
            {
                self.registers[register] = value;
            }
            self.pointer = (self.pointer + 1) & 0x3F;
        }
    }

    fn read(&mut self, buffer: &mut [u8], machine: &mut SimulatedMachine) {
        for byte in buffer {
            let register = self.pointer;
            if register == adxl345::reg::INT_SOURCE {
                if self.measuring() && !self.fresh {
                    let [x, y, z] = machine.acceleration();
                    for (i, g) in [x, y, z].into_iter().enumerate() {
                        let at = adxl345::reg::DATAX0 as usize + 2 * i;
                        let encoded = self.encode(g);
                        self.registers[at..at + 2].copy_from_slice(&encoded);
                    }
                    self.fresh = true;
                }
                self.registers[register as usize] =
                    if self.fresh { adxl345::DATA_READY } else { 0 };
            }
            if (adxl345::reg::DATAX0..adxl345::reg::DATAX0 + 6).contains(&register) {
                self.fresh = false;
            }
            *byte = self.registers[register as usize];
            self.pointer = (self.pointer + 1) & 0x3F;
        }
    }
}

/// Register model of a TMP102.
#[derive(Debug, Clone)]
struct Thermometer {
    /// Temperature, configuration, T_LOW, T_HIGH.
    registers: [[u8; 2]; 4],
    pointer: u8,
    /// Which byte of the pointed register the next read returns.
    byte: usize,
}

impl Thermometer {
    fn new() -> Thermometer {
        Thermometer {
            registers: [[0, 0], [0x60, 0xA0], [0x4B, 0x00], [0x50, 0x00]],
            pointer: 0,
            byte: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let Some((&pointer, values)) = bytes.split_first() else {
            return;
        };
        self.pointer = pointer & 0x03;
        self.byte = 0;
        if self.pointer != tmp102::reg::TEMPERATURE {
            for (i, &value) in values.iter().take(2).enumerate() {
                self.registers[self.pointer as usize][i] = value;
            }
            // The resolution bits are read-only ones.
            self.registers[1][0] |= tmp102::RESOLUTION_BITS;
        }
    }

    fn read(&mut self, buffer: &mut [u8], machine: &mut SimulatedMachine) {
        let shutdown = self.registers[1][0] & tmp102::SHUTDOWN != 0;
        if self.pointer == tmp102::reg::TEMPERATURE && self.byte == 0 && !shutdown {
            self.registers[0] = tmp102::raw(machine.temperature() as f32);
        }
        for byte in buffer {
            *byte = self.registers[self.pointer as usize][self.byte];
            self.byte = (self.byte + 1) % 2;
        }
    }
}

/// What the simulated bus answers when nothing acknowledges the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoDevice {
    pub address: u8,
}

impl embedded_hal::i2c::Error for NoDevice {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
    }
}

impl core::fmt::Display for NoDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "no device acknowledged address {:#04x}", self.address)
    }
}

/// An I2C bus with an ADXL345 and a TMP102 on a [`SimulatedMachine`].
#[derive(Debug, Clone)]
pub struct SimBus {
    machine: SimulatedMachine,
    accelerometer: Accelerometer,
    thermometer: Thermometer,
    accelerometer_address: u8,
    thermometer_address: u8,
    /// Devices unplugged for fault injection: they stop acknowledging.
    unplugged: [bool; 2],
}

impl SimBus {
    /// The two devices at their default addresses.
    pub fn new(settings: MachineSettings) -> SimBus {
        SimBus::with_addresses(settings, adxl345::DEFAULT_ADDRESS, tmp102::DEFAULT_ADDRESS)
    }

    pub fn with_addresses(settings: MachineSettings, accelerometer: u8, thermometer: u8) -> SimBus {
        SimBus {
            machine: SimulatedMachine::new(settings),
            accelerometer: Accelerometer::new(),
            thermometer: Thermometer::new(),
            accelerometer_address: accelerometer,
            thermometer_address: thermometer,
            unplugged: [false; 2],
        }
    }

    /// The condition the machine was in for the samples read last: the ground truth a
    /// window's features should be classified as.
    pub fn condition(&self) -> Condition {
        self.machine.condition()
    }

    /// Disconnects (`false`) or reconnects the device at `address`.
    pub fn set_connected(&mut self, address: u8, connected: bool) {
        if address == self.accelerometer_address {
            self.unplugged[0] = !connected;
        }
        if address == self.thermometer_address {
            self.unplugged[1] = !connected;
        }
    }

    fn device(&mut self, address: u8) -> Result<Device, NoDevice> {
        if address == self.accelerometer_address && !self.unplugged[0] {
            Ok(Device::Accelerometer)
        } else if address == self.thermometer_address && !self.unplugged[1] {
            Ok(Device::Thermometer)
        } else {
            Err(NoDevice { address })
        }
    }
}

enum Device {
    Accelerometer,
    Thermometer,
}

impl ErrorType for SimBus {
    type Error = NoDevice;
}

impl I2c for SimBus {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        let device = self.device(address)?;
        for operation in operations {
            match (&device, operation) {
                (Device::Accelerometer, Operation::Write(bytes)) => self.accelerometer.write(bytes),
                (Device::Accelerometer, Operation::Read(buffer)) => {
                    self.accelerometer.read(buffer, &mut self.machine)
                }
                (Device::Thermometer, Operation::Write(bytes)) => self.thermometer.write(bytes),
                (Device::Thermometer, Operation::Read(buffer)) => {
                    self.thermometer.read(buffer, &mut self.machine)
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adxl345::{Adxl345, Axis, DataRate, Range};
    use crate::features::VibrationFeatures;
    use crate::tmp102::Tmp102;

    fn bus(seed: u64, fault_rate: f64) -> SimBus {
        SimBus::new(MachineSettings {
            seed,
            samples_per_condition: 256,
            fault_rate,
        })
    }

    #[test]
    fn the_drivers_configure_and_read_the_simulated_devices() {
        let mut bus = bus(7, 0.0);
        {
            let mut accel = Adxl345::new(&mut bus, 0x53, Range::G16, DataRate::Hz3200).unwrap();
            let mut z = [0.0; 256];
            accel.read_window(Axis::Z, &mut z).unwrap();
            let mean = z.iter().sum::<f32>() / 256.0;
            assert!((mean - 1.0).abs() < 0.2, "gravity on z: {mean}");
            let a = accel.read().unwrap();
            assert!(a.x.abs() < 0.2 && a.y.abs() < 0.2, "{a:?}");
            // Every reading is a whole number of LSBs.
            for v in z {
                let lsb = v / adxl345::G_PER_LSB;
                assert!((lsb - lsb.round()).abs() < 1e-3, "{v}");
            }
        }
        assert_eq!(
            bus.accelerometer.registers[adxl345::reg::DATA_FORMAT as usize],
            adxl345::FULL_RES | 3
        );
        assert_eq!(
            bus.accelerometer.registers[adxl345::reg::BW_RATE as usize],
            0x0F
        );

        let temperature = bus.condition().temperature_c as f32;
        let mut thermometer = Tmp102::new(&mut bus, 0x48).unwrap();
        let t = thermometer.read_celsius().unwrap();
        assert!((t - temperature).abs() < 0.3, "{t} vs {temperature}");
        assert_eq!((t / tmp102::CELSIUS_PER_LSB).fract(), 0.0);
    }

    #[test]
    fn standby_absent_and_foreign_devices_are_errors() {
        let mut bus = bus(1, 0.0);
        // Released: back in standby, no new samples.
        let accel = Adxl345::new(&mut bus, 0x53, Range::G2, DataRate::Hz100).unwrap();
        let bus = accel.release().unwrap();
        let mut again = Adxl345 {
            i2c: &mut *bus,
            address: 0x53,
        };
        assert_eq!(
            again.read().unwrap_err(),
            adxl345::Error::NotReady {
                polls: adxl345::MAX_POLLS
            }
        );

        // The thermometer's address answers with a temperature byte, not an ADXL345 id.
        assert!(matches!(
            Adxl345::new(&mut *bus, 0x48, Range::G2, DataRate::Hz100),
            Err(adxl345::Error::WrongDevice { .. })
        ));
        // Nothing at 0x1D.
        assert_eq!(
            Adxl345::new(&mut *bus, 0x1D, Range::G2, DataRate::Hz100).err(),
            Some(adxl345::Error::Bus(NoDevice { address: 0x1D }))
        );
        // The accelerometer's DEVID register reads 0xE5, which lacks the TMP102's bits.
        assert!(matches!(
            Tmp102::new(&mut *bus, 0x53),
            Err(tmp102::Error::WrongDevice { .. })
        ));

        // Unplugged mid-stream: the next read fails; plugged back, reads resume.
        let mut accel = Adxl345::new(&mut *bus, 0x53, Range::G16, DataRate::Hz3200).unwrap();
        accel.read().unwrap();
        accel.i2c.set_connected(0x53, false);
        assert_eq!(
            accel.read().unwrap_err(),
            adxl345::Error::Bus(NoDevice { address: 0x53 })
        );
        accel.i2c.set_connected(0x53, true);
        accel.read().unwrap();
    }

    #[test]
    fn reading_faster_than_new_samples_repeats_the_latched_one() {
        let mut bus = bus(3, 0.0);
        let mut accel = Adxl345::new(&mut bus, 0x53, Range::G16, DataRate::Hz3200).unwrap();
        let first = accel.read().unwrap();
        // Read the data registers again without waiting for DATA_READY.
        let mut raw = [0; 6];
        accel
            .i2c
            .write_read(0x53, &[adxl345::reg::DATAX0], &mut raw)
            .unwrap();
        let z = f32::from(i16::from_le_bytes([raw[4], raw[5]])) * adxl345::G_PER_LSB;
        assert_eq!(z, first.z);
        assert_ne!(accel.read().unwrap(), first);
    }

    #[test]
    fn the_range_saturates_and_ten_bit_mode_scales_by_range() {
        let mut a = Accelerometer::new();
        a.registers[adxl345::reg::DATA_FORMAT as usize] = adxl345::FULL_RES | Range::G2 as u8;
        assert_eq!(i16::from_le_bytes(a.encode(1.0)), 256);
        assert_eq!(i16::from_le_bytes(a.encode(50.0)), 511);
        assert_eq!(i16::from_le_bytes(a.encode(-50.0)), -512);
        a.registers[adxl345::reg::DATA_FORMAT as usize] = adxl345::FULL_RES | Range::G16 as u8;
        assert_eq!(i16::from_le_bytes(a.encode(15.0)), 3846);
        assert_eq!(i16::from_le_bytes(a.encode(17.0)), 4095);
        // 10-bit mode at ±8 g: 15.6 mg per LSB.
        a.registers[adxl345::reg::DATA_FORMAT as usize] = Range::G8 as u8;
        assert_eq!(i16::from_le_bytes(a.encode(1.0)), 64);
        assert_eq!(i16::from_le_bytes(a.encode(-9.0)), -512);
    }

    #[test]
    fn temperatures_round_trip_through_the_twelve_bit_register() {
        for (c, raw) in [
            (25.0, [0x19, 0x00]),
            (0.0625, [0x00, 0x10]),
            (0.0, [0x00, 0x00]),
            (-0.25, [0xFF, 0xC0]),
            (-25.0, [0xE7, 0x00]),
            (-55.0, [0xC9, 0x00]),
            (127.9375, [0x7F, 0xF0]),
        ] {
            assert_eq!(tmp102::raw(c), raw, "{c}");
            assert_eq!(tmp102::celsius(raw), c, "{raw:?}");
        }
        assert_eq!(tmp102::raw(500.0), [0x7F, 0xF0]);
    }

    #[test]
    fn a_shut_down_thermometer_holds_its_last_conversion() {
        let mut bus = bus(5, 0.0);
        let mut thermometer = Tmp102::new(&mut bus, 0x48).unwrap();
        let before = thermometer.read_celsius().unwrap();
        let bus = thermometer.release();
        bus.write(0x48, &[tmp102::reg::CONFIG, 0x61, 0xA0]).unwrap();
        let mut readings = [0; 2];
        for _ in 0..5 {
            bus.write_read(0x48, &[tmp102::reg::TEMPERATURE], &mut readings)
                .unwrap();
            assert_eq!(tmp102::celsius(readings), before);
        }
        // Tmp102::new wakes it up again.
        let mut thermometer = Tmp102::new(&mut *bus, 0x48).unwrap();
        let after: [f32; 5] = core::array::from_fn(|_| thermometer.read_celsius().unwrap());
        assert!(after.iter().any(|&t| t != before), "{after:?}");
    }

    /// The features of simulated windows follow the distributions the example models were
    /// trained on (controller/assets/vibration/make_model.py): normal rms ≈ 1.0, crest
    /// factor (peak / rms) ≈ 3.0, kurtosis ≈ 3, 45 °C; faulty rms ≈ 1.8, crest ≈ 4.5,
    /// kurtosis ≈ 6, 55 °C.
    #[test]
    fn window_features_match_the_regimes_the_models_learned() {
        for (fault_rate, rms, crest, kurtosis, temperature) in
            [(0.0, 1.0, 3.0, 3.0, 45.0), (1.0, 1.8, 4.4, 6.0, 55.0)]
        {
            let mut bus = bus(11, fault_rate);
            let mut accel = Adxl345::new(&mut bus, 0x53, Range::G16, DataRate::Hz3200).unwrap();
            let n = 200;
            let (mut sum_rms, mut sum_crest, mut sum_kurtosis) = (0.0, 0.0, 0.0);
            let mut window = [0.0; 256];
            for _ in 0..n {
                accel.read_window(Axis::Z, &mut window).unwrap();
                let f = VibrationFeatures::of(&window).unwrap();
                sum_rms += f.rms;
                sum_crest += f.peak / f.rms;
                sum_kurtosis += f.kurtosis;
            }
            let n = n as f32;
            let (mean_rms, mean_crest, mean_kurtosis) =
                (sum_rms / n, sum_crest / n, sum_kurtosis / n);
            assert!((mean_rms - rms).abs() < 0.1, "rms {mean_rms} vs {rms}");
            assert!(
                (mean_crest - crest).abs() < 0.35,
                "crest {mean_crest} vs {crest}"
            );
            assert!(
                (mean_kurtosis - kurtosis).abs() < 0.6,
                "kurtosis {mean_kurtosis} vs {kurtosis}"
            );
            let bus = accel.release().unwrap();
            assert_eq!(bus.condition().fault, fault_rate == 1.0);
            let t = Tmp102::new(bus, 0x48).unwrap().read_celsius().unwrap();
            assert!((t - temperature).abs() < 15.0, "{t}");
        }
    }

    #[test]
    fn the_machine_is_reproducible_and_faults_at_its_rate() {
        let settings = MachineSettings {
            seed: 42,
            samples_per_condition: 4,
            fault_rate: 0.25,
        };
        let (mut a, mut b) = (
            SimulatedMachine::new(settings),
            SimulatedMachine::new(settings),
        );
        let mut faults = 0;
        for _ in 0..4000 {
            assert_eq!(a.acceleration(), b.acceleration());
            let condition = a.condition();
            for _ in 1..4 {
                assert_eq!(a.acceleration(), b.acceleration());
                assert_eq!(a.condition(), condition, "one condition per window");
            }
            faults += usize::from(condition.fault);
        }
        let rate = faults as f64 / 4000.0;
        assert!((rate - 0.25).abs() < 0.03, "{rate}");
    }
}
