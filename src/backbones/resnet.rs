//! torchvision's ResNet-50 (v1.5: the stride sits on the 3x3 convolution), with torchvision's
//! parameter names.

use burn::config::Config;
use burn::module::Module;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::BatchNormMode;
use super::layers::{ConvBn, ConvBnConfig, global_avg_pool, global_max_pool};
use crate::io::state_dict::{TorchNamed, TorchParam, join};

/// How the final feature map becomes one vector per image.
#[derive(Config, Debug, PartialEq, Eq)]
pub enum Pooling {
    Avg,
    Max,
    /// Global average plus global max pooling, summed: what the GCA-HNG release uses.
    AvgPlusMax,
}

impl std::str::FromStr for Pooling {
    type Err = crate::error::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avg" => Ok(Self::Avg),
            "max" => Ok(Self::Max),
            "avg+max" => Ok(Self::AvgPlusMax),
            _ => Err(crate::error::UnknownName {
                what: "pooling",
                given: s.to_string(),
                expected: ["avg", "max", "avg+max"].map(String::from).to_vec(),
            }),
        }
    }
}

#[derive(Config, Debug)]
pub struct ResNet50Config {
    /// Default: the release's global average + max pooling.
    #[config(default = "Pooling::AvgPlusMax")]
    pub pooling: Pooling,
    /// Default: frozen (eval mode, affine parameters fixed), as the release trains it.
    #[config(default = "BatchNormMode::Frozen")]
    pub batch_norm: BatchNormMode,
    /// Classes of torchvision's `fc` head; `None` drops the head (the embedding case).
    #[config(default = "None")]
    pub num_classes: Option<usize>,
}

/// torchvision's `Bottleneck` (expansion 4).
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub conv3: ConvBn,
    pub downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn new(
        inp: usize,
        planes: usize,
        stride: usize,
        mode: &BatchNormMode,
        device: &Device,
    ) -> Self {
        let out = planes * 4;
        let downsample = (stride != 1 || inp != out).then(|| {
            ConvBnConfig::new(inp, out, 1)
                .with_stride(stride)
                .init(mode, device)
        });
        Self {
            conv1: ConvBnConfig::new(inp, planes, 1).init(mode, device),
            conv2: ConvBnConfig::new(planes, planes, 3)
                .with_stride(stride)
                .with_padding(Some(1))
                .init(mode, device),
            conv3: ConvBnConfig::new(planes, out, 1).init(mode, device),
            downsample,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(d) => d.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.conv1.forward_relu(x);
        let y = self.conv2.forward_relu(y);
        relu(self.conv3.forward(y) + identity)
    }
}

impl TorchNamed for Bottleneck {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.conv1.torch_names_as(prefix, "conv1", "bn1", out);
        self.conv2.torch_names_as(prefix, "conv2", "bn2", out);
        self.conv3.torch_names_as(prefix, "conv3", "bn3", out);
        if let Some(d) = &self.downsample {
            d.torch_names_as(prefix, "downsample.0", "downsample.1", out);
        }
    }
}

#[derive(Module, Debug)]
pub struct ResNet50 {
    pub stem: ConvBn,
    pub maxpool: MaxPool2d,
    pub layers: Vec<Vec<Bottleneck>>,
    pub fc: Option<Linear>,
    #[module(skip)]
    pub pooling: Pooling,
}

/// The intermediate results the fixtures record.
pub struct ResNetOutputs {
    pub layer1: Tensor<4>,
    pub features: Tensor<4>,
    pub gap: Tensor<2>,
    pub gmp: Tensor<2>,
}

impl ResNet50Config {
    pub fn init(&self, device: &Device) -> ResNet50 {
        let mode = &self.batch_norm;
        let mut inp = 64;
        let layers = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
            .into_iter()
            .map(|(planes, blocks, stride)| {
                (0..blocks)
                    .map(|i| {
                        let b = Bottleneck::new(
                            inp,
                            planes,
                            if i == 0 { stride } else { 1 },
                            mode,
                            device,
                        );
                        inp = planes * 4;
                        b
                    })
                    .collect()
            })
            .collect();
        ResNet50 {
            stem: ConvBnConfig::new(3, 64, 7)
                .with_stride(2)
                .with_padding(Some(3))
                .init(mode, device),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layers,
            fc: self
                .num_classes
                .map(|n| LinearConfig::new(2048, n).init(device)),
            pooling: self.pooling.clone(),
        }
    }
}

impl ResNet50 {
    pub const WIDTH: usize = 2048;

    pub fn outputs(&self, images: Tensor<4>) -> ResNetOutputs {
        let mut x = self.maxpool.forward(self.stem.forward_relu(images));
        let mut layer1 = None;
        for (i, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward(x);
            }
            if i == 0 {
                layer1 = Some(x.clone());
            }
        }
        ResNetOutputs {
            layer1: layer1.expect("ResNet-50 has four stages"),
            gap: global_avg_pool(x.clone()),
            gmp: global_max_pool(x.clone()),
            features: x,
        }
    }

    /// `[B, 3, H, W] -> [B, 2048]`, pooled as configured.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.maxpool.forward(self.stem.forward_relu(images));
        for layer in &self.layers {
            for block in layer {
                x = block.forward(x);
            }
        }
        match self.pooling {
            Pooling::Avg => global_avg_pool(x),
            Pooling::Max => global_max_pool(x),
            Pooling::AvgPlusMax => global_avg_pool(x.clone()) + global_max_pool(x),
        }
    }

    /// torchvision's classifier on the average-pooled features, if the model has it.
    pub fn logits(&self, gap: Tensor<2>) -> Option<Tensor<2>> {
        self.fc.as_ref().map(|fc| fc.forward(gap))
    }
}

impl TorchNamed for ResNet50 {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.stem.torch_names_as(prefix, "conv1", "bn1", out);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.torch_names(&join(prefix, &format!("layer{}", i + 1)), out);
        }
        if let Some(fc) = &self.fc {
            fc.torch_names(&join(prefix, "fc"), out);
        }
    }
}
