//! Named tensors in PyTorch's naming and layout.
//!
//! A [`StateDict`] holds host-side tensors under their PyTorch state-dict names. Modules say
//! which of their parameters carries which PyTorch name through [`TorchNamed`]; the loader and
//! the exporter here are the only places where a layout differs between the two worlds (burn
//! stores a Linear weight as `[in, out]`, PyTorch as `[out, in]`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::host::{ByteOrder, decode, safetensors_dtype};

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
    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_safetensors_bytes(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))
    }

    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        use safetensors::SafeTensors;
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = safetensors_dtype(view.dtype())
                .and_then(|dtype| decode(dtype, view.data(), ByteOrder::Little))
                .with_context(|| format!("tensor `{name}`"))?;
            let shape = view.shape().to_vec();
            if shape.iter().product::<usize>() != data.len() {
                bail!("tensor `{name}` has a shape that does not match its data");
            }
            tensors.insert(name, HostTensor::new(shape, data));
        }
        Ok(Self { tensors, metadata })
    }

    /// Writes every tensor as float32 to a safetensors file.
    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        self.write_safetensors_as(path, StoredDtype::F32)
    }

    /// Writes every tensor to a safetensors file in `dtype` (f16 rounds to nearest even).
    pub fn write_safetensors_as(&self, path: &Path, dtype: StoredDtype) -> Result<()> {
        let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
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
                (k.clone(), t.shape.clone(), bytes)
            })
            .collect();
        let st_dtype = match dtype {
            StoredDtype::F32 => safetensors::Dtype::F32,
            StoredDtype::F16 => safetensors::Dtype::F16,
        };
        let views = bufs
            .iter()
            .map(|(k, shape, bytes)| {
                safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = if self.metadata.is_empty() {
            None
        } else {
            Some(self.metadata.clone())
        };
        safetensors::serialize_to_file(views, meta, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
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

struct Loader<'a> {
    values: HashMap<ParamId, (String, HostTensor)>,
    device: &'a Device,
    errors: Vec<String>,
}

impl ModuleMapper for Loader<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((name, host)) = self.values.remove(&param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let expected = tensor.dims().to_vec();
        if expected != host.shape {
            self.errors.push(format!(
                "`{name}`: expected shape {:?} (burn layout), found {:?}",
                expected, host.shape
            ));
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
) -> Result<M> {
    let names = module.torch_param_list("");
    let mut values = HashMap::new();
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for p in &names {
        let key = format!("{prefix}{}", p.name);
        match dict.get(&key) {
            Some(t) => {
                values.insert(p.id, (key.clone(), to_burn_layout(t, p.layout)));
                used.insert(key);
            }
            None => missing.push(key),
        }
    }
    let unexpected: Vec<&String> = dict
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix) && !used.contains(*k))
        .collect();
    let mut loader = Loader {
        values,
        device,
        errors: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut problems = loader.errors;
    if !loader.values.is_empty() {
        problems.extend(
            loader
                .values
                .values()
                .map(|(n, _)| format!("`{n}`: the module has no such parameter")),
        );
    }
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected tensors: {}",
            unexpected
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !problems.is_empty() {
        bail!("cannot load weights:\n  {}", problems.join("\n  "));
    }
    Ok(module)
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
mod tests {
    use super::*;
    use crate::method::embedder::{EmbeddingHead, EmbeddingHeadConfig};
    use burn::nn::LinearConfig;

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// `[N, in]` rows through a Linear.
    fn apply(linear: &Linear, rows: Vec<f32>, d_in: usize, device: &Device) -> Vec<f32> {
        let n = rows.len() / d_in;
        host(linear.forward(Tensor::<2>::from_data(
            TensorData::new(rows, [n, d_in]),
            device,
        )))
    }

    /// A head (BatchNorm1d + Linear) with non-default buffers, so that every kind of tensor
    /// has a value of its own.
    fn trained_head(device: &Device) -> EmbeddingHead {
        let train = device.clone().autodiff();
        let head = EmbeddingHeadConfig::new(4, 3).init(&train);
        let x = Tensor::<2>::from_data(
            TensorData::new((0..12).map(|k| (k * k % 7) as f32).collect(), [3, 4]),
            &train,
        );
        let _ = head.forward(x);
        let dict = export_torch(&head, "");
        load_torch(
            EmbeddingHeadConfig::new(4, 3).init(device),
            &dict,
            "",
            device,
        )
        .unwrap()
    }

    #[test]
    fn export_then_load_into_a_fresh_module_gives_equal_tensors() {
        let device = Device::flex();
        let head = trained_head(&device);
        let dict = export_torch(&head, "fc");
        let keys: Vec<&str> = dict.tensors.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "fc.0.bias",
                "fc.0.num_batches_tracked",
                "fc.0.running_mean",
                "fc.0.running_var",
                "fc.0.weight",
                "fc.1.bias",
                "fc.1.weight",
            ]
        );
        assert_eq!(dict.get("fc.0.num_batches_tracked").unwrap().data, [1.0]);
        assert!(
            dict.get("fc.0.num_batches_tracked")
                .unwrap()
                .shape
                .is_empty()
        );

        let fresh = EmbeddingHeadConfig::new(4, 3).init(&device);
        assert_ne!(
            host(fresh.linear.weight.val()),
            host(head.linear.weight.val())
        );
        let loaded = load_torch(fresh, &dict, "fc.", &device).unwrap();
        let again = export_torch(&loaded, "fc");
        assert_eq!(again.tensors, dict.tensors);
        assert_eq!(
            host(loaded.linear.weight.val()),
            host(head.linear.weight.val())
        );
        assert_eq!(
            host(loaded.norm.running_var.value()),
            host(head.norm.running_var.value())
        );
    }

    #[test]
    fn a_linear_weight_is_transposed_exactly_once() {
        let device = Device::flex();
        // PyTorch: weight [out = 2, in = 3], y = x W^T + b.
        let torch_weight = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut dict = StateDict::default();
        dict.insert("weight", HostTensor::new(vec![2, 3], torch_weight.clone()));
        dict.insert("bias", HostTensor::new(vec![2], vec![0.5, -0.5]));
        let linear = load_torch(LinearConfig::new(3, 2).init(&device), &dict, "", &device).unwrap();
        assert_eq!(linear.weight.val().dims(), [3, 2]);
        // x = e_0 picks column 0 of W: [W[0][0], W[1][0]] + b; x = e_2 column 2.
        let y = apply(&linear, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 3, &device);
        assert_eq!(y, [1.5, 3.5, 3.5, 5.5]);
        // Exported back in PyTorch's layout, unchanged.
        let out = export_torch(&linear, "");
        assert_eq!(out.get("weight").unwrap().shape, [2, 3]);
        assert_eq!(out.get("weight").unwrap().data, torch_weight);
        // A weight given in burn's layout does not fit.
        dict.insert("weight", HostTensor::new(vec![3, 2], torch_weight));
        let err = format!(
            "{:#}",
            load_torch(LinearConfig::new(3, 2).init(&device), &dict, "", &device).unwrap_err()
        );
        assert!(err.contains("`weight`"), "{err}");
    }

    #[test]
    fn missing_and_unexpected_keys_are_errors_that_name_them() {
        let device = Device::flex();
        let mut dict = export_torch(&trained_head(&device), "m");
        let load = |dict: &StateDict| {
            load_torch(
                EmbeddingHeadConfig::new(4, 3).init(&device),
                dict,
                "m.",
                &device,
            )
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
        };
        // Tensors outside the prefix are not this module's business.
        dict.insert("other.thing", HostTensor::new(vec![1], vec![0.0]));
        load(&dict).unwrap();

        let mut missing = dict.clone();
        missing.tensors.remove("m.1.bias");
        let err = load(&missing).unwrap_err();
        assert!(err.contains("missing tensors: m.1.bias"), "{err}");

        let mut extra = dict.clone();
        extra.insert("m.1.scale", HostTensor::new(vec![3], vec![1.0; 3]));
        let err = load(&extra).unwrap_err();
        assert!(err.contains("unexpected tensors: m.1.scale"), "{err}");
        assert!(!err.contains("other.thing"), "{err}");
    }

    #[test]
    fn safetensors_round_trip_in_f32_and_f16() {
        let dir = tempfile::tempdir().unwrap();
        let mut dict = StateDict::default();
        dict.insert(
            "a.weight",
            HostTensor::new(vec![2, 3], vec![1.0, -2.5, 0.125, 3.0, 1e-3, -7.0]),
        );
        dict.insert("a.count", HostTensor::new(vec![], vec![42.0]));
        dict.insert("b", HostTensor::new(vec![1], vec![0.1]));
        dict.metadata.insert("format".into(), "pt".into());

        let path = dir.path().join("x.safetensors");
        dict.write_safetensors(&path).unwrap();
        let back = StateDict::read_safetensors(&path).unwrap();
        assert_eq!(back.metadata, dict.metadata);
        assert_eq!(back.tensors.len(), 3);
        for (name, t) in &dict.tensors {
            let b = &back.tensors[name];
            assert_eq!(b.shape, t.shape, "{name}");
            let want: Vec<f64> = t.data.iter().map(|&v| v as f32 as f64).collect();
            assert_eq!(b.data, want, "{name}");
        }

        let half_path = dir.path().join("h.safetensors");
        dict.write_safetensors_as(&half_path, StoredDtype::F16)
            .unwrap();
        let back = StateDict::read_safetensors(&half_path).unwrap();
        for (name, t) in &dict.tensors {
            let want: Vec<f64> = t
                .data
                .iter()
                .map(|&v| half::f16::from_f64(v).to_f64())
                .collect();
            assert_eq!(back.tensors[name].data, want, "{name}");
        }
        // 0.1 is not an f16 value: the file really holds half precision.
        assert_ne!(back.tensors["b"].data[0], 0.1f32 as f64);
    }
}
