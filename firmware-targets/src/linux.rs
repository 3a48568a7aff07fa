//! The drivers on Linux: an I2C adapter's character device (`/dev/i2c-N`, from the
//! kernel's i2c-dev module) through linux-embedded-hal.

use std::path::{Path, PathBuf};

pub use linux_embedded_hal::I2cdev;

/// The adapter could not be opened.
#[derive(Debug)]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot open the I2C adapter {}: {} (is the i2c-dev module loaded, and may this user open the device?)",
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for OpenError {}

/// Opens an I2C adapter, such as `/dev/i2c-1` on a Raspberry Pi's header pins.
pub fn open(path: &Path) -> Result<I2cdev, OpenError> {
    I2cdev::new(path).map_err(|e| OpenError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_adapter_is_an_error_naming_it() {
        let Err(err) = super::open(std::path::Path::new("/dev/i2c-no-such-adapter")) else {
            panic!("opened a missing adapter");
        };
        let message = err.to_string();
        assert!(message.contains("/dev/i2c-no-such-adapter"), "{message}");
        assert!(message.contains("i2c-dev"), "{message}");
    }
}
