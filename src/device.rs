//! Choosing the compute device at run time: `cpu`, `vulkan:N` or `cuda:N`.

use std::str::FromStr;

use burn::tensor::Device;

/// A device named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// burn's Flex backend (pure Rust, multi-threaded).
    Cpu,
    /// The N-th discrete GPU through Vulkan (cargo feature `vulkan`).
    Vulkan(usize),
    /// The N-th CUDA GPU (cargo feature `cuda`).
    Cuda(usize),
}

/// Why a device could not be named or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("bad device index `{index}` in `{spec}`")]
    BadIndex { spec: String, index: String },
    #[error("unknown device `{spec}`: expected cpu, vulkan:N or cuda:N")]
    Unknown { spec: String },
    /// A device named by a configuration key; the cause follows in the chain.
    #[error("`{key}`")]
    Setting {
        key: &'static str,
        #[source]
        source: Box<DeviceError>,
    },
    #[error("this binary was built without {backend} support: rebuild with `--features {feature}`")]
    NotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
    #[error("device {spec} computed a wrong result in a self-test")]
    WrongResult { spec: DeviceSpec },
    #[error("device {spec} is not available (no such GPU, or its driver or loader is missing)")]
    Unavailable { spec: DeviceSpec },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => {
                let index = i.parse::<usize>().map_err(|_| DeviceError::BadIndex {
                    spec: s.to_string(),
                    index: i.to_string(),
                })?;
                (k, index)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" | "flex" => Ok(Self::Cpu),
            "vulkan" => Ok(Self::Vulkan(index)),
            "cuda" => Ok(Self::Cuda(index)),
            _ => Err(DeviceError::Unknown {
                spec: s.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Vulkan(i) => write!(f, "vulkan:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The device a configuration names (`train.device`); errors name the key.
pub fn configured(name: &str) -> Result<DeviceSpec, DeviceError> {
    name.parse().map_err(|e| DeviceError::Setting {
        key: "train.device",
        source: Box::new(e),
    })
}

/// The device a configuration names, opened.
pub fn open_configured(name: &str) -> Result<(DeviceSpec, Device), DeviceError> {
    let spec = configured(name)?;
    Ok((spec, spec.open()?))
}

impl DeviceSpec {
    /// The burn device after a small computation on it succeeded, so that a missing GPU or
    /// driver is a clear error here rather than a panic deep inside the backend later.
    pub fn open(&self) -> Result<Device, DeviceError> {
        let device = self.device()?;
        let probe = device.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = std::panic::catch_unwind(move || {
            let t = burn::tensor::Tensor::<1>::ones([4], &probe).sum();
            crate::io::host::host_values(t).first().copied()
        });
        std::panic::set_hook(previous);
        match outcome {
            Ok(Some(4.0)) => Ok(device),
            Ok(_) => Err(DeviceError::WrongResult { spec: *self }),
            Err(_) => Err(DeviceError::Unavailable { spec: *self }),
        }
    }

    /// The burn device, or an error naming the cargo feature this binary lacks.
    pub fn device(&self) -> Result<Device, DeviceError> {
        match *self {
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "vulkan")]
            Self::Vulkan(i) => Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(i))),
            #[cfg(not(feature = "vulkan"))]
            Self::Vulkan(_) => Err(DeviceError::NotBuilt {
                backend: "Vulkan",
                feature: "vulkan",
            }),
            #[cfg(feature = "cuda")]
            Self::Cuda(i) => Ok(Device::cuda(i)),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(DeviceError::NotBuilt {
                backend: "CUDA",
                feature: "cuda",
            }),
        }
    }
}
