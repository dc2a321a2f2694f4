//! One GCA-HNG training step, exactly as released (METHOD.md section 7): the metric update of
//! embedder and GNN, the classifier update, and the generator update of the GNN.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Tensor, Tensor as T};
use serde::{Deserialize, Serialize};

use crate::backbones::Backbone;
use crate::method::graph::{BatchLayout, CorrelationGraph};
use crate::method::losses::{
    HardnessMasking, cross_entropy, diversity_loss, hardness_loss, npair_loss, synthetic_npair_loss,
};
use crate::method::model::GcaHng;
use crate::method::synthesis::{MixSource, hardness, synthesize};
use crate::nn::adamw::{AdamWSettings, TorchAdamW};
use crate::nn::precision::{LossScaler, Precision, scale_gradient};

/// The classifier's cross-entropy is scaled by this in the release.
const CLASSIFIER_LOSS_SCALE: f64 = 10.0;
/// J_div enters with this factor before `diversity_weight`.
const DIVERSITY_SCALE: f64 = 0.01;

/// Hyper-parameters of the loss and the update (METHOD.md sections 6, 7 and 9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepConfig {
    /// α of the hardness schedule `λ = exp(-α / J̄_m)` (the release's `alpha`).
    #[serde(alias = "alpha")]
    pub hardness_alpha: f64,
    /// β of J_syn's weight `1 - exp(-β / J̄_gen)` (the release's `beta`).
    #[serde(alias = "beta")]
    pub synthetic_beta: f64,
    /// Weight of J_cls in J_gen (the release's `softmax_factor`).
    #[serde(alias = "softmax_factor")]
    pub classification_weight: f64,
    /// Weight of J_div in J_gen (the release's `div_weight`).
    #[serde(alias = "div_weight")]
    pub diversity_weight: f64,
    /// Weight of J_hard in J_gen (the release's `dot_weight`).
    #[serde(alias = "dot_weight")]
    pub hardness_weight: f64,
    /// Clip gradients of the embedder and the GNN by value (`None`: no clipping).
    pub grad_clip: Option<f64>,
    /// Which rows J_hard zeroes.
    pub masking: HardnessMasking,
    /// `false` trains the plain N-pair baseline: no graph, no synthesis.
    pub generation: bool,
    /// The backbone's arithmetic; everything after it is f32.
    #[serde(default)]
    pub precision: Precision,
}

/// Learning rates of one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearningRates {
    pub backbone: f64,
    /// Embedding head (`lr * embedding_ratio` in the release).
    pub head: f64,
    pub gnn: f64,
    pub classifier: f64,
    /// Proxy-Anchor proxies (`lr * proxy_lr_ratio`); unused with N-pair.
    pub proxies: f64,
}

/// Weight decays of the three optimisers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightDecays {
    /// Embedder (backbone and head).
    pub metric: f64,
    pub gnn: f64,
    pub classifier: f64,
}

/// Previous-epoch means that drive the schedules (1e6 in the first epoch).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossHistory {
    /// J̄_m.
    pub metric: f64,
    /// J̄_gen.
    pub generator: f64,
}

impl Default for LossHistory {
    fn default() -> Self {
        Self {
            metric: 1e6,
            generator: 1e6,
        }
    }
}

/// The losses a step reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// J_m: the base metric loss on the real embeddings.
    M,
    /// J_gnnce: cross-entropy of the GNN's node logits.
    Gnnce,
    /// J_syn: the metric loss on the synthetic negatives, after its weight.
    Syn,
    /// J_metric: what the embedder is updated with.
    Metric,
    /// J_softce: cross-entropy of the softmax classifier.
    Softce,
    /// J_div: the diversity loss, after the 0.01 factor.
    Div,
    /// J_gence: the classifier's cross-entropy on the synthetic negatives (J_cls).
    Gence,
    /// J_gen: what the generator is updated with.
    Gen,
}

impl Loss {
    /// Every loss, in the release's order.
    pub const ALL: [Loss; 8] = [
        Loss::M,
        Loss::Gnnce,
        Loss::Syn,
        Loss::Metric,
        Loss::Softce,
        Loss::Div,
        Loss::Gence,
        Loss::Gen,
    ];

    /// The name the release logs it under, and the key of run records, plots and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            Loss::M => "J_m",
            Loss::Gnnce => "J_gnnce",
            Loss::Syn => "J_syn",
            Loss::Metric => "J_metric",
            Loss::Softce => "J_softce",
            Loss::Div => "J_div",
            Loss::Gence => "J_gence",
            Loss::Gen => "J_gen",
        }
    }
}

/// The losses of one step; (de)serialised under [`Loss::name`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    pub j_m: f64,
    pub j_gnnce: f64,
    pub j_syn: f64,
    pub j_metric: f64,
    pub j_softce: f64,
    pub j_div: f64,
    pub j_gence: f64,
    pub j_gen: f64,
}

impl StepMetrics {
    pub fn get(&self, loss: Loss) -> f64 {
        match loss {
            Loss::M => self.j_m,
            Loss::Gnnce => self.j_gnnce,
            Loss::Syn => self.j_syn,
            Loss::Metric => self.j_metric,
            Loss::Softce => self.j_softce,
            Loss::Div => self.j_div,
            Loss::Gence => self.j_gence,
            Loss::Gen => self.j_gen,
        }
    }

    pub fn get_mut(&mut self, loss: Loss) -> &mut f64 {
        match loss {
            Loss::M => &mut self.j_m,
            Loss::Gnnce => &mut self.j_gnnce,
            Loss::Syn => &mut self.j_syn,
            Loss::Metric => &mut self.j_metric,
            Loss::Softce => &mut self.j_softce,
            Loss::Div => &mut self.j_div,
            Loss::Gence => &mut self.j_gence,
            Loss::Gen => &mut self.j_gen,
        }
    }

    /// `(name, value)` pairs in the release's order.
    pub fn named(&self) -> [(&'static str, f64); 8] {
        Loss::ALL.map(|loss| (loss.name(), self.get(loss)))
    }
}

impl Serialize for StepMetrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(Loss::ALL.len()))?;
        for (name, value) in self.named() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StepMetrics {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<String, f64>::deserialize(deserializer)?;
        let mut metrics = StepMetrics::default();
        for loss in Loss::ALL {
            *metrics.get_mut(loss) = *map
                .get(loss.name())
                .ok_or_else(|| serde::de::Error::missing_field(loss.name()))?;
        }
        Ok(metrics)
    }
}

/// A batch in view-major order: row `v*C + c` is the v-th image of class slot c.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Tensor<4>,
    /// Training-class index of every row.
    pub labels: Vec<usize>,
    /// A warm-up step's backbone features of `images`, when the caller computed them ahead
    /// with [`frozen_features`] (the training loop overlaps the next batch's backbone forward
    /// with the current step); `None`: the step runs the backbone itself. Only for a step
    /// with a frozen backbone (`StepInputs::train_backbone == false`).
    pub features: Option<Tensor<2>>,
}

impl Batch {
    pub fn new(images: Tensor<4>, labels: Vec<usize>) -> Self {
        Self {
            images,
            labels,
            features: None,
        }
    }
}

/// The backbone's features of `images` as a warm-up step computes them: frozen (autodiff
/// records nothing), with BatchNorm in its mode, running statistics included. Each call
/// advances those statistics, so the batches must come in training order, each once.
///
/// # Shapes
/// - images: `[batch, 3, height, width]`
/// - output: `[batch, features]`
pub fn frozen_features(backbone: Backbone, images: Tensor<4>, precision: Precision) -> Tensor<2> {
    // With no parameter requiring a gradient, autodiff records nothing. (Detaching the output
    // instead leaves the recorded forward graph behind, never freed:
    // `tests/warm_up_memory.rs`.) BatchNorm still follows its mode, running statistics
    // included, as the release's `requires_grad = False` does.
    backbone.no_grad().forward_in(images, precision)
}

/// The three optimisers of the release.
#[derive(Clone)]
pub struct Optimisers {
    /// Backbone and embedding head (two parameter groups).
    pub embedder: TorchAdamW,
    pub gnn: TorchAdamW,
    pub classifier: TorchAdamW,
}

impl Optimisers {
    pub fn new(decays: WeightDecays, grad_clip: Option<f64>) -> Self {
        Self {
            embedder: TorchAdamW::new(
                AdamWSettings::with_weight_decay(decays.metric as f32),
                grad_clip,
            ),
            gnn: TorchAdamW::new(
                AdamWSettings::with_weight_decay(decays.gnn as f32),
                grad_clip,
            ),
            classifier: TorchAdamW::new(
                AdamWSettings::with_weight_decay(decays.classifier as f32),
                None,
            ),
        }
    }
}

/// Reads a one-element tensor.
pub fn scalar(t: &Tensor<1>) -> f64 {
    crate::io::host::host_values(t.clone())[0] as f64
}

/// The losses of a step, kept on the device until the step is over and then read in one
/// transfer: on a GPU every read waits for the queue to drain and cuts the fusion streams, so
/// reading each loss where it is computed would stall the step eight times.
#[derive(Default)]
struct PendingMetrics {
    losses: Vec<(Loss, Tensor<1>)>,
}

impl PendingMetrics {
    fn record(&mut self, loss: Loss, value: &Tensor<1>) {
        self.losses.push((loss, value.clone().detach()));
    }

    /// The losses, and `extra`'s value read in the same transfer.
    fn read(self, extra: Option<Tensor<1>>) -> (StepMetrics, Option<f64>) {
        let mut metrics = StepMetrics::default();
        let (names, mut values): (Vec<Loss>, Vec<Tensor<1>>) = self.losses.into_iter().unzip();
        let has_extra = extra.is_some();
        values.extend(extra);
        if values.is_empty() {
            return (metrics, None);
        }
        let host = crate::io::host::host_values(Tensor::cat(values, 0));
        // Every loss is one value; anything else would shift every name onto another's value.
        assert_eq!(
            host.len(),
            names.len() + usize::from(has_extra),
            "one value per loss"
        );
        for (loss, value) in names.iter().zip(&host) {
            *metrics.get_mut(*loss) = *value as f64;
        }
        let extra = has_extra.then(|| host[names.len()] as f64);
        (metrics, extra)
    }
}

/// The training procedure of one batch: the three optimisers, the loss settings and the batch
/// layout they apply to.
#[derive(Clone)]
pub struct Trainer {
    pub optim: Optimisers,
    pub config: StepConfig,
    pub layout: BatchLayout,
    /// Loss scaling of the backbone's gradient, under f16 only.
    pub scaler: Option<LossScaler>,
}

impl Trainer {
    pub fn new(config: StepConfig, decays: WeightDecays, layout: BatchLayout) -> Self {
        Self {
            optim: Optimisers::new(decays, config.grad_clip),
            scaler: config.precision.scales_loss().then(LossScaler::default),
            config,
            layout,
        }
    }

    /// Runs one training step on `batch` and returns the updated model with the step's losses.
    /// The base loss is Proxy-Anchor when the model carries proxies, N-pair otherwise.
    /// It runs on a thread of rayon's pool ([`on_pool`](crate::backends::on_pool)).
    pub fn step(
        &mut self,
        model: GcaHng,
        batch: &Batch,
        inputs: StepInputs,
        mix: &mut (dyn MixSource + Send),
    ) -> (GcaHng, StepMetrics) {
        crate::backends::on_pool(|| {
            // f32 on the CPU: the backbone's backward pass runs beside the rest of the step.
            // (On a GPU the kernels queue in order anyway, and reduced precision is for GPUs.)
            let beside = inputs.train_backbone
                && self.scaler.is_none()
                && self.config.precision == Precision::F32
                && crate::backends::is_flex(&batch.images.device());
            let mut exchange = if beside {
                SingleProcess::beside()
            } else {
                SingleProcess::in_order()
            };
            match self.step_exchanged(model, batch, inputs, mix, &mut exchange) {
                Ok(done) => done,
                Err(never) => match never {},
            }
        })
    }

    /// [`step`](Self::step) with the backbone's features and gradients passed through
    /// `exchange`: `batch.images` are the rows the backbone runs on here, `batch.labels` and
    /// the layout those of the batch the rest of the step sees (data-parallel training:
    /// this process's share, and the global batch).
    pub fn step_exchanged<X: FeatureExchange>(
        &mut self,
        model: GcaHng,
        batch: &Batch,
        inputs: StepInputs,
        mix: &mut dyn MixSource,
        exchange: &mut X,
    ) -> Result<(GcaHng, StepMetrics), X::Error> {
        train_step(
            model,
            &mut self.optim,
            self.scaler.as_mut(),
            &self.config,
            self.layout,
            batch,
            inputs,
            mix,
            exchange,
        )
    }
}

/// Where the backbone's features go and where its gradient comes from. One process passes
/// them straight through ([`SingleProcess`]); data-parallel training
/// (`crate::distributed::Exchange`) gathers the features of every process into the global
/// batch and sends each process its rows of the gradient.
pub trait FeatureExchange {
    type Error;
    /// The features of the batch the head, graph and losses see, from the backbone's
    /// features of the rows computed here (tracked by autodiff while the backbone trains).
    fn features(&mut self, local: Tensor<2>) -> Result<Tensor<2>, Self::Error>;
    /// The backbone's gradient of the metric loss, whose backward pass filled `grads`.
    fn backbone_gradients(
        &mut self,
        grads: &mut Gradients,
        backbone: &Backbone,
    ) -> Result<GradientsParams, Self::Error>;
    /// The gradients of a part every process computes on the whole batch (head, GNN,
    /// classifier, proxies).
    fn shared_gradients<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, Self::Error>;
    /// The backbone's part of the metric loss's backward pass, taken out of `grads` to run
    /// beside the rest of the step, where this exchange allows it (it calls no collective).
    /// `None`: [`backbone_gradients`](Self::backbone_gradients) runs it in order.
    fn backbone_backward(&mut self, _grads: &mut Gradients) -> Option<BackboneBackward> {
        None
    }
}

/// The backbone's part of the metric loss's backward pass, from the gradient the head handed
/// back for the backbone's features: `sum(features * upstream)` has exactly that gradient, so
/// the backbone's gradients are those of the whole backward pass, bit for bit.
pub struct BackboneBackward {
    /// The backbone's output, tracked by autodiff.
    features: Tensor<2>,
    /// d(metric loss)/d(features); `None` when the loss did not reach them.
    upstream: Option<Tensor<2>>,
}

impl BackboneBackward {
    pub fn new(features: Tensor<2>, upstream: Option<Tensor<2>>) -> Self {
        Self { features, upstream }
    }

    /// The backbone's parameter gradients.
    pub fn run(self, backbone: &Backbone) -> GradientsParams {
        let Some(upstream) = self.upstream else {
            return GradientsParams::new();
        };
        let mut grads = (self.features * upstream).sum().backward();
        GradientsParams::from_module(&mut grads, backbone)
    }
}

/// One process: the features and gradients of every row are its own.
#[derive(Default)]
pub struct SingleProcess {
    /// Split the backward pass at the backbone's features, so that the backbone's part runs
    /// beside the rest of the step ([`FeatureExchange::backbone_backward`]).
    beside: bool,
    /// With `beside`: the backbone's features (tracked) and the detached leaf the head sees.
    split: Option<(Tensor<2>, Tensor<2>)>,
}

impl SingleProcess {
    /// The whole backward pass in one, in order.
    pub fn in_order() -> Self {
        Self::default()
    }

    /// The backbone's part of the backward pass beside the rest of the step: on the CPU, where
    /// the rest (the GCA-HNG step at a small batch) leaves a core idle much of the time.
    pub fn beside() -> Self {
        Self {
            beside: true,
            split: None,
        }
    }

    fn take_backward(&mut self, grads: &mut Gradients) -> Option<BackboneBackward> {
        let (features, detached) = self.split.take()?;
        Some(BackboneBackward::new(features, detached.grad_remove(grads)))
    }
}

impl FeatureExchange for SingleProcess {
    type Error = std::convert::Infallible;

    fn features(&mut self, local: Tensor<2>) -> Result<Tensor<2>, Self::Error> {
        if !(self.beside && local.is_tracked()) {
            return Ok(local);
        }
        let detached = local.clone().detach().require_grad();
        self.split = Some((local, detached.clone()));
        Ok(detached)
    }

    fn backbone_gradients(
        &mut self,
        grads: &mut Gradients,
        backbone: &Backbone,
    ) -> Result<GradientsParams, Self::Error> {
        Ok(match self.take_backward(grads) {
            Some(backward) => backward.run(backbone),
            None => GradientsParams::from_module(grads, backbone),
        })
    }

    fn backbone_backward(&mut self, grads: &mut Gradients) -> Option<BackboneBackward> {
        self.take_backward(grads)
    }

    fn shared_gradients<M: Module>(
        &mut self,
        _module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, Self::Error> {
        Ok(grads)
    }
}

/// Per-step inputs that change over training.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs {
    pub lr: LearningRates,
    pub history: LossHistory,
    /// `false` during warm-up: the backbone is frozen (it runs without gradients, so no
    /// backward pass runs through it and its optimiser group is not stepped), while the
    /// embedding head, the GNN and the classifier train.
    pub train_backbone: bool,
}

impl StepInputs {
    pub fn new(lr: LearningRates, history: LossHistory) -> Self {
        Self {
            lr,
            history,
            train_backbone: true,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn train_step<X: FeatureExchange>(
    mut model: GcaHng,
    optim: &mut Optimisers,
    scaler: Option<&mut LossScaler>,
    config: &StepConfig,
    layout: BatchLayout,
    batch: &Batch,
    inputs: StepInputs,
    mix: &mut dyn MixSource,
    exchange: &mut X,
) -> Result<(GcaHng, StepMetrics), X::Error> {
    let StepInputs {
        lr,
        history,
        train_backbone,
    } = inputs;
    let labels = &batch.labels;
    let lambda = hardness(config.hardness_alpha, history.metric);
    let syn_weight = 1.0 - (-config.synthetic_beta / history.generator).exp();
    let mut metrics = PendingMetrics::default();

    // 1-4: metric update of the embedder (and of the GNN through J_gce).
    let precision = config.precision;
    // Under f16 the backbone's gradient is scaled on its way in and unscaled before its
    // optimiser; nothing else sees the scale.
    let scale = match (&scaler, train_backbone) {
        (Some(s), true) => s.scale,
        _ => 1.0,
    };
    debug_assert!(
        !(train_backbone && batch.features.is_some()),
        "features computed ahead are for a frozen backbone"
    );
    let features = if train_backbone {
        let features = model
            .embedder
            .backbone
            .forward_in(batch.images.clone(), precision);
        scale_gradient(features, scale)
    } else {
        match &batch.features {
            Some(ahead) => ahead.clone(),
            None => frozen_features(
                model.embedder.backbone.clone(),
                batch.images.clone(),
                precision,
            ),
        }
    };
    let features = exchange.features(features)?;
    let z = model.embedder.head.forward(features);
    let j_m = match &model.proxies {
        Some(proxies) => proxies.forward(z.clone(), labels),
        None => npair_loss(z.clone(), labels, layout),
    };
    metrics.record(Loss::M, &j_m);
    let j_metric = if config.generation {
        let graph = CorrelationGraph::build(z.clone(), layout);
        let out = model.gnn.forward(&graph);
        let j_gce = cross_entropy(out.node_logits, labels);
        let syn = synthesize(z.clone(), out.edge_coeff.detach(), layout, lambda, mix);
        let j_syn = match &model.proxies {
            Some(proxies) => proxies.synthetic(syn.negatives, labels, layout),
            None => synthetic_npair_loss(z.clone(), syn.negatives, layout),
        }
        .mul_scalar(syn_weight);
        metrics.record(Loss::Gnnce, &j_gce);
        metrics.record(Loss::Syn, &j_syn);
        j_m + j_syn + j_gce
    } else {
        j_m
    };
    metrics.record(Loss::Metric, &j_metric);
    let mut grads = j_metric.backward();
    let g_head = GradientsParams::from_module(&mut grads, &model.embedder.head);
    let g_head = exchange.shared_gradients(&model.embedder.head, g_head)?;
    let g_gnn = GradientsParams::from_module(&mut grads, &model.gnn);
    let g_gnn = exchange.shared_gradients(&model.gnn, g_gnn)?;
    let g_proxies = match &model.proxies {
        Some(p) => {
            let g = GradientsParams::from_module(&mut grads, p);
            Some(exchange.shared_gradients(p, g)?)
        }
        None => None,
    };
    // The backbone's backward pass runs beside the rest of the step when the exchange allows
    // it (one process on the CPU); nothing in the rest reads the backbone.
    let beside = exchange.backbone_backward(&mut grads);
    let in_order = match beside {
        Some(_) => None,
        None => Some(exchange.backbone_gradients(&mut grads, &model.embedder.backbone)?),
    };
    drop(grads);
    let backbone = std::mem::replace(
        &mut model.embedder.backbone,
        Backbone::Identity(Default::default()),
    );
    let mut from_beside = None;
    let rest = rayon::in_place_scope(|scope| {
        if let Some(job) = beside {
            let (backbone, slot) = (&backbone, &mut from_beside);
            scope.spawn(move |_| *slot = Some(job.run(backbone)));
        }
        update_after_metric(
            model,
            optim,
            config,
            layout,
            labels,
            z,
            (lambda, lr),
            mix,
            exchange,
            &mut metrics,
            (g_head, g_gnn, g_proxies),
        )
    });
    let mut model = rest?;
    model.embedder.backbone = backbone;
    let mut g_backbone = in_order
        .or(from_beside)
        .unwrap_or_else(GradientsParams::new);

    // The backbone steps last, once its gradient is known to be finite (under f16); nothing
    // before then reads its parameters.
    let overflow_check = (scale != 1.0)
        .then(|| gradient_l1(&model.embedder.backbone, &g_backbone))
        .flatten();
    let (metrics, l1) = metrics.read(overflow_check);
    let finite = match (scaler, l1) {
        (Some(scaler), Some(l1)) => scaler.update(l1.is_finite()),
        _ => true,
    };
    if train_backbone && finite {
        let backbone = std::mem::replace(
            &mut model.embedder.backbone,
            Backbone::Identity(Default::default()),
        );
        model.embedder.backbone =
            optim
                .embedder
                .step_scaled(lr.backbone, backbone, &mut g_backbone, 1.0 / scale);
    }
    Ok((model, metrics))
}

/// The rest of a step once the metric loss's backward pass has run: step 4's updates of the
/// proxies, the head and the GNN, then steps 5 (classifier) and 6 (generator). It reads no
/// backbone parameter.
#[allow(clippy::too_many_arguments)]
fn update_after_metric<X: FeatureExchange>(
    mut model: GcaHng,
    optim: &mut Optimisers,
    config: &StepConfig,
    layout: BatchLayout,
    labels: &[usize],
    z: Tensor<2>,
    (lambda, lr): (f64, LearningRates),
    mix: &mut dyn MixSource,
    exchange: &mut X,
    metrics: &mut PendingMetrics,
    (mut g_head, mut g_gnn, mut g_proxies): (
        GradientsParams,
        GradientsParams,
        Option<GradientsParams>,
    ),
) -> Result<GcaHng, X::Error> {
    if let (Some(proxies), Some(g)) = (model.proxies.take(), g_proxies.as_mut()) {
        model.proxies = Some(optim.embedder.step(lr.proxies, proxies, g));
    }
    model.embedder.head = optim
        .embedder
        .step(lr.head, model.embedder.head, &mut g_head);
    if config.generation {
        model.gnn = optim.gnn.step(lr.gnn, model.gnn, &mut g_gnn);
    }

    if !config.generation {
        // The baseline has no synthetic negatives for the classifier to judge.
        return Ok(model);
    }

    // 5: the classifier learns the training classes on detached embeddings.
    let z = z.detach();
    let j_softce = cross_entropy(
        crate::backends::linear(&model.classifier, z.clone()),
        labels,
    )
    .mul_scalar(CLASSIFIER_LOSS_SCALE);
    metrics.record(Loss::Softce, &j_softce);
    let mut grads = j_softce.backward();
    let g_cls = GradientsParams::from_module(&mut grads, &model.classifier);
    let mut g_cls = exchange.shared_gradients(&model.classifier, g_cls)?;
    drop(grads);
    model.classifier = optim
        .classifier
        .step(lr.classifier, model.classifier, &mut g_cls);

    // 6: generator update: the GNN learns coefficients whose negatives are hard (close to the
    // anchor), still classified as their own class, and diverse across edges.
    let graph = CorrelationGraph::build(z.clone(), layout);
    let out = model.gnn.forward(&graph);
    let syn = synthesize(z.clone(), out.edge_coeff.clone(), layout, lambda, mix);
    let j_div = diversity_loss(out.edge_coeff, layout.nodes()).mul_scalar(DIVERSITY_SCALE);
    let c = layout.classes;
    let mix_labels: Vec<usize> = (0..layout.per_class * c * c)
        .map(|k| labels[k % c])
        .collect();
    let j_cls = cross_entropy(
        crate::backends::linear(&model.classifier, syn.negatives.clone()),
        &mix_labels,
    )
    .mul_scalar(config.classification_weight);
    let j_hard = hardness_loss(z, syn.negatives, layout, config.masking);
    let j_gen = (j_cls.clone()
        + j_hard.mul_scalar(config.hardness_weight)
        + j_div.clone().mul_scalar(config.diversity_weight))
    .mul_scalar(0.5);
    metrics.record(Loss::Div, &j_div);
    metrics.record(Loss::Gence, &j_cls);
    metrics.record(Loss::Gen, &j_gen);
    let mut grads = j_gen.backward();
    let g_gnn = GradientsParams::from_module(&mut grads, &model.gnn);
    let mut g_gnn = exchange.shared_gradients(&model.gnn, g_gnn)?;
    drop(grads);
    model.gnn = optim.gnn.step(lr.gnn, model.gnn, &mut g_gnn);
    Ok(model)
}

/// The sum of `|g|` over every gradient of `module` in `grads`: infinite or NaN when some
/// element is (or when the f32 sum itself overflows, which only makes the scaler back off).
fn gradient_l1<M: Module>(module: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct Sum<'a> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<1>>,
    }
    impl burn::module::ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.parts.push(g.abs().sum());
            }
        }
    }
    let mut sum = Sum {
        grads,
        parts: Vec::new(),
    };
    module.visit(&mut sum);
    (!sum.parts.is_empty()).then(|| Tensor::cat(sum.parts, 0).sum())
}

/// `log(sum(exp(x)))` over each row, `[rows, cols] -> [rows, 1]`.
pub fn logsumexp_rows(x: T<2>) -> T<2> {
    let max = x.clone().max_dim(1).detach();
    (x - max.clone()).exp().sum_dim(1).log() + max
}

#[cfg(test)]
mod tests;
