//! Checking this implementation against a dump of the authors' release
//! (`../shared/fixtures/reference/README.md` describes the format).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};

use crate::io::WeightsError;
use crate::io::state_dict::{
    HostTensor, Layout, StateDict, TorchNamed, export_grads, export_torch, load_torch,
};
use crate::method::graph::CorrelationGraph;
use crate::method::losses::{diversity_loss, npair_loss, synthetic_npair_loss};
use crate::method::model::GcaHng;
use crate::method::synthesis::{ReplayMix, draws_per_call, hardness, synthesize};
use crate::nn::adamw::TorchAdamW;
use crate::train::step::{
    Batch, LearningRates, LossHistory, StepInputs, Trainer, WeightDecays, logsumexp_rows,
};

/// A dump that cannot be replayed. Errors from inside the replay come wrapped in
/// [`ReferenceError::InDump`], which names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{}", path.display())]
    InDump {
        path: PathBuf,
        #[source]
        source: Box<ReferenceError>,
    },
    #[error("{} has no `meta` entry in its safetensors metadata", path.display())]
    NoMeta { path: PathBuf },
    #[error("the `meta` entry of {} is not valid", path.display())]
    BadMeta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the dump has no tensor `{tensor}`")]
    NoTensor { tensor: String },
    #[error("`{tensor}` has shape {shape:?}; expected [N, C, H, W]")]
    NotImages { tensor: String, shape: Vec<usize> },
    #[error("`{tensor}` holds label {value}, outside 0..{classes}")]
    Label {
        tensor: String,
        value: f64,
        classes: usize,
    },
    #[error("loading `init.*` from the dump")]
    Init(#[source] WeightsError),
    #[error("the dump's batch has {classes}x{per_class}; at least 2x2 is needed")]
    SmallBatch { classes: usize, per_class: usize },
    #[error("`{tensor}` holds too few draws for {needed_for}")]
    FewDraws {
        tensor: String,
        needed_for: &'static str,
    },
}

type Result<T, E = ReferenceError> = std::result::Result<T, E>;
use crate::verify::compare::{AdamWSlack, Report, Row, Tolerance, compare, compare_with_slack};
pub use crate::verify::dump::{DumpLr, DumpMeta, DumpStep, DumpWeightDecay};

/// Stage outputs and losses.
pub const STAGE: Tolerance = Tolerance::Relative(1e-4);
/// Gradients.
pub const GRADIENT: Tolerance = Tolerance::Gradient {
    factor: 1e-3,
    absolute: 1e-5,
};
/// Parameters after a step.
pub const PARAMETER: Tolerance = Tolerance::Absolute(5e-5);
/// The relative rounding noise of a gradient under the GPU rule: the gradient tolerance's
/// factor, since a gradient element within it of zero may have either sign and still pass.
pub const GRADIENT_NOISE: f64 = 1e-3;

/// How parameters after AdamW steps are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParameterRule {
    /// Every element at [`PARAMETER`]: the CPU (Flex), where the tolerances were set.
    Exact,
    /// Every element at [`PARAMETER`], except those whose update rounding decides, which get
    /// the slack of [`AdamWSlack`]; probe gradients at [`GPU_GRADIENT`] and running statistics
    /// at [`GPU_BUFFER`]: any other device, which sums in other orders. Forward stages and
    /// losses keep their tolerances.
    Determined,
}

/// Gradients under the GPU rule: another device's reductions sum the contributions of the
/// 6,561 edges in another order, and a gradient with cancellation shows it beyond the CPU's
/// 1e-3 (2.1e-3 of its largest element at worst on llvmpipe and on the H200).
pub const GPU_GRADIENT: Tolerance = Tolerance::Gradient {
    factor: 5e-3,
    absolute: 1e-5,
};
/// BatchNorm running statistics after a step under the GPU rule: they are batch statistics of
/// features computed from parameters that the rule lets differ by whole AdamW updates, so they
/// are held to the gradient tolerance's relative bound rather than the parameters' absolute one.
pub const GPU_BUFFER: Tolerance = Tolerance::Gradient {
    factor: 1e-3,
    absolute: 1e-5,
};

impl ParameterRule {
    /// The tolerance of the probe gradients.
    pub fn gradient(self) -> Tolerance {
        match self {
            Self::Exact => GRADIENT,
            Self::Determined => GPU_GRADIENT,
        }
    }

    /// The tolerance of BatchNorm running statistics after a step.
    pub fn running_statistics(self) -> Tolerance {
        match self {
            Self::Exact => PARAMETER,
            Self::Determined => GPU_BUFFER,
        }
    }

    /// The rule for a device: exact on the CPU, [`Determined`](Self::Determined) elsewhere.
    pub fn for_device(spec: &crate::device::DeviceSpec) -> Self {
        if spec.is_flex() {
            Self::Exact
        } else {
            Self::Determined
        }
    }
}

/// A dump with the bookkeeping of which tensors were used.
struct Dump {
    dict: StateDict,
    used: BTreeSet<String>,
    report: Report,
}

impl Dump {
    fn get(&mut self, name: &str) -> Result<&HostTensor> {
        self.used.insert(name.to_string());
        self.dict.get(name).ok_or_else(|| ReferenceError::NoTensor {
            tensor: name.to_string(),
        })
    }

    fn check(&mut self, name: &str, ours: HostTensor, tolerance: Tolerance) -> Result<()> {
        let reference = self.get(name)?.clone();
        let row = compare(name, &ours, &reference, tolerance);
        self.report.rows.push(row);
        Ok(())
    }

    fn images(&mut self, name: &str, device: &Device) -> Result<Tensor<4>> {
        let t = self.get(name)?.clone();
        if t.shape.len() != 4 {
            return Err(ReferenceError::NotImages {
                tensor: name.to_string(),
                shape: t.shape,
            });
        }
        Ok(t.to_tensor(device)?)
    }

    fn labels(&mut self, name: &str, classes: usize) -> Result<Vec<usize>> {
        let t = self.get(name)?.clone();
        t.data
            .iter()
            .map(|&v| {
                if v >= 0.0 && (v as usize) < classes && v.fract() == 0.0 {
                    Ok(v as usize)
                } else {
                    Err(ReferenceError::Label {
                        tensor: name.to_string(),
                        value: v,
                        classes,
                    })
                }
            })
            .collect()
    }

    fn draws(&mut self, name: &str) -> Result<Vec<f64>> {
        Ok(self.get(name)?.data.clone())
    }

    fn draw_row(&mut self, name: &str, mix: &ReplayMix) {
        let ok = mix.remaining() == 0;
        self.report.rows.push(Row {
            name: name.into(),
            max_abs: 0.0,
            relative: 0.0,
            tolerance: "all used".into(),
            ok,
            note: (!ok).then(|| format!("{} recorded draws left unused", mix.remaining())),
        });
    }
}

/// Reads the metadata of a dump.
pub fn read_meta(dict: &StateDict, path: &Path) -> Result<DumpMeta> {
    let raw = dict
        .metadata
        .get("meta")
        .ok_or_else(|| ReferenceError::NoMeta {
            path: path.to_path_buf(),
        })?;
    serde_json::from_str(raw).map_err(|source| ReferenceError::BadMeta {
        path: path.to_path_buf(),
        source,
    })
}

fn fresh_model(dump: &mut Dump, meta: &DumpMeta, device: &Device) -> Result<GcaHng> {
    let model = meta.model_config().init(device);
    let names: Vec<String> = dump
        .dict
        .tensors
        .keys()
        .filter(|k| k.starts_with("init."))
        .cloned()
        .collect();
    dump.used.extend(names);
    load_torch(model, &dump.dict, "init.", device).map_err(ReferenceError::Init)
}

/// Replays a dump and compares every stage, gradient, loss and parameter it records, with
/// the CPU's exact parameter rule.
pub fn verify_reference(path: &Path, device: &Device) -> Result<Report> {
    verify_reference_with(path, device, ParameterRule::Exact)
}

/// [`verify_reference`] with parameters after AdamW steps judged by `rule`.
pub fn verify_reference_with(path: &Path, device: &Device, rule: ParameterRule) -> Result<Report> {
    replay(path, device, rule).map_err(|e| match e {
        e @ (ReferenceError::Weights(_)
        | ReferenceError::NoMeta { .. }
        | ReferenceError::BadMeta { .. }) => e,
        e => ReferenceError::InDump {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    })
}

fn optimisers(trainer: &mut Trainer) -> [&mut TorchAdamW; 3] {
    let o = &mut trainer.optim;
    [&mut o.embedder, &mut o.gnn, &mut o.classifier]
}

fn replay(path: &Path, device: &Device, rule: ParameterRule) -> Result<Report> {
    let dict = StateDict::read_safetensors(path)?;
    let meta = read_meta(&dict, path)?;
    let layout = meta.layout();
    if layout.per_class < 2 || layout.classes < 2 {
        return Err(ReferenceError::SmallBatch {
            classes: layout.classes,
            per_class: layout.per_class,
        });
    }
    let device = device.clone().autodiff();
    let mut dump = Dump {
        dict,
        used: BTreeSet::new(),
        report: Report::default(),
    };
    let step_config = meta.step_config();

    // One forward pass in training mode on batch 0, from `init`.
    let model = fresh_model(&mut dump, &meta, &device)?;
    let x = dump.images("batch0.x", &device)?;
    let labels = dump.labels("batch0.label", meta.n_class)?;
    let z = model.embedder.forward(x);
    dump.check("fwd.embedding", HostTensor::from_tensor(z.clone()), STAGE)?;
    let j_npair = npair_loss(z.clone(), &labels, layout);
    dump.check(
        "fwd.j_npair",
        HostTensor::from_tensor(j_npair.clone()),
        STAGE,
    )?;
    let graph = CorrelationGraph::build(z.clone(), layout);
    dump.check(
        "fwd.graph.edge_attr",
        HostTensor::from_tensor(graph.edges.clone()),
        STAGE,
    )?;
    dump.check(
        "fwd.graph.nodes",
        HostTensor::from_tensor(graph.nodes.clone()),
        STAGE,
    )?;
    let edge_index = layout.edge_index();
    let index = HostTensor::new(
        vec![edge_index.len(), 2],
        edge_index
            .iter()
            .flat_map(|[a, b]| [*a as f64, *b as f64])
            .collect(),
    );
    dump.check("fwd.graph.edge_index", index, Tolerance::Exact)?;
    let out = model.gnn.forward(&graph);
    dump.check(
        "fwd.gnn.node_logits",
        HostTensor::from_tensor(out.node_logits.clone()),
        STAGE,
    )?;
    dump.check(
        "fwd.gnn.edge_coeff",
        HostTensor::from_tensor(out.edge_coeff.clone()),
        STAGE,
    )?;
    let mut mix = ReplayMix::new(dump.draws("fwd.gen.mix_draws")?);
    if mix.remaining() < draws_per_call(layout) {
        return Err(ReferenceError::FewDraws {
            tensor: "fwd.gen.mix_draws".into(),
            needed_for: "one synthesis",
        });
    }
    let lambda = hardness(meta.alpha, meta.j_avg);
    let syn = synthesize(z.clone(), out.edge_coeff.clone(), layout, lambda, &mut mix);
    dump.draw_row("fwd.gen.mix_draws", &mix);
    dump.check(
        "fwd.gen.negatives",
        HostTensor::from_tensor(syn.negatives.clone()),
        STAGE,
    )?;
    dump.check(
        "fwd.gen.all_negatives",
        HostTensor::from_tensor(syn.all_negatives()),
        STAGE,
    )?;
    let j_syn = synthetic_npair_loss(z.clone(), syn.negatives.clone(), layout);
    dump.check(
        "fwd.j_syn_npair",
        HostTensor::from_tensor(j_syn.clone()),
        STAGE,
    )?;
    let j_div = diversity_loss(out.edge_coeff.clone(), layout.nodes());
    dump.check(
        "fwd.j_div_raw",
        HostTensor::from_tensor(j_div.clone()),
        STAGE,
    )?;

    // Gradients of the README's probe scalar, with live coefficients.
    let probe = syn.negatives.square().sum().mul_scalar(1e-3)
        + logsumexp_rows(out.node_logits).mean()
        + j_div
        + j_syn
        + j_npair;
    let grads = probe.backward();
    let ours = export_grads(&model, "", &grads);
    let expected: Vec<String> = dump
        .dict
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("fwd.grad.").map(str::to_string))
        .collect();
    for name in &expected {
        let key = format!("fwd.grad.{name}");
        match ours.get(name) {
            Some(t) => dump.check(&key, t.clone(), rule.gradient())?,
            None => {
                dump.used.insert(key.clone());
                dump.report
                    .rows
                    .push(Row::failed(key, GRADIENT, "no gradient here"));
            }
        }
    }
    for name in ours.tensors.keys().filter(|n| !expected.contains(n)) {
        dump.report.rows.push(Row::failed(
            format!("fwd.grad.{name}"),
            GRADIENT,
            "gradient here, none in the dump",
        ));
    }
    drop(grads);

    // Full training steps from `init`.
    let mut model = fresh_model(&mut dump, &meta, &device)?;
    let mut trainer = Trainer::new(
        step_config,
        WeightDecays {
            metric: meta.weight_decay.metric,
            gnn: meta.weight_decay.gnn,
            classifier: meta.weight_decay.classifier,
        },
        layout,
    );
    if rule == ParameterRule::Determined {
        for optim in optimisers(&mut trainer) {
            optim.trace = Some(Vec::new());
        }
    }
    let names: HashMap<_, _> = model
        .torch_param_list("")
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    let mut slack: BTreeMap<String, AdamWSlack> = BTreeMap::new();
    let lr = LearningRates {
        backbone: meta.lr.backbone,
        head: meta.lr.fc,
        gnn: meta.lr.gnn,
        classifier: meta.lr.classifier,
        proxies: 0.0,
    };
    let history = LossHistory {
        metric: meta.j_avg,
        generator: meta.j_gen,
    };
    for (k, step) in meta.steps.iter().enumerate() {
        let images = dump.images(&format!("step{k}.x"), &device)?;
        let labels = dump.labels(&format!("step{k}.label"), meta.n_class)?;
        let draws_key = format!("step{k}.mix_draws");
        let mut mix = ReplayMix::new(dump.draws(&draws_key)?);
        if mix.remaining() < 2 * draws_per_call(layout) {
            return Err(ReferenceError::FewDraws {
                tensor: draws_key,
                needed_for: "the two syntheses of a step",
            });
        }
        let batch = Batch::new(images, labels);
        let (next, metrics) = trainer.step(model, &batch, StepInputs::new(lr, history), &mut mix);
        model = next;
        for optim in optimisers(&mut trainer) {
            for applied in optim.trace.iter_mut().flat_map(|t| t.drain(..)) {
                let Some(p) = names.get(&applied.id) else {
                    continue;
                };
                let grad = match p.layout {
                    Layout::LinearWeight => applied.grad.transposed(),
                    _ => applied.grad,
                };
                slack
                    .entry(p.name.clone())
                    .or_insert_with(|| AdamWSlack::new(grad.numel(), GRADIENT_NOISE))
                    .step(&grad.data, applied.lr);
            }
        }
        dump.draw_row(&draws_key, &mix);
        for (name, value) in metrics.named() {
            let key = format!("step{k}.metrics.{name}");
            match step.metrics.get(name) {
                Some(&reference) => dump.report.rows.push(compare(
                    &key,
                    &HostTensor::new(vec![], vec![value]),
                    &HostTensor::new(vec![], vec![reference]),
                    STAGE,
                )),
                None => dump.report.rows.push(Row::failed(
                    key,
                    STAGE,
                    "the dump does not record this loss",
                )),
            }
        }
        let params = export_torch(&model, "");
        let prefix = format!("step{k}.after.");
        let expected: Vec<String> = dump
            .dict
            .tensors
            .keys()
            .filter_map(|key| key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        for name in &expected {
            let key = format!("{prefix}{name}");
            let tolerance = if name.ends_with("num_batches_tracked") {
                Tolerance::Exact
            } else if name.ends_with("running_mean") || name.ends_with("running_var") {
                rule.running_statistics()
            } else {
                PARAMETER
            };
            match params.get(name) {
                Some(t) => match slack.get(name) {
                    Some(rule) => {
                        let reference = dump.get(&key)?.clone();
                        let row = compare_with_slack(&key, t, &reference, tolerance, rule.slack());
                        dump.report.rows.push(row);
                    }
                    None => dump.check(&key, t.clone(), tolerance)?,
                },
                None => {
                    dump.used.insert(key.clone());
                    dump.report.rows.push(Row::failed(
                        key,
                        tolerance,
                        "the model has no such parameter",
                    ));
                }
            }
        }
    }
    let unchecked: Vec<String> = dump
        .dict
        .tensors
        .keys()
        .filter(|k| !dump.used.contains(*k))
        .cloned()
        .collect();
    dump.report.unchecked = unchecked;
    Ok(dump.report)
}
