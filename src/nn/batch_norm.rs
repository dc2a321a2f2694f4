//! Normalisation layers with PyTorch's exact semantics.

use burn::config::Config;
use burn::module::{Flag, Initializer, Module, Param, ParamId, RunningState};
use burn::nn::LayerNorm;
use burn::tensor::{Device, Tensor};

use crate::backends::batch_norm::{self, Activation};
use crate::backends::gelu;
use crate::io::state_dict::{Layout, TorchNamed, TorchParam, push};

/// Configuration of a [`BatchNorm1d`].
#[derive(Config, Debug)]
pub struct BatchNorm1dConfig {
    /// Number of features (channels).
    pub num_features: usize,
    /// Added to the variance before the square root. Default: 1e-5 (PyTorch's).
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Weight of the newest batch in the running statistics. Default: 0.1 (PyTorch's).
    #[config(default = 0.1)]
    pub momentum: f64,
    /// Whether the bias is trained. The GCA-HNG heads freeze it. Default: true.
    #[config(default = true)]
    pub trainable_bias: bool,
}

/// BatchNorm over `[batch, features]` (or `[batch, channels, ...]`) that keeps its running
/// statistics the way PyTorch does.
///
/// burn's own `BatchNorm` folds the *biased* batch variance into `running_var`; PyTorch folds
/// the unbiased one (`n / (n - 1)` times larger) and counts batches in `num_batches_tracked`.
/// The reference dumps record PyTorch's buffers after each step, so this layer matches them.
#[derive(Module, Debug)]
pub struct BatchNorm1d {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    /// A one-element float tensor (exact for counts below 2^24).
    pub num_batches_tracked: RunningState<Tensor<1>>,
    /// Batch statistics when enabled and the device records gradients; running ones otherwise.
    pub training: Param<Flag>,
    pub momentum: f64,
    pub epsilon: f64,
}

impl BatchNorm1dConfig {
    pub fn init(&self, device: &Device) -> BatchNorm1d {
        let weight = Initializer::Ones.init([self.num_features], device);
        let bias = Initializer::Zeros.init([self.num_features], device);
        let bias = if self.trainable_bias {
            bias
        } else {
            bias.set_require_grad(false)
        };
        BatchNorm1d {
            weight,
            bias,
            running_mean: RunningState::new(Tensor::zeros([self.num_features], device)),
            running_var: RunningState::new(Tensor::ones([self.num_features], device)),
            num_batches_tracked: RunningState::new(Tensor::zeros([1], device)),
            training: Param::from_bool(true),
            momentum: self.momentum,
            epsilon: self.epsilon,
        }
    }
}

impl BatchNorm1d {
    /// Normalises `input`; under reduced precision the statistics, the running state and the
    /// normalisation are f32 and only the output returns to the input's dtype, as autocast
    /// runs BatchNorm.
    ///
    /// # Shapes
    /// - input: `[batch, features, ...]`
    /// - output: the input's shape
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        self.forward_act(input, Activation::Identity)
    }

    /// [`forward`](Self::forward) followed by `act`: one fused kernel on the CPU in f32
    /// ([`crate::backends::batch_norm`]), burn's operations elsewhere.
    ///
    /// # Shapes
    /// - input: `[batch, features, ...]`
    /// - output: the input's shape
    pub fn forward_act<const D: usize>(&self, input: Tensor<D>, act: Activation) -> Tensor<D> {
        if crate::nn::precision::is_reduced(&input) {
            let dtype = input.dtype();
            return self
                .forward_act(crate::nn::precision::to_f32(input), act)
                .cast(dtype);
        }
        let train = input.device().is_autodiff() && self.training.is_enabled();
        let device = input.device();
        let running_mean = || self.running_mean.value().to_device(&device);
        let running_var = || self.running_var.value().to_device(&device);
        if batch_norm::applies(&input) {
            let (output, mean, var) = batch_norm::batch_norm_act(
                input,
                self.weight.val(),
                self.bias.val(),
                running_mean(),
                running_var(),
                self.epsilon,
                act,
                train,
            );
            if train {
                self.update_running(count_per_channel(&output.dims()), mean, var);
            }
            return output;
        }
        if train {
            let count = count_per_channel(&input.dims());
            let result = burn::tensor::module::batch_norm_train(
                input,
                self.weight.val(),
                self.bias.val(),
                self.epsilon,
            );
            self.update_running(count, result.mean, result.variance);
            act.apply(result.output)
        } else {
            act.apply(burn::tensor::module::batch_norm(
                input,
                self.weight.val(),
                self.bias.val(),
                running_mean(),
                running_var(),
                self.epsilon,
            ))
        }
    }

    /// PyTorch's running-statistics update from a batch's mean and biased variance over
    /// `count` values per channel (the variance enters unbiased).
    fn update_running(&self, count: usize, batch_mean: Tensor<1>, batch_var: Tensor<1>) {
        let m = self.momentum;
        let unbiased = if count > 1 {
            count as f64 / (count as f64 - 1.0)
        } else {
            1.0
        };
        let mean = self.running_mean.value_sync().inner();
        let var = self.running_var.value_sync().inner();
        let batch_mean = batch_mean.detach().inner();
        let batch_var = batch_var.detach().inner();
        self.running_mean
            .update(mean.mul_scalar(1.0 - m).add(batch_mean.mul_scalar(m)));
        self.running_var.update(
            var.mul_scalar(1.0 - m)
                .add(batch_var.mul_scalar(m * unbiased)),
        );
        let tracked = self.num_batches_tracked.value_sync().inner();
        self.num_batches_tracked.update(tracked.add_scalar(1.0));
        // A running state keeps updates per thread until it is read with `value_sync`; fold
        // them in now so that exports and checkpoints see them.
        for state in [
            &self.running_mean,
            &self.running_var,
            &self.num_batches_tracked,
        ] {
            let _ = state.value_sync();
        }
    }

    /// Switches between batch statistics (`true`) and running statistics (`false`).
    pub fn set_training(mut self, training: bool) -> Self {
        self.training = self.training.with_value(training);
        self
    }
}

impl TorchNamed for BatchNorm1d {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        push(out, prefix, "weight", &self.weight, Layout::Plain);
        push(out, prefix, "bias", &self.bias, Layout::Plain);
        for (name, state, layout) in [
            ("running_mean", &self.running_mean, Layout::Plain),
            ("running_var", &self.running_var, Layout::Plain),
            (
                "num_batches_tracked",
                &self.num_batches_tracked,
                Layout::Counter,
            ),
        ] {
            out.push(TorchParam {
                name: crate::io::state_dict::join(prefix, name),
                id: running_state_id(state),
                layout,
            });
        }
    }
}

/// Values per channel of a `[batch, channels, ...]` shape.
fn count_per_channel(dims: &[usize]) -> usize {
    dims.iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, d)| d)
        .product()
}

/// burn keeps a running state's id private; a visitor sees it.
fn running_state_id(state: &RunningState<Tensor<1>>) -> ParamId {
    struct Grab(Option<ParamId>);
    impl burn::module::ModuleVisitor for Grab {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 = Some(param.id);
        }
    }
    let mut grab = Grab(None);
    state.visit(&mut grab);
    grab.0.expect("a running state visits its tensor")
}

/// Every [`BatchNorm1d`]'s running statistics in a module, saved to be put back.
///
/// A warm-up epoch (frozen backbone) runs the next batch's backbone forward while the current
/// batch's head step runs. That forward advances the running statistics, so when the next
/// batch's step then never comes (a stop, a batch left out) they must be as if it never ran.
pub struct RunningStatistics {
    saved: std::collections::HashMap<ParamId, (Vec<usize>, Tensor<1>)>,
}

/// The fields of [`BatchNorm1d`] that hold running state (its struct's derive names them when
/// a visitor or mapper enters them).
const RUNNING_FIELDS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];
const BATCH_NORM: &str = "Struct:BatchNorm1d";

/// How deep a visitor or mapper is inside a running-state field of a [`BatchNorm1d`].
#[derive(Default)]
struct InRunning(usize);

impl InRunning {
    fn enter(&mut self, name: &str, container: &str) {
        self.0 += usize::from(container == BATCH_NORM && RUNNING_FIELDS.contains(&name));
    }

    fn exit(&mut self, name: &str, container: &str) {
        self.0 -= usize::from(container == BATCH_NORM && RUNNING_FIELDS.contains(&name));
    }

    fn inside(&self) -> bool {
        self.0 > 0
    }
}

impl RunningStatistics {
    /// The running statistics `module` holds now.
    pub fn of<M: Module>(module: &M) -> Self {
        struct Save {
            at: InRunning,
            saved: std::collections::HashMap<ParamId, (Vec<usize>, Tensor<1>)>,
        }
        impl burn::module::ModuleVisitor for Save {
            fn enter_module(&mut self, name: &str, container: &str) {
                self.at.enter(name, container);
            }
            fn exit_module(&mut self, name: &str, container: &str) {
                self.at.exit(name, container);
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if self.at.inside() {
                    let value = param.val();
                    let dims = value.dims().to_vec();
                    let n = dims.iter().product::<usize>();
                    self.saved.insert(param.id, (dims, value.reshape([n])));
                }
            }
        }
        let mut save = Save {
            at: InRunning::default(),
            saved: Default::default(),
        };
        module.visit(&mut save);
        Self { saved: save.saved }
    }

    /// How many running tensors were saved.
    pub fn len(&self) -> usize {
        self.saved.len()
    }

    /// Whether `module` had no running statistics.
    pub fn is_empty(&self) -> bool {
        self.saved.is_empty()
    }

    /// Puts the saved values back into `module` (and into every clone of it: burn's running
    /// states are shared between clones). Parameters are left as they are.
    pub fn restore<M: Module>(self, module: M) -> M {
        struct Put {
            at: InRunning,
            saved: std::collections::HashMap<ParamId, (Vec<usize>, Tensor<1>)>,
        }
        impl burn::module::ModuleMapper for Put {
            fn enter_module(&mut self, name: &str, container: &str) {
                self.at.enter(name, container);
            }
            fn exit_module(&mut self, name: &str, container: &str) {
                self.at.exit(name, container);
            }
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if !self.at.inside() {
                    return param;
                }
                match self.saved.remove(&param.id) {
                    Some((dims, value)) => {
                        let shape: [usize; D] = match dims.try_into() {
                            Ok(shape) => shape,
                            // A module of another layout: not ours to change.
                            Err(_) => return param,
                        };
                        Param::initialized(param.id, value.reshape(shape))
                    }
                    None => param,
                }
            }
        }
        module.map(&mut Put {
            at: InRunning::default(),
            saved: self.saved,
        })
    }
}

/// The release's `norm` block: GELU, then LayerNorm. One instance is reused at several places
/// of a layer, exactly as the release reuses one `Sequential(GELU, LayerNorm)`.
/// `eps` is the epsilon `norm` was configured with (burn keeps it private).
pub fn gelu_norm<const D: usize>(norm: &LayerNorm, eps: f64, x: Tensor<D>) -> Tensor<D> {
    crate::backends::layer_norm(norm, eps, gelu(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{what}: {got:?} vs {want:?}");
        }
    }

    /// Two features over a batch of four: feature 0 is [1, 2, 3, 6] (mean 3, biased variance
    /// 3.5, unbiased 14/3), feature 1 is [0, 0, 4, 4] (mean 2, biased 4, unbiased 16/3).
    fn input(device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(vec![1.0f32, 0.0, 2.0, 0.0, 3.0, 4.0, 6.0, 4.0], [4, 2]),
            device,
        )
    }

    fn layer(device: &Device) -> BatchNorm1d {
        let mut bn = BatchNorm1dConfig::new(2).init(device);
        bn.weight = Param::from_data(TensorData::new(vec![2.0f32, 1.0], [2]), device);
        bn.bias = Param::from_data(TensorData::new(vec![0.5f32, 0.0], [2]), device);
        bn
    }

    #[test]
    fn training_normalises_with_the_biased_batch_variance() {
        let device = Device::flex().autodiff();
        let y = host(layer(&device).forward(input(&device)));
        let eps = 1e-5;
        let (s0, s1) = ((3.5f64 + eps).sqrt(), (4.0f64 + eps).sqrt());
        let want: Vec<f64> = [[1.0, 0.0], [2.0, 0.0], [3.0, 4.0], [6.0, 4.0]]
            .iter()
            .flat_map(|[a, b]| [2.0 * (a - 3.0) / s0 + 0.5, (b - 2.0) / s1])
            .collect();
        assert_close(&y, &want, "output");
    }

    #[test]
    fn running_statistics_follow_pytorch() {
        let device = Device::flex().autodiff();
        let bn = layer(&device);
        let _ = bn.forward(input(&device));
        // 0.9 * 0 + 0.1 * mean; 0.9 * 1 + 0.1 * unbiased variance.
        assert_close(&host(bn.running_mean.value()), &[0.3, 0.2], "mean after 1");
        let var1 = [0.9 + 0.1 * 14.0 / 3.0, 0.9 + 0.1 * 16.0 / 3.0];
        assert_close(&host(bn.running_var.value()), &var1, "var after 1");
        assert_close(
            &host(bn.num_batches_tracked.value()),
            &[1.0],
            "count after 1",
        );

        let _ = bn.forward(input(&device));
        assert_close(
            &host(bn.running_mean.value()),
            &[0.57, 0.38],
            "mean after 2",
        );
        let var2 = [
            0.9 * var1[0] + 0.1 * 14.0 / 3.0,
            0.9 * var1[1] + 0.1 * 16.0 / 3.0,
        ];
        assert_close(&host(bn.running_var.value()), &var2, "var after 2");
        assert_close(
            &host(bn.num_batches_tracked.value()),
            &[2.0],
            "count after 2",
        );
    }

    #[test]
    fn eval_mode_uses_and_keeps_the_running_statistics() {
        let eps = 1e-5;
        let want: Vec<f64> = [[1.0, 0.0], [2.0, 0.0], [3.0, 4.0], [6.0, 4.0]]
            .iter()
            .flat_map(|[a, b]| {
                [
                    2.0 * (a - 1.0) / (4.0f64 + eps).sqrt() + 0.5,
                    (b + 1.0) / (0.25f64 + eps).sqrt(),
                ]
            })
            .collect();
        let check = |device: Device, training: bool, what: &str| {
            let mut bn = layer(&device);
            bn.running_mean = RunningState::new(Tensor::from_data(
                TensorData::new(vec![1.0f32, -1.0], [2]),
                &device,
            ));
            bn.running_var = RunningState::new(Tensor::from_data(
                TensorData::new(vec![4.0f32, 0.25], [2]),
                &device,
            ));
            let bn = bn.set_training(training);
            assert_close(&host(bn.forward(input(&device))), &want, what);
            assert_close(&host(bn.running_mean.value()), &[1.0, -1.0], what);
            assert_close(&host(bn.running_var.value()), &[4.0, 0.25], what);
            assert_close(&host(bn.num_batches_tracked.value()), &[0.0], what);
        };
        check(Device::flex().autodiff(), false, "eval mode");
        // Without autodiff (inference) the running statistics are used even in training mode.
        check(Device::flex(), true, "inference device");
    }

    /// A module holding two BatchNorms (one inside a Vec), as backbones nest them.
    #[derive(Module, Debug)]
    struct Nested {
        first: BatchNorm1d,
        rest: Vec<BatchNorm1d>,
    }

    #[test]
    fn running_statistics_are_put_back_in_every_clone() {
        let device = Device::flex().autodiff();
        let net = Nested {
            first: layer(&device),
            rest: vec![layer(&device)],
        };
        let _ = net.first.forward(input(&device));
        let before = RunningStatistics::of(&net);
        // Three running tensors per BatchNorm; weight and bias are not among them.
        assert_eq!(before.len(), 6);
        let mean = host(net.first.running_mean.value());
        let var = host(net.rest[0].running_var.value());

        // A clone runs ahead (the running states are shared with `net`) ...
        let ahead = net.clone();
        let _ = ahead.first.forward(input(&device).mul_scalar(3.0));
        let _ = ahead.rest[0].forward(input(&device).add_scalar(1.0));
        assert_ne!(host(net.first.running_mean.value()), mean);
        assert_eq!(host(net.first.num_batches_tracked.value()), [2.0]);

        // ... and is undone through the original.
        let net = before.restore(net);
        assert_eq!(host(net.first.running_mean.value()), mean);
        assert_eq!(host(net.rest[0].running_var.value()), var);
        assert_eq!(host(net.first.num_batches_tracked.value()), [1.0]);
        assert_eq!(host(net.rest[0].num_batches_tracked.value()), [0.0]);
        assert_eq!(host(ahead.first.running_mean.value()), mean);
        assert_eq!(host(net.first.weight.val()), [2.0, 1.0]);
        assert!(net.first.weight.val().is_require_grad());
        // The next forward continues from the restored values.
        let _ = net.first.forward(input(&device));
        assert_eq!(host(net.first.num_batches_tracked.value()), [2.0]);
    }
}
