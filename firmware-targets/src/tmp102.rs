//! Texas Instruments TMP102 temperature sensor over I2C.
//!
//! The driver puts the device in continuous conversion at 4 Hz in normal (12-bit) mode
//! and reads the temperature register: 0.0625 °C per LSB, two's complement, left-aligned
//! in two bytes, most significant first. Register map: TMP102 data sheet (SBOS397).

use embedded_hal::i2c::I2c;

/// The device's address with ADD0 tied to ground (0x49–0x4B for the other pins).
pub const DEFAULT_ADDRESS: u8 = 0x48;
/// Degrees Celsius per LSB in normal mode.
pub const CELSIUS_PER_LSB: f32 = 0.0625;

/// Pointer register values.
pub mod reg {
    pub const TEMPERATURE: u8 = 0x00;
    pub const CONFIG: u8 = 0x01;
}

/// First configuration byte: the converter resolution bits, which always read 1.
pub const RESOLUTION_BITS: u8 = 0x60;
/// First configuration byte: shutdown mode.
pub const SHUTDOWN: u8 = 0x01;
/// Second configuration byte: 4 Hz conversions, alert clear, normal (12-bit) mode.
pub const RATE_4HZ_NORMAL: u8 = 0xA0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    Bus(E),
    /// The configuration register's resolution bits read other than 11: whatever is at
    /// the address is not a TMP102.
    WrongDevice {
        config: u8,
    },
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "TMP102: bus error {e:?}"),
            Error::WrongDevice { config } => write!(
                f,
                "TMP102: configuration byte {config:#04x} lacks the resolution bits every TMP102 reads as set: is another chip at this address?"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for Error<E> {}

/// A configured TMP102 converting continuously.
pub struct Tmp102<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Tmp102<I2C> {
    /// Checks that the device looks like a TMP102 and starts continuous conversion.
    pub fn new(mut i2c: I2C, address: u8) -> Result<Self, Error<I2C::Error>> {
        let mut config = [0; 2];
        i2c.write_read(address, &[reg::CONFIG], &mut config)
            .map_err(Error::Bus)?;
        if config[0] & RESOLUTION_BITS != RESOLUTION_BITS {
            return Err(Error::WrongDevice { config: config[0] });
        }
        i2c.write(
            address,
            &[reg::CONFIG, config[0] & !SHUTDOWN, RATE_4HZ_NORMAL],
        )
        .map_err(Error::Bus)?;
        Ok(Tmp102 { i2c, address })
    }

    /// The last converted temperature, in °C.
    pub fn read_celsius(&mut self) -> Result<f32, Error<I2C::Error>> {
        let mut raw = [0; 2];
        self.i2c
            .write_read(self.address, &[reg::TEMPERATURE], &mut raw)
            .map_err(Error::Bus)?;
        Ok(celsius(raw))
    }

    /// Gives the bus back (the device keeps converting).
    pub fn release(self) -> I2C {
        self.i2c
    }
}

/// The temperature a 12-bit reading stands for.
pub fn celsius(raw: [u8; 2]) -> f32 {
    // Left-aligned 12 bits: an arithmetic shift keeps the sign.
    f32::from(i16::from_be_bytes(raw) >> 4) * CELSIUS_PER_LSB
}

/// The reading that stands for `celsius` (rounded to the nearest LSB, clamped to the
/// 12-bit range), as the device's register would hold it.
pub fn raw(celsius: f32) -> [u8; 2] {
    let lsb = libm::roundf(celsius / CELSIUS_PER_LSB).clamp(-2048.0, 2047.0) as i16;
    (lsb << 4).to_be_bytes()
}
