//! Analog Devices ADXL345 three-axis accelerometer over I2C.
//!
//! The driver sets the device to full resolution (3.9 mg per LSB at every range), the
//! chosen range and output data rate, starts measuring, and reads one sample at a time
//! when the device flags fresh data. Register map and scaling: ADXL345 data sheet, Rev. G.

use embedded_hal::i2c::I2c;

/// The device's address with its ALT ADDRESS pin low (0x1D when it is high).
pub const DEFAULT_ADDRESS: u8 = 0x53;
/// What the DEVID register always holds.
pub const DEVICE_ID: u8 = 0xE5;
/// Acceleration per LSB in full-resolution mode, in g.
pub const G_PER_LSB: f32 = 0.0039;

/// Register addresses.
pub mod reg {
    pub const DEVID: u8 = 0x00;
    pub const BW_RATE: u8 = 0x2C;
    pub const POWER_CTL: u8 = 0x2D;
    pub const INT_SOURCE: u8 = 0x30;
    pub const DATA_FORMAT: u8 = 0x31;
    /// DATAX0; X1, Y0, Y1, Z0, Z1 follow, little-endian two's complement.
    pub const DATAX0: u8 = 0x32;
}

/// POWER_CTL: measurement mode (standby when clear).
pub const MEASURE: u8 = 0x08;
/// INT_SOURCE: a new sample is in the data registers.
pub const DATA_READY: u8 = 0x80;
/// DATA_FORMAT: full resolution.
pub const FULL_RES: u8 = 0x08;

/// Measurement range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    G2 = 0,
    G4 = 1,
    G8 = 2,
    G16 = 3,
}

impl Range {
    /// The largest magnitude the range measures, in g.
    pub fn g(self) -> f32 {
        match self {
            Range::G2 => 2.0,
            Range::G4 => 4.0,
            Range::G8 => 8.0,
            Range::G16 => 16.0,
        }
    }
}

/// Output data rates (BW_RATE rate codes), from 100 Hz up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRate {
    Hz100 = 0x0A,
    Hz200 = 0x0B,
    Hz400 = 0x0C,
    Hz800 = 0x0D,
    Hz1600 = 0x0E,
    Hz3200 = 0x0F,
}

impl DataRate {
    pub fn hz(self) -> u32 {
        100 << (self as u32 - DataRate::Hz100 as u32)
    }

    /// The slowest rate at least `hz` (3200 Hz when none is).
    pub fn at_least(hz: u32) -> DataRate {
        [
            DataRate::Hz100,
            DataRate::Hz200,
            DataRate::Hz400,
            DataRate::Hz800,
            DataRate::Hz1600,
        ]
        .into_iter()
        .find(|r| r.hz() >= hz)
        .unwrap_or(DataRate::Hz3200)
    }
}

/// One reading, in g.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acceleration {
    pub x: f32,
    pub y: f32,
    pub z: f32,
}

/// Which axis to read a one-dimensional signal from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    X,
    Y,
    Z,
}

impl Acceleration {
    pub fn axis(&self, axis: Axis) -> f32 {
        match axis {
            Axis::X => self.x,
            Axis::Y => self.y,
            Axis::Z => self.z,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed (no acknowledgement, arbitration lost, ...).
    Bus(E),
    /// Something answered at the address, but its DEVID is not the ADXL345's.
    WrongDevice { found: u8 },
    /// The device flagged no new sample after this many polls: it is in standby, or
    /// the data rate is slower than the reads.
    NotReady { polls: u32 },
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "ADXL345: bus error {e:?}"),
            Error::WrongDevice { found } => write!(
                f,
                "ADXL345: the device's id is {found:#04x}, not {DEVICE_ID:#04x}: is another chip at this address?"
            ),
            Error::NotReady { polls } => {
                write!(f, "ADXL345: no new sample after {polls} polls")
            }
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for Error<E> {}

/// How many times [`Adxl345::read`] asks for a new sample before giving up. At 100 kHz
/// one poll takes about 0.3 ms, so this waits well over one period of the slowest rate.
pub const MAX_POLLS: u32 = 1000;

/// A configured, measuring ADXL345.
pub struct Adxl345<I2C> {
    pub(crate) i2c: I2C,
    pub(crate) address: u8,
}

impl<I2C: I2c> Adxl345<I2C> {
    /// Checks the device id, sets full resolution, `range` and `rate`, and starts measuring.
    pub fn new(
        mut i2c: I2C,
        address: u8,
        range: Range,
        rate: DataRate,
    ) -> Result<Self, Error<I2C::Error>> {
        let mut id = [0];
        i2c.write_read(address, &[reg::DEVID], &mut id)
            .map_err(Error::Bus)?;
        if id[0] != DEVICE_ID {
            return Err(Error::WrongDevice { found: id[0] });
        }
        let mut device = Adxl345 { i2c, address };
        device.write(reg::POWER_CTL, 0)?;
        device.write(reg::DATA_FORMAT, FULL_RES | range as u8)?;
        device.write(reg::BW_RATE, rate as u8)?;
        device.write(reg::POWER_CTL, MEASURE)?;
        Ok(device)
    }

    fn write(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write(self.address, &[register, value])
            .map_err(Error::Bus)
    }

    /// The next sample: waits (polling INT_SOURCE) until the device has a new one, then
    /// reads all six data registers in one transaction so the axes belong together.
    pub fn read(&mut self) -> Result<Acceleration, Error<I2C::Error>> {
        let mut polls = 0;
        loop {
            let mut source = [0];
            self.i2c
                .write_read(self.address, &[reg::INT_SOURCE], &mut source)
                .map_err(Error::Bus)?;
            if source[0] & DATA_READY != 0 {
                break;
            }
            polls += 1;
            if polls >= MAX_POLLS {
                return Err(Error::NotReady { polls });
            }
        }
        let mut raw = [0; 6];
        self.i2c
            .write_read(self.address, &[reg::DATAX0], &mut raw)
            .map_err(Error::Bus)?;
        let g = |lo: u8, hi: u8| f32::from(i16::from_le_bytes([lo, hi])) * G_PER_LSB;
        Ok(Acceleration {
            x: g(raw[0], raw[1]),
            y: g(raw[2], raw[3]),
            z: g(raw[4], raw[5]),
        })
    }

    /// Fills `window` with consecutive samples of one axis.
    pub fn read_window(&mut self, axis: Axis, window: &mut [f32]) -> Result<(), Error<I2C::Error>> {
        for value in window.iter_mut() {
            *value = self.read()?.axis(axis);
        }
        Ok(())
    }

    /// Puts the device in standby and gives the bus back.
    pub fn release(mut self) -> Result<I2C, Error<I2C::Error>> {
        self.write(reg::POWER_CTL, 0)?;
        Ok(self.i2c)
    }
}
