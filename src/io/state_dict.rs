//! Named tensors in PyTorch's naming and layout.
//!
//! A [`StateDict`] holds host-side tensors under their PyTorch state-dict names. Modules say
//! which of their parameters carries which PyTorch name through [`TorchNamed`]; the loader and
//! the exporter here are the only places where a layout differs between the two worlds (burn
//! stores a Linear weight as `[in, out]`, PyTorch as `[out, in]`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::WeightsError;
use super::error::ShapeMismatch;
use super::host::{ByteOrder, decode, safetensors_dtype};
use crate::error::Cause;

pub use super::host::HostTensor;

/// A set of named host tensors, the in-memory form of a safetensors file or a state dict.
#[derive(Clone, Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, HostTensor>,
    /// The `__metadata__` block of a safetensors file.
    pub metadata: HashMap<String, String>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Reads a safetensors file; every float and integer dtype is widened to f64.
    pub fn read_safetensors(path: &Path) -> Result<Self, WeightsError> {
        let bytes = super::regular::read(path).map_err(|source| WeightsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes).map_err(|e| WeightsError::NotSafetensors {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self, WeightsError> {
        use safetensors::SafeTensors;
        let container = |e: safetensors::SafeTensorError| WeightsError::Safetensors(Cause::of(&e));
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(container)?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(container)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = safetensors_dtype(view.dtype())
                .and_then(|dtype| decode(dtype, view.data(), ByteOrder::Little))
                .map_err(|e| WeightsError::Tensor {
                    tensor: name.clone(),
                    source: Box::new(e),
                })?;
            let shape = view.shape().to_vec();
            if shape.iter().product::<usize>() != data.len() {
                return Err(WeightsError::ShapeData { tensor: name });
            }
            tensors.insert(name, HostTensor::new(shape, data));
        }
        Ok(Self { tensors, metadata })
    }

    /// Writes every tensor as float32 to a safetensors file.
    pub fn write_safetensors(&self, path: &Path) -> Result<(), WeightsError> {
        self.write_safetensors_as(path, StoredDtype::F32)
    }

    /// Writes every tensor to a safetensors file in `dtype` (f16 rounds to nearest even).
    pub fn write_safetensors_as(
        &self,
        path: &Path,
        dtype: StoredDtype,
    ) -> Result<(), WeightsError> {
        self.write_named(path, path, dtype)
    }

    /// As [`Self::write_safetensors_as`], through a temporary file beside `path` renamed over
    /// it once complete and flushed: a failure (a full disk, a value out of range) leaves
    /// `path` as it was, even when `path` is the file the weights were read from.
    pub fn replace_safetensors_as(
        &self,
        path: &Path,
        dtype: StoredDtype,
    ) -> Result<(), WeightsError> {
        let tmp = super::atomic::temporary_path(path);
        if let Err(e) = self.write_named(path, &tmp, dtype) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        super::atomic::finish_atomic(&tmp, path).map_err(|e| match e {
            super::IoError::NoSpace { .. } => WeightsError::NoSpace {
                path: path.to_path_buf(),
            },
            e => WeightsError::Write {
                path: path.to_path_buf(),
                source: Cause(crate::error::chain(&e)),
            },
        })
    }

    /// Writes to `to`; errors name `path`, the file the user asked for.
    fn write_named(&self, path: &Path, to: &Path, dtype: StoredDtype) -> Result<(), WeightsError> {
        let write = |e: safetensors::SafeTensorError| match e {
            safetensors::SafeTensorError::IoError(e)
                if e.kind() == std::io::ErrorKind::StorageFull =>
            {
                WeightsError::NoSpace {
                    path: path.to_path_buf(),
                }
            }
            e => WeightsError::Write {
                path: path.to_path_buf(),
                source: Cause::of(&e),
            },
        };
        let (largest, name) = match dtype {
            StoredDtype::F32 => (f32::MAX as f64, "float32"),
            StoredDtype::F16 => (half::f16::MAX.to_f64(), "float16"),
        };
        for (k, t) in &self.tensors {
            if is_counter(k, t) {
                continue;
            }
            // Past the largest finite value a conversion silently gives infinity.
            if let Some(&value) = t.data.iter().find(|v| v.is_finite() && v.abs() > largest) {
                return Err(WeightsError::OutOfRange {
                    path: path.to_path_buf(),
                    tensor: k.clone(),
                    value,
                    dtype: name,
                });
            }
        }
        let st_dtype = match dtype {
            StoredDtype::F32 => safetensors::Dtype::F32,
            StoredDtype::F16 => safetensors::Dtype::F16,
        };
        let bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                if is_counter(k, t) {
                    let bytes = t.data.iter().flat_map(|&v| (v as i64).to_le_bytes());
                    return (
                        k.clone(),
                        safetensors::Dtype::I64,
                        t.shape.clone(),
                        bytes.collect(),
                    );
                }
                let bytes = match dtype {
                    StoredDtype::F32 => t
                        .data
                        .iter()
                        .flat_map(|&v| (v as f32).to_le_bytes())
                        .collect::<Vec<u8>>(),
                    StoredDtype::F16 => t
                        .data
                        .iter()
                        .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
                        .collect::<Vec<u8>>(),
                };
                (k.clone(), st_dtype, t.shape.clone(), bytes)
            })
            .collect();
        let views = bufs
            .iter()
            .map(|(k, st_dtype, shape, bytes)| {
                safetensors::tensor::TensorView::new(*st_dtype, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(write)?;
        let meta = if self.metadata.is_empty() {
            None
        } else {
            Some(self.metadata.clone())
        };
        safetensors::serialize_to_file(views, meta, to).map_err(write)?;
        Ok(())
    }
}

/// PyTorch's BatchNorm counter, `num_batches_tracked`, holding whole numbers: written as int64,
/// PyTorch's own type for it, whatever the floats are written as, so that its count stays
/// exact (f16 would overflow after 65,504 batches, f32 round after 2^24).
fn is_counter(name: &str, t: &HostTensor) -> bool {
    (name == "num_batches_tracked" || name.ends_with(".num_batches_tracked"))
        && t.data.iter().all(|v| v.fract() == 0.0 && v.abs() < 9.2e18)
}

/// The element type a safetensors file is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredDtype {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
}

crate::string_forms_from_value_enum!(StoredDtype: "dtype");

/// How a parameter's PyTorch tensor relates to burn's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same shape and order.
    Plain,
    /// A Linear weight: PyTorch `[out, in]`, burn `[in, out]`.
    LinearWeight,
    /// A scalar counter (PyTorch's `num_batches_tracked`), kept by us as a `[1]` float.
    Counter,
}

/// One parameter or buffer and its PyTorch name.
#[derive(Clone, Debug)]
pub struct TorchParam {
    pub name: String,
    pub id: ParamId,
    pub layout: Layout,
}

/// Modules that know the PyTorch names of their parameters.
pub trait TorchNamed {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>);

    fn torch_param_list(&self, prefix: &str) -> Vec<TorchParam> {
        let mut out = Vec::new();
        self.torch_names(prefix, &mut out);
        out
    }
}

/// `prefix.name`, or `name` when the prefix is empty.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

pub fn push<const D: usize>(
    out: &mut Vec<TorchParam>,
    prefix: &str,
    name: &str,
    param: &Param<Tensor<D>>,
    layout: Layout,
) {
    out.push(TorchParam {
        name: join(prefix, name),
        id: param.id,
        layout,
    });
}

impl TorchNamed for Linear {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        push(out, prefix, "weight", &self.weight, Layout::LinearWeight);
        if let Some(bias) = &self.bias {
            push(out, prefix, "bias", bias, Layout::Plain);
        }
    }
}

impl TorchNamed for Conv2d {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        // Same `[out, in / groups, kh, kw]` layout in both worlds.
        push(out, prefix, "weight", &self.weight, Layout::Plain);
        if let Some(bias) = &self.bias {
            push(out, prefix, "bias", bias, Layout::Plain);
        }
    }
}

impl TorchNamed for LayerNorm {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        push(out, prefix, "weight", &self.gamma, Layout::Plain);
        if let Some(beta) = &self.beta {
            push(out, prefix, "bias", beta, Layout::Plain);
        }
    }
}

impl<T: TorchNamed> TorchNamed for Vec<T> {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        for (i, m) in self.iter().enumerate() {
            m.torch_names(&join(prefix, &i.to_string()), out);
        }
    }
}

/// Converts a PyTorch-layout tensor to burn's layout for a parameter of `layout`.
fn to_burn_layout(t: &HostTensor, layout: Layout) -> HostTensor {
    match layout {
        Layout::Plain => t.clone(),
        Layout::LinearWeight => t.transposed(),
        Layout::Counter => HostTensor::new(vec![1], t.data.clone()),
    }
}

fn to_torch_layout(t: &HostTensor, layout: Layout) -> HostTensor {
    match layout {
        Layout::Plain => t.clone(),
        Layout::LinearWeight => t.transposed(),
        Layout::Counter => HostTensor::new(vec![], t.data.clone()),
    }
}

/// A tensor on its way into a parameter: its name, its value in burn's layout, and the
/// layout, which turns burn's expected shape back into PyTorch's for error messages.
struct Pending {
    name: String,
    value: HostTensor,
    layout: Layout,
}

struct Loader<'a> {
    values: HashMap<ParamId, Pending>,
    device: &'a Device,
    shapes: Vec<ShapeMismatch>,
}

/// A burn parameter shape in PyTorch's layout.
fn torch_shape(burn: &[usize], layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Plain => burn.to_vec(),
        Layout::LinearWeight => burn.iter().rev().copied().collect(),
        Layout::Counter => Vec::new(),
    }
}

impl ModuleMapper for Loader<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(Pending {
            name,
            value: host,
            layout,
        }) = self.values.remove(&param.id)
        else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let expected = tensor.dims().to_vec();
        if expected != host.shape {
            self.shapes.push(ShapeMismatch {
                tensor: name,
                expected: torch_shape(&expected, layout),
                found: torch_shape(&host.shape, layout),
            });
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let data = TensorData::new(host.to_f32(), host.shape.clone());
        let mut loaded = Tensor::<D>::from_data(data, self.device);
        if require_grad {
            loaded = loaded.require_grad();
        }
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Loads every named parameter of `module` from `dict[prefix + name]`, strictly: a missing
/// tensor, a shape mismatch or a tensor under `prefix` that the module does not have is an
/// error listing all offending names.
pub fn load_torch<M: Module + TorchNamed>(
    module: M,
    dict: &StateDict,
    prefix: &str,
    device: &Device,
) -> Result<M, WeightsError> {
    let names = module.torch_param_list("");
    let mut values = HashMap::new();
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for p in &names {
        let key = format!("{prefix}{}", p.name);
        match dict.get(&key) {
            Some(t) => {
                values.insert(
                    p.id,
                    Pending {
                        name: key.clone(),
                        value: to_burn_layout(t, p.layout),
                        layout: p.layout,
                    },
                );
                used.insert(key);
            }
            None => missing.push(key),
        }
    }
    let unexpected: Vec<String> = dict
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix) && !used.contains(*k))
        .cloned()
        .collect();
    let mut loader = Loader {
        values,
        device,
        shapes: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut unused: Vec<String> = loader.values.into_values().map(|p| p.name).collect();
    unused.sort();
    if missing.is_empty() && unexpected.is_empty() && loader.shapes.is_empty() && unused.is_empty()
    {
        return Ok(module);
    }
    Err(WeightsError::Mismatch {
        missing,
        unexpected,
        shapes: loader.shapes,
        unused,
    })
}

struct Collector<'a> {
    wanted: &'a HashMap<ParamId, usize>,
    grads: Option<&'a Gradients>,
    found: HashMap<ParamId, HostTensor>,
}

impl ModuleVisitor for Collector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.wanted.contains_key(&param.id) {
            return;
        }
        let value = match self.grads {
            None => Some(param.val()),
            Some(grads) => param.val().grad(grads),
        };
        if let Some(t) = value {
            self.found.insert(param.id, HostTensor::from_tensor(t));
        }
    }
}

fn collect<M: Module + TorchNamed>(
    module: &M,
    prefix: &str,
    grads: Option<&Gradients>,
) -> StateDict {
    let names = module.torch_param_list(prefix);
    let wanted: HashMap<ParamId, usize> =
        names.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
    let mut collector = Collector {
        wanted: &wanted,
        grads,
        found: HashMap::new(),
    };
    module.visit(&mut collector);
    let mut dict = StateDict::default();
    for p in &names {
        if let Some(t) = collector.found.get(&p.id) {
            dict.insert(p.name.clone(), to_torch_layout(t, p.layout));
        }
    }
    dict
}

/// Every parameter and buffer of `module` under its PyTorch name, in PyTorch layout.
pub fn export_torch<M: Module + TorchNamed>(module: &M, prefix: &str) -> StateDict {
    collect(module, prefix, None)
}

/// The gradient of every parameter that has one in `grads`, under its PyTorch name.
pub fn export_grads<M: Module + TorchNamed>(
    module: &M,
    prefix: &str,
    grads: &Gradients,
) -> StateDict {
    collect(module, prefix, Some(grads))
}

#[cfg(test)]
mod tests;
