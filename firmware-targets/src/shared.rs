//! One bus, several drivers, any thread.

use std::sync::{Arc, Mutex, MutexGuard};

use embedded_hal::i2c::{ErrorType, I2c, Operation};

/// A handle on a bus that several drivers own at once (each driver takes its bus by
/// value). Each transaction holds the bus's lock, so transactions never interleave. The
/// handle is `Send` when the bus is, unlike embedded-hal-bus's `RefCell` and `Rc`
/// devices, and owns the bus, unlike its `MutexDevice`, which borrows it.
#[derive(Debug, Default)]
pub struct SharedI2c<B>(Arc<Mutex<B>>);

impl<B> Clone for SharedI2c<B> {
    fn clone(&self) -> Self {
        SharedI2c(Arc::clone(&self.0))
    }
}

impl<B> SharedI2c<B> {
    pub fn new(bus: B) -> SharedI2c<B> {
        SharedI2c(Arc::new(Mutex::new(bus)))
    }

    /// The bus itself, between transactions (for a simulated bus: to read its ground
    /// truth or inject faults).
    pub fn lock(&self) -> MutexGuard<'_, B> {
        // A panic in another holder leaves the bus between transactions: still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<B: ErrorType> ErrorType for SharedI2c<B> {
    type Error = B::Error;
}

impl<B: I2c> I2c for SharedI2c<B> {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        self.lock().transaction(address, operations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adxl345::{self, Adxl345, DataRate, Range};
    use crate::sim::{MachineSettings, SimBus};
    use crate::tmp102::Tmp102;

    #[test]
    fn two_drivers_share_one_bus_from_another_thread() {
        let bus = SharedI2c::new(SimBus::new(MachineSettings::default()));
        let mut accel = Adxl345::new(
            bus.clone(),
            adxl345::DEFAULT_ADDRESS,
            Range::G16,
            DataRate::Hz3200,
        )
        .unwrap();
        let mut thermometer = Tmp102::new(bus.clone(), 0x48).unwrap();
        let reader = std::thread::spawn(move || {
            (0..100).map(|_| accel.read().unwrap().z).sum::<f32>() / 100.0
        });
        let t = thermometer.read_celsius().unwrap();
        let z = reader.join().unwrap();
        assert!((z - 1.0).abs() < 0.5, "{z}");
        assert!((20.0..80.0).contains(&t), "{t}");
        let expected = bus.lock().condition().temperature_c as f32;
        assert!((t - expected).abs() < 0.3);
    }
}
