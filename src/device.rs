//! Choosing the compute device at run time: `cpu`, `vulkan:N`, `vulkan:cpu`, `wgpu:N`,
//! `wgpu:cpu` or `cuda:N`, and `vulkan:auto` / `wgpu:auto` (the GPU of the local rank).

use std::str::FromStr;

use burn::tensor::Device;

use crate::nn::precision::Precision;

/// Which adapter of a wgpu-based backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapter {
    /// The N-th discrete GPU. Discrete only, so that a machine with a GPU never lands on a
    /// software driver by accident.
    Discrete(usize),
    /// The discrete GPU of this process's local rank in a data-parallel run (`train
    /// --distributed`: one process per GPU); the first one otherwise.
    Auto,
    /// A CPU adapter: a software driver such as Mesa's llvmpipe. Slow, but it runs the GPU
    /// code path on any machine, which is how CI tests it.
    Cpu,
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Discrete(i) => write!(f, "{i}"),
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
        }
    }
}

/// A device named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// burn's Flex backend (pure Rust, multi-threaded).
    Cpu,
    /// A Vulkan adapter (cargo feature `vulkan`): kernels compile to SPIR-V.
    Vulkan(Adapter),
    /// An adapter of whichever graphics API wgpu settles on (cargo feature `wgpu`): kernels
    /// compile to WGSL unless the binary also has `vulkan` and the adapter is a Vulkan one.
    Wgpu(Adapter),
    /// The N-th CUDA GPU (cargo feature `cuda`).
    Cuda(usize),
}

/// The forms a device spec takes, for error messages.
pub const EXPECTED: &str =
    "expected cpu, vulkan:N, vulkan:cpu, vulkan:auto, wgpu:N, wgpu:cpu, wgpu:auto or cuda:N";

/// Why a device could not be named or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("bad device index `{index}` in `{spec}`: {EXPECTED}")]
    BadIndex { spec: String, index: String },
    #[error("unknown device `{spec}`: {EXPECTED}")]
    Unknown { spec: String },
    #[error("`{spec}`: CUDA has no CPU adapter; {EXPECTED}")]
    NoCpuAdapter { spec: String },
    /// A device named by a configuration key; the cause follows in the chain.
    #[error("`{key}`")]
    Setting {
        key: &'static str,
        #[source]
        source: Box<DeviceError>,
    },
    #[error(
        "device `{spec}` needs the `{feature}` backend, which this binary was built without: \
         rebuild with `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        spec: DeviceSpec,
        feature: &'static str,
    },
    #[error("device {spec} computed a wrong result in a self-test")]
    WrongResult { spec: DeviceSpec },
    #[error("device {spec} is not available (no such GPU, or its driver or loader is missing)")]
    Unavailable { spec: DeviceSpec },
    #[error("device {spec} cannot compute in {precision} ({why}); it can in {can}")]
    UnsupportedPrecision {
        spec: DeviceSpec,
        precision: Precision,
        why: &'static str,
        /// The precisions it can compute in, f32 always among them.
        can: &'static str,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (s, None),
        };
        let adapter = || match index {
            None => Ok(Adapter::Discrete(0)),
            Some("cpu") => Ok(Adapter::Cpu),
            Some("auto") => Ok(Adapter::Auto),
            Some(i) => {
                i.parse::<usize>()
                    .map(Adapter::Discrete)
                    .map_err(|_| DeviceError::BadIndex {
                        spec: s.to_string(),
                        index: i.to_string(),
                    })
            }
        };
        match kind {
            "cpu" | "flex" if index.is_none() => Ok(Self::Cpu),
            "vulkan" => adapter().map(Self::Vulkan),
            "wgpu" => adapter().map(Self::Wgpu),
            "cuda" => match adapter()? {
                Adapter::Discrete(i) => Ok(Self::Cuda(i)),
                // `auto` is for the wgpu-based backends only, for now.
                Adapter::Auto => Err(DeviceError::BadIndex {
                    spec: s.to_string(),
                    index: "auto".into(),
                }),
                Adapter::Cpu => Err(DeviceError::NoCpuAdapter {
                    spec: s.to_string(),
                }),
            },
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
            Self::Vulkan(a) => write!(f, "vulkan:{a}"),
            Self::Wgpu(a) => write!(f, "wgpu:{a}"),
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
    /// Refuses a reduced precision that the opened `device` cannot compute in, before any
    /// kernel meets it: cubecl's WGSL compiler, for one, panics on bf16 inside a server
    /// thread. The CPU converts every type, so it is never refused.
    pub fn check_precision(
        &self,
        device: &Device,
        precision: Precision,
    ) -> Result<(), DeviceError> {
        if precision == Precision::F32 || self.is_flex() || device.supports_dtype(precision.dtype())
        {
            return Ok(());
        }
        // A `vulkan` build compiles SPIR-V for `wgpu:*` on Vulkan adapters too.
        let wgsl = matches!(self, Self::Wgpu(_)) && !cfg!(feature = "vulkan");
        let f16 = precision == Precision::Bf16 && device.supports_dtype(Precision::F16.dtype());
        Err(DeviceError::UnsupportedPrecision {
            spec: *self,
            precision,
            why: if wgsl && precision == Precision::Bf16 {
                "WGSL has no bf16"
            } else {
                "its driver or shader language lacks the type"
            },
            can: if f16 { "f32 and f16" } else { "f32" },
        })
    }

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

    /// The spec a data-parallel process with this local rank opens: `vulkan:auto` and
    /// `wgpu:auto` become the GPU of that index; every other spec stays as it is (CPU
    /// processes share the machine).
    pub fn for_local_rank(self, local_rank: usize) -> Self {
        match self {
            Self::Vulkan(Adapter::Auto) => Self::Vulkan(Adapter::Discrete(local_rank)),
            Self::Wgpu(Adapter::Auto) => Self::Wgpu(Adapter::Discrete(local_rank)),
            other => other,
        }
    }

    /// Whether kernels run on burn's CPU backend, where every result is the one `verify
    /// reference`'s exact-parity tolerances were set on. Every other device (llvmpipe
    /// included) sums in other orders.
    pub fn is_flex(&self) -> bool {
        matches!(self, Self::Cpu)
    }

    /// The cargo feature this spec needs, if any.
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            Self::Cpu => None,
            Self::Vulkan(_) => Some("vulkan"),
            Self::Wgpu(_) => Some("wgpu"),
            Self::Cuda(_) => Some("cuda"),
        }
    }

    /// The burn device, or an error naming the spec and the cargo feature this binary lacks.
    pub fn device(&self) -> Result<Device, DeviceError> {
        match *self {
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "vulkan")]
            Self::Vulkan(a) => Ok(Device::vulkan(kind(a))),
            #[cfg(feature = "wgpu")]
            Self::Wgpu(a) => Ok(Device::wgpu(kind(a))),
            #[cfg(feature = "cuda")]
            Self::Cuda(i) => Ok(Device::cuda(i)),
            #[allow(unreachable_patterns)]
            _ => Err(DeviceError::NotBuilt {
                spec: *self,
                feature: self.feature().unwrap_or("?"),
            }),
        }
    }
}

#[cfg(feature = "wgpu")]
fn kind(adapter: Adapter) -> burn::tensor::DeviceKind {
    match adapter {
        Adapter::Discrete(i) => burn::tensor::DeviceKind::DiscreteGpu(i),
        Adapter::Auto => burn::tensor::DeviceKind::DiscreteGpu(0),
        Adapter::Cpu => burn::tensor::DeviceKind::Cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("vulkan:1", DeviceSpec::Vulkan(Adapter::Discrete(1))),
            ("vulkan:cpu", DeviceSpec::Vulkan(Adapter::Cpu)),
            ("wgpu:0", DeviceSpec::Wgpu(Adapter::Discrete(0))),
            ("wgpu:cpu", DeviceSpec::Wgpu(Adapter::Cpu)),
            ("vulkan:auto", DeviceSpec::Vulkan(Adapter::Auto)),
            ("cuda:2", DeviceSpec::Cuda(2)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec));
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("flex".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!(
            "wgpu".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Wgpu(Adapter::Discrete(0)))
        );
        assert!(matches!(
            "cuda:cpu".parse::<DeviceSpec>(),
            Err(DeviceError::NoCpuAdapter { .. })
        ));
        assert!(matches!(
            "wgpu:x".parse::<DeviceSpec>(),
            Err(DeviceError::BadIndex { .. })
        ));
        for bad in ["cpu:0", "metal:0"] {
            assert!(matches!(
                bad.parse::<DeviceSpec>(),
                Err(DeviceError::Unknown { .. })
            ));
        }
        for bad in ["cuda:cpu", "cpu:0", "wgpu:x", "metal:0", "vulkan:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("wgpu:cpu"), "{err}");
        }
    }

    #[test]
    fn auto_picks_the_gpu_of_the_local_rank() {
        let auto: DeviceSpec = "vulkan:auto".parse().unwrap();
        assert_eq!(
            auto.for_local_rank(3),
            DeviceSpec::Vulkan(Adapter::Discrete(3))
        );
        assert_eq!(
            DeviceSpec::Wgpu(Adapter::Auto).for_local_rank(1),
            DeviceSpec::Wgpu(Adapter::Discrete(1))
        );
        assert_eq!(DeviceSpec::Cpu.for_local_rank(2), DeviceSpec::Cpu);
        assert_eq!(
            DeviceSpec::Vulkan(Adapter::Discrete(0)).for_local_rank(2),
            DeviceSpec::Vulkan(Adapter::Discrete(0))
        );
    }

    #[test]
    fn a_backend_left_out_is_named_with_its_feature() {
        for (spec, feature, built) in [
            (
                DeviceSpec::Wgpu(Adapter::Cpu),
                "wgpu",
                cfg!(feature = "wgpu"),
            ),
            (
                DeviceSpec::Vulkan(Adapter::Cpu),
                "vulkan",
                cfg!(feature = "vulkan"),
            ),
            (DeviceSpec::Cuda(0), "cuda", cfg!(feature = "cuda")),
        ] {
            if built {
                continue;
            }
            let err = spec.device().unwrap_err();
            assert!(matches!(err, DeviceError::NotBuilt { .. }));
            let err = err.to_string();
            assert!(
                err.contains(&spec.to_string()) && err.contains(&format!("--features {feature}")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_cpu_takes_every_precision() {
        let device = Device::flex();
        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
            DeviceSpec::Cpu.check_precision(&device, p).unwrap();
        }
    }

    /// WGSL has no bf16: cubecl's compiler panicked on it in a server thread, mid-run.
    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a Vulkan driver with a CPU adapter (Mesa's llvmpipe; CI installs it)"]
    fn wgpu_refuses_bf16_before_any_kernel() {
        let spec = DeviceSpec::Wgpu(Adapter::Cpu);
        let device = spec.open().expect("wgpu:cpu (llvmpipe)");
        spec.check_precision(&device, Precision::F32).unwrap();
        let err = spec
            .check_precision(&device, Precision::Bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wgpu:cpu")
                && err.contains("bf16")
                && (err.contains("WGSL") || cfg!(feature = "vulkan"))
                && err.contains("it can in f32"),
            "{err}"
        );
    }
}
