//! Hardware targets of the edgeloop agent.
//!
//! This crate owns what is specific to the boards the agent runs on and the sensors it
//! reads:
//! - the table of supported boards ([`BOARDS`]): the Rust target each one is built for
//!   and its CPU, which the cross-compilation scripts (`cross/`) and device provisioning
//!   read;
//! - `no_std` sensor drivers generic over embedded-hal 1.0's I2C trait: an ADXL345
//!   accelerometer ([`adxl345`]) and a TMP102 thermometer ([`tmp102`]);
//! - the features the agent's models read from a window of raw vibration ([`features`]);
//! - a simulated bus carrying both sensors on a machine that is sometimes faulty
//!   ([`sim`]), register for register, so the drivers run unchanged without hardware;
//! - with the `std` feature, a bus shared by several drivers ([`SharedI2c`]); with the
//!   `linux` feature, the Linux I2C character device ([`linux`]).
//!
//! Everything but [`SharedI2c`] and [`linux`] is `no_std` and allocation-free, so the
//! drivers and features also build for a microcontroller.

#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod adxl345;
pub mod features;
#[cfg(feature = "linux")]
pub mod linux;
pub mod sim;
pub mod tmp102;

#[cfg(feature = "std")]
mod shared;
#[cfg(feature = "std")]
pub use shared::SharedI2c;

/// CPU architecture families the agent is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
    Armv7,
}

impl Arch {
    /// Every family, in declaration order.
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::Armv7];

    /// The name Rust gives the family (`std::env::consts::ARCH` on such a device), as
    /// model manifests list their target architectures.
    pub fn rust_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "arm",
        }
    }
}

/// One supported board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardProfile {
    /// The id used on the command line (`--board`).
    pub id: &'static str,
    pub name: &'static str,
    pub arch: Arch,
    /// The Rust target triple the agent is compiled for.
    pub rust_target: &'static str,
    pub cpu_cores: u8,
}

/// Every supported board.
pub const BOARDS: &[BoardProfile] = &[
    BoardProfile {
        id: "rpi4",
        name: "Raspberry Pi 4 Model B (64-bit OS)",
        arch: Arch::Aarch64,
        rust_target: "aarch64-unknown-linux-gnu",
        cpu_cores: 4,
    },
    BoardProfile {
        id: "rpi5",
        name: "Raspberry Pi 5 (64-bit OS)",
        arch: Arch::Aarch64,
        rust_target: "aarch64-unknown-linux-gnu",
        cpu_cores: 4,
    },
    BoardProfile {
        id: "jetson-orin-nano",
        name: "NVIDIA Jetson Orin Nano",
        arch: Arch::Aarch64,
        rust_target: "aarch64-unknown-linux-gnu",
        cpu_cores: 6,
    },
    BoardProfile {
        id: "beaglebone-black",
        name: "BeagleBone Black",
        arch: Arch::Armv7,
        rust_target: "armv7-unknown-linux-gnueabihf",
        cpu_cores: 1,
    },
    BoardProfile {
        id: "linux-x86_64",
        name: "Generic x86_64 Linux",
        arch: Arch::X86_64,
        rust_target: "x86_64-unknown-linux-gnu",
        cpu_cores: 2,
    },
    BoardProfile {
        id: "linux-aarch64",
        name: "Generic aarch64 Linux",
        arch: Arch::Aarch64,
        rust_target: "aarch64-unknown-linux-gnu",
        cpu_cores: 4,
    },
    BoardProfile {
        id: "android-arm64",
        name: "Android arm64 device",
        arch: Arch::Aarch64,
        rust_target: "aarch64-linux-android",
        cpu_cores: 8,
    },
];

/// The board with this id.
pub fn board(id: &str) -> Option<&'static BoardProfile> {
    BOARDS.iter().find(|b| b.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_ids_are_unique_and_targets_match_their_arch() {
        for (i, a) in BOARDS.iter().enumerate() {
            assert!(
                BOARDS[i + 1..].iter().all(|b| b.id != a.id),
                "{} twice",
                a.id
            );
            let prefix = match a.arch {
                Arch::X86_64 => "x86_64-",
                Arch::Aarch64 => "aarch64-",
                Arch::Armv7 => "armv7-",
            };
            assert!(a.rust_target.starts_with(prefix), "{}", a.id);
        }
        assert_eq!(board("rpi4").map(|b| b.arch), Some(Arch::Aarch64));
        assert_eq!(Arch::Armv7.rust_name(), "arm");
        for (i, a) in Arch::ALL.iter().enumerate() {
            assert!(
                Arch::ALL[i + 1..]
                    .iter()
                    .all(|b| b.rust_name() != a.rust_name())
            );
        }
        assert!(board("nope").is_none());
    }
}
