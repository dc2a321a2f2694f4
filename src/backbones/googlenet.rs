//! torchvision's GoogLeNet (Inception v1 with BatchNorm), without the auxiliary heads, with
//! torchvision's parameter names.

use burn::config::Config;
use burn::module::Module;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use super::BatchNormMode;
use super::layers::{ConvBn, ConvBnConfig, global_avg_pool};
use crate::io::state_dict::{TorchNamed, TorchParam, join};

/// torchvision's `BasicConv2d` BatchNorm epsilon.
const EPS: f64 = 1e-3;

#[derive(Config, Debug)]
pub struct GoogLeNetConfig {
    /// Default: eval mode (running statistics).
    #[config(default = "BatchNormMode::Eval")]
    pub batch_norm: BatchNormMode,
    /// Re-normalise ImageNet-normalised input to the (x - 0.5) / 0.5 the original weights
    /// expect; torchvision sets this for pretrained weights. Default: true.
    #[config(default = true)]
    pub transform_input: bool,
    /// Classes of the `fc` head; `None` drops it.
    #[config(default = "None")]
    pub num_classes: Option<usize>,
}

fn conv(i: usize, o: usize, k: usize, s: usize, p: usize, m: &BatchNormMode, d: &Device) -> ConvBn {
    ConvBnConfig::new(i, o, k)
        .with_stride(s)
        .with_padding(Some(p))
        .with_epsilon(EPS)
        .init(m, d)
}

fn ceil_pool(kernel: usize, stride: usize, padding: usize) -> MaxPool2d {
    MaxPool2dConfig::new([kernel; 2])
        .with_strides([stride; 2])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_ceil_mode(true)
        .init()
}

/// One Inception block: four parallel branches concatenated along channels.
#[derive(Module, Debug)]
pub struct Inception {
    pub branch1: ConvBn,
    pub branch2: [ConvBn; 2],
    pub branch3: [ConvBn; 2],
    pub branch4_pool: MaxPool2d,
    pub branch4: ConvBn,
}

impl Inception {
    #[allow(clippy::too_many_arguments)]
    fn new(
        inp: usize,
        ch1: usize,
        ch3red: usize,
        ch3: usize,
        ch5red: usize,
        ch5: usize,
        pool_proj: usize,
        m: &BatchNormMode,
        d: &Device,
    ) -> Self {
        Self {
            branch1: conv(inp, ch1, 1, 1, 0, m, d),
            branch2: [
                conv(inp, ch3red, 1, 1, 0, m, d),
                conv(ch3red, ch3, 3, 1, 1, m, d),
            ],
            // torchvision uses a 3x3 (not 5x5) kernel here, and its weights have that shape.
            branch3: [
                conv(inp, ch5red, 1, 1, 0, m, d),
                conv(ch5red, ch5, 3, 1, 1, m, d),
            ],
            branch4_pool: ceil_pool(3, 1, 1),
            branch4: conv(inp, pool_proj, 1, 1, 0, m, d),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b1 = self.branch1.forward_relu(x.clone());
        let b2 = self.branch2[1].forward_relu(self.branch2[0].forward_relu(x.clone()));
        let b3 = self.branch3[1].forward_relu(self.branch3[0].forward_relu(x.clone()));
        let b4 = self.branch4.forward_relu(self.branch4_pool.forward(x));
        Tensor::cat(vec![b1, b2, b3, b4], 1)
    }
}

impl TorchNamed for Inception {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.branch1
            .torch_names_as(&join(prefix, "branch1"), "conv", "bn", out);
        for (i, c) in self.branch2.iter().enumerate() {
            c.torch_names_as(&join(prefix, &format!("branch2.{i}")), "conv", "bn", out);
        }
        for (i, c) in self.branch3.iter().enumerate() {
            c.torch_names_as(&join(prefix, &format!("branch3.{i}")), "conv", "bn", out);
        }
        self.branch4
            .torch_names_as(&join(prefix, "branch4.1"), "conv", "bn", out);
    }
}

/// Inception blocks with their torchvision names, in order.
const INCEPTIONS: [&str; 9] = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"];

#[derive(Module, Debug)]
pub struct GoogLeNet {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub conv3: ConvBn,
    pub inceptions: Vec<Inception>,
    pub pool: MaxPool2d,
    pub last_pool: MaxPool2d,
    pub fc: Option<Linear>,
    pub transform_input: bool,
}

impl GoogLeNetConfig {
    pub fn init(&self, device: &Device) -> GoogLeNet {
        let m = &self.batch_norm;
        let d = device;
        let specs = [
            (192, 64, 96, 128, 16, 32, 32),
            (256, 128, 128, 192, 32, 96, 64),
            (480, 192, 96, 208, 16, 48, 64),
            (512, 160, 112, 224, 24, 64, 64),
            (512, 128, 128, 256, 24, 64, 64),
            (512, 112, 144, 288, 32, 64, 64),
            (528, 256, 160, 320, 32, 128, 128),
            (832, 256, 160, 320, 32, 128, 128),
            (832, 384, 192, 384, 48, 128, 128),
        ];
        GoogLeNet {
            conv1: conv(3, 64, 7, 2, 3, m, d),
            conv2: conv(64, 64, 1, 1, 0, m, d),
            conv3: conv(64, 192, 3, 1, 1, m, d),
            inceptions: specs
                .iter()
                .map(|&(i, a, b, c, e, f, g)| Inception::new(i, a, b, c, e, f, g, m, d))
                .collect(),
            pool: ceil_pool(3, 2, 0),
            last_pool: ceil_pool(2, 2, 0),
            fc: self.num_classes.map(|n| LinearConfig::new(1024, n).init(d)),
            transform_input: self.transform_input,
        }
    }
}

impl GoogLeNet {
    pub const WIDTH: usize = 1024;

    /// torchvision's `_transform_input`: from ImageNet mean/std normalisation to (x - 0.5) / 0.5.
    fn transform(&self, x: Tensor<4>) -> Tensor<4> {
        if !self.transform_input {
            return x;
        }
        let mean = [0.485, 0.456, 0.406];
        let std = [0.229, 0.224, 0.225];
        let channels = (0..3)
            .map(|c| {
                x.clone()
                    .narrow(1, c, 1)
                    .mul_scalar(std[c] / 0.5)
                    .add_scalar((mean[c] - 0.5) / 0.5)
            })
            .collect();
        Tensor::cat(channels, 1)
    }

    /// `[B, 3, H, W] -> [B, 1024]`: the average-pooled output of the last Inception block.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.transform(images);
        let x = self.pool.forward(self.conv1.forward_relu(x));
        let x = self.conv3.forward_relu(self.conv2.forward_relu(x));
        let mut x = self.pool.forward(x);
        for (i, block) in self.inceptions.iter().enumerate() {
            x = block.forward(x);
            // Pools after 3b and after 4e.
            if i == 1 {
                x = self.pool.forward(x);
            } else if i == 6 {
                x = self.last_pool.forward(x);
            }
        }
        global_avg_pool(x)
    }

    pub fn logits(&self, pooled: Tensor<2>) -> Option<Tensor<2>> {
        self.fc.as_ref().map(|fc| fc.forward(pooled))
    }
}

impl TorchNamed for GoogLeNet {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.conv1
            .torch_names_as(&join(prefix, "conv1"), "conv", "bn", out);
        self.conv2
            .torch_names_as(&join(prefix, "conv2"), "conv", "bn", out);
        self.conv3
            .torch_names_as(&join(prefix, "conv3"), "conv", "bn", out);
        for (block, name) in self.inceptions.iter().zip(INCEPTIONS) {
            block.torch_names(&join(prefix, &format!("inception{name}")), out);
        }
        if let Some(fc) = &self.fc {
            fc.torch_names(&join(prefix, "fc"), out);
        }
    }
}
