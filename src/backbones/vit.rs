//! ViT-S/16 laid out as DINO's `vision_transformer.py` (parameter names included); the
//! output is the CLS token after the final LayerNorm.

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use crate::backends::gelu;
use crate::io::state_dict::{Layout, TorchNamed, TorchParam, join, push};
use crate::nn::precision;

#[derive(Config, Debug)]
pub struct VitConfig {
    /// Default: 16.
    #[config(default = 16)]
    pub patch_size: usize,
    /// Token width. Default: 384 (ViT-S).
    #[config(default = 384)]
    pub dim: usize,
    /// Default: 12.
    #[config(default = 12)]
    pub depth: usize,
    /// Default: 6.
    #[config(default = 6)]
    pub num_heads: usize,
    /// Hidden width of the MLP over `dim`. Default: 4.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Input side the position embeddings were trained for. Default: 224.
    #[config(default = 224)]
    pub image_size: usize,
}

/// Multi-head self-attention with one fused `qkv` projection, as DINO writes it.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.num_heads;
        let hd = c / h;
        let qkv = precision::linear(&self.qkv, x)
            .reshape([b, n, 3, h, hd])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b, h, n, hd]);
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = q
            .mul_scalar((hd as f64).powf(-0.5))
            .matmul(k.swap_dims(2, 3));
        // The softmax in f32 under reduced precision, as autocast runs it.
        let dtype = scores.dtype();
        let attn = softmax(precision::to_f32(scores), 3).cast(dtype);
        let y = attn.matmul(v).swap_dims(1, 2).reshape([b, n, c]);
        precision::linear(&self.proj, y)
    }
}

/// LayerNorm with its statistics in f32 whatever the activations' precision, as autocast
/// computes it.
fn layer_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
    if precision::is_reduced(&x) {
        let dtype = x.dtype();
        norm.forward(precision::to_f32(x)).cast(dtype)
    } else {
        norm.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Block {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(layer_norm(&self.norm1, x));
        let hidden = gelu(precision::linear(
            &self.fc1,
            layer_norm(&self.norm2, x.clone()),
        ));
        x + precision::linear(&self.fc2, hidden)
    }
}

impl TorchNamed for Block {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.norm1.torch_names(&join(prefix, "norm1"), out);
        self.attn.qkv.torch_names(&join(prefix, "attn.qkv"), out);
        self.attn.proj.torch_names(&join(prefix, "attn.proj"), out);
        self.norm2.torch_names(&join(prefix, "norm2"), out);
        self.fc1.torch_names(&join(prefix, "mlp.fc1"), out);
        self.fc2.torch_names(&join(prefix, "mlp.fc2"), out);
    }
}

#[derive(Module, Debug)]
pub struct Vit {
    pub patch_embed: Conv2d,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub patch_size: usize,
}

impl VitConfig {
    pub fn init(&self, device: &Device) -> Vit {
        let d = self.dim;
        let grid = self.image_size / self.patch_size;
        let ln = || LayerNormConfig::new(d).with_epsilon(1e-6).init(device);
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        Vit {
            patch_embed: Conv2dConfig::new([3, d], [self.patch_size; 2])
                .with_stride([self.patch_size; 2])
                .init(device),
            cls_token: init.init([1, 1, d], device),
            pos_embed: init.init([1, grid * grid + 1, d], device),
            blocks: (0..self.depth)
                .map(|_| Block {
                    norm1: ln(),
                    attn: Attention {
                        qkv: LinearConfig::new(d, 3 * d).init(device),
                        proj: LinearConfig::new(d, d).init(device),
                        num_heads: self.num_heads,
                    },
                    norm2: ln(),
                    fc1: LinearConfig::new(d, self.mlp_ratio * d).init(device),
                    fc2: LinearConfig::new(self.mlp_ratio * d, d).init(device),
                })
                .collect(),
            norm: ln(),
            patch_size: self.patch_size,
        }
    }
}

impl Vit {
    pub const WIDTH: usize = 384;

    /// `[B, 3, H, W] -> [B, dim]`: the CLS token after the final norm.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let [b, _, h, w] = images.dims();
        let (rows, cols) = (h / self.patch_size, w / self.patch_size);
        let patches = precision::conv2d(&self.patch_embed, images)
            .flatten::<3>(2, 3)
            .swap_dims(1, 2);
        let d = patches.dims()[2];
        let cls = precision::weight_for(self.cls_token.val(), &patches).expand([b, 1, d]);
        let position = precision::weight_for(self.position_embedding(rows, cols), &patches);
        let x = Tensor::cat(vec![cls, patches], 1) + position;
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        layer_norm(&self.norm, x).narrow(1, 0, 1).reshape([b, d])
    }

    /// DINO's `interpolate_pos_encoding`: the trained grid as is when the input has its
    /// size, otherwise resized bicubically to `rows x cols`.
    fn position_embedding(&self, rows: usize, cols: usize) -> Tensor<3> {
        let pos = self.pos_embed.val();
        let [_, n1, d] = pos.dims();
        let grid = ((n1 - 1) as f64).sqrt() as usize;
        if rows == grid && cols == grid {
            return pos;
        }
        let device = pos.device();
        let resize = bicubic_resize_matrix(grid, rows, cols);
        let resize =
            Tensor::<2>::from_data(TensorData::new(resize, [rows * cols, grid * grid]), &device);
        let patch = resize.matmul(pos.clone().narrow(1, 1, n1 - 1).reshape([n1 - 1, d]));
        Tensor::cat(
            vec![pos.narrow(1, 0, 1), patch.reshape([1, rows * cols, d])],
            1,
        )
    }
}

/// The linear map of DINO's resize from a `grid x grid` map to `rows x cols`, as a
/// `[rows * cols, grid * grid]` row-major matrix.
///
/// DINO calls `F.interpolate(scale_factor=((n + 0.1) / grid, ...), mode="bicubic")`.
/// Given a scale factor, PyTorch maps output pixel `o` to source `(o + 0.5) / scale - 0.5`
/// with that factor itself, not `n / grid`, so the +0.1 shifts every sample slightly; burn's
/// `interpolate` derives the scale from the sizes, hence this hand-written map. As a matrix
/// applied to the parameter it stays differentiable and costs one small matmul.
pub fn bicubic_resize_matrix(grid: usize, rows: usize, cols: usize) -> Vec<f32> {
    let wr = bicubic_weights_1d(grid, rows);
    let wc = bicubic_weights_1d(grid, cols);
    let mut out = vec![0.0f32; rows * cols * grid * grid];
    for i in 0..rows {
        for j in 0..cols {
            let row = (i * cols + j) * grid * grid;
            for a in 0..grid {
                for b in 0..grid {
                    out[row + a * grid + b] = (wr[i * grid + a] * wc[j * grid + b]) as f32;
                }
            }
        }
    }
    out
}

/// `[out, grid]` weights of PyTorch's bicubic resampling (A = -0.75, indices clamped at the
/// border, `align_corners=False`) with scale factor `(out + 0.1) / grid`.
fn bicubic_weights_1d(grid: usize, out: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let inv_scale = grid as f64 / (out as f64 + 0.1);
    let mut w = vec![0.0; out * grid];
    for o in 0..out {
        let src = (o as f64 + 0.5) * inv_scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let coeffs = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, c) in coeffs.iter().enumerate() {
            let idx = (base as i64 - 1 + k as i64).clamp(0, grid as i64 - 1) as usize;
            w[o * grid + idx] += c;
        }
    }
    w
}

impl TorchNamed for Vit {
    fn torch_names(&self, prefix: &str, out: &mut Vec<TorchParam>) {
        self.patch_embed
            .torch_names(&join(prefix, "patch_embed.proj"), out);
        push(out, prefix, "cls_token", &self.cls_token, Layout::Plain);
        push(out, prefix, "pos_embed", &self.pos_embed, Layout::Plain);
        self.blocks.torch_names(&join(prefix, "blocks"), out);
        self.norm.torch_names(&join(prefix, "norm"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_weights_sum_to_one_and_the_same_size_still_resamples() {
        let w = bicubic_weights_1d(14, 10);
        for o in 0..10 {
            let s: f64 = w[o * 14..(o + 1) * 14].iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "row {o} sums to {s}");
        }
        // DINO's +0.1 makes even the same size a slight resample, not the identity: output o
        // samples up to 0.1 before source o, which keeps most of the weight (at the border
        // the clamped taps add up, so it can exceed one there).
        let same = bicubic_weights_1d(14, 14);
        for o in 0..14 {
            let own = same[o * 14 + o];
            let off = (own - 1.0).abs();
            assert!(off > 1e-4 && off < 0.1, "weight of {o} on itself: {own}");
        }
    }

    #[test]
    fn the_trained_grid_size_uses_the_position_embedding_as_is() {
        let device = Device::flex();
        let vit = VitConfig::new()
            .with_dim(12)
            .with_depth(1)
            .with_num_heads(2)
            .with_image_size(64)
            .init(&device);
        let pos = vit.pos_embed.val();
        let grid = ((pos.dims()[1] - 1) as f64).sqrt() as usize;
        assert_eq!(grid, 4);
        let same = vit.position_embedding(grid, grid);
        assert_eq!(
            same.into_data().try_to_vec::<f32>().unwrap(),
            pos.clone().into_data().try_to_vec::<f32>().unwrap()
        );
        // Another size is resampled: same class token, new patch grid.
        let other = vit.position_embedding(3, 5);
        assert_eq!(other.dims(), [1, 1 + 15, 12]);
        assert_ne!(
            other
                .narrow(1, 1, 15)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()[..12],
            pos.narrow(1, 1, 1).into_data().try_to_vec::<f32>().unwrap()[..]
        );
    }
}
