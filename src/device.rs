//! Choosing the compute device from cargo features and a user's choice.

use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Which device to run on; parse it from a command-line flag with [`FromStr`]
/// (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`, `metal:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU this build supports (CUDA, then Metal) if one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal device with this ordinal (needs the `metal` feature).
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => {
                let n = n
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("bad device ordinal in `{s}`")))?;
                (kind, Some(n))
            }
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda" | "gpu", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{s}`: expected auto, cpu, cuda[:N] or metal[:N]"
            ))),
        }
    }
}

impl DeviceChoice {
    /// Opens the chosen device.
    ///
    /// Asking for CUDA or Metal in a build without that feature is an error that says which
    /// feature to enable; `Auto` quietly falls back to the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    Ok(Device::new_cuda(0)?)
                } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    Ok(Device::new_metal(0)?)
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cuda(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(n)?),
            Self::Metal(n) if cfg!(feature = "metal") => Ok(Device::new_metal(n)?),
            Self::Cuda(_) => Err(Error::InvalidArgument(
                "this build has no CUDA support: rebuild with `--features cuda`".into(),
            )),
            Self::Metal(_) => Err(Error::InvalidArgument(
                "this build has no Metal support: rebuild with `--features metal`".into(),
            )),
        }
    }
}

/// Opens the device for a `--device` flag value: [`DeviceChoice::open`].
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    choice.open()
}
