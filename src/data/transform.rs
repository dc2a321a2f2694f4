//! Image transforms as torchvision applies them to PIL images: RandomResizedCrop with its
//! ten-attempt algorithm, horizontal flip, Resize(shorter side) + CenterCrop, and
//! normalisation to CHW floats. Resampling is Pillow-style antialiased bilinear
//! (`fast_image_resize`, whose convolution follows Pillow's).

use std::cell::RefCell;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::Rng;

/// How pixel values become model inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Normalisation {
    /// `(x / 255 - mean) / std` with ImageNet's mean and std (every backbone of the release).
    #[default]
    ImageNet,
    /// `(x - 127) / 128` on 0-255 values (EfficientNet-Lite's TFLite convention).
    EfficientNet,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Normalisation {
    /// `(scale, offset)` per channel: `value = pixel * scale + offset`.
    fn affine(self) -> [(f32, f32); 3] {
        match self {
            Normalisation::ImageNet => std::array::from_fn(|c| {
                let s = 1.0 / (255.0 * IMAGENET_STD[c]);
                (s, -IMAGENET_MEAN[c] / IMAGENET_STD[c])
            }),
            Normalisation::EfficientNet => [(1.0 / 128.0, -127.0 / 128.0); 3],
        }
    }
}

/// A rectangle of the source image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// RandomResizedCrop's settings (torchvision's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCropConfig {
    /// Output side.
    pub size: u32,
    /// Range of the crop's area as a share of the image's; default `(0.08, 1.0)`.
    pub scale: (f64, f64),
    /// Range of the crop's width / height; default `(3/4, 4/3)`.
    pub ratio: (f64, f64),
}

impl RandomResizedCropConfig {
    pub fn new(size: u32) -> Self {
        Self {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// torchvision's `RandomResizedCrop.get_params`: ten tries at a random area and log-uniform
    /// aspect ratio that fits; otherwise the largest centred crop whose ratio is clamped into
    /// range.
    pub fn crop_box(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
        let (w_img, h_img) = (width as f64, height as f64);
        let area = w_img * h_img;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            // Python's round() rounds halves to even.
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= w_img && h > 0.0 && h <= h_img {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        let in_ratio = w_img / h_img;
        let lo = self.ratio.0.min(self.ratio.1);
        let hi = self.ratio.0.max(self.ratio.1);
        let (w, h) = if in_ratio < lo {
            (
                width,
                ((w_img / lo).round_ties_even() as u32).clamp(1, height),
            )
        } else if in_ratio > hi {
            (
                ((h_img * hi).round_ties_even() as u32).clamp(1, width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }
}

/// `a + (b - a) * U[0, 1)`, as `torch.empty(1).uniform_(a, b)`.
fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// What happens to each image before it enters the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transform {
    /// RandomResizedCrop, then a horizontal flip with probability `flip_p`.
    Train {
        crop: RandomResizedCropConfig,
        flip_p: f64,
    },
    /// Resize the shorter side to `resize`, then take the centred `crop` x `crop` square.
    Eval { resize: u32, crop: u32 },
}

impl Transform {
    /// The release's training transform at `size` px.
    pub fn train(size: u32) -> Self {
        Transform::Train {
            crop: RandomResizedCropConfig::new(size),
            flip_p: 0.5,
        }
    }

    /// The release's test transform: Resize(256), CenterCrop(224) (scaled for other sizes).
    pub fn eval(size: u32) -> Self {
        Transform::Eval {
            resize: size * 8 / 7,
            crop: size,
        }
    }

    /// Side of the output square.
    pub fn output_size(&self) -> u32 {
        match self {
            Transform::Train { crop, .. } => crop.size,
            Transform::Eval { crop, .. } => *crop,
        }
    }

    /// Transforms `img` and writes it into `out` (`3 * size * size` floats, CHW).
    pub fn apply(
        &self,
        img: &RgbImage,
        rng: &mut impl Rng,
        norm: Normalisation,
        out: &mut [f32],
    ) -> Result<(), TransformError> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err(TransformError::NoPixels);
        }
        let pixels = match *self {
            Transform::Train { crop, flip_p } => {
                let b = crop.crop_box(w, h, rng);
                let flip = rng.random::<f64>() < flip_p;
                let mut square = crop_and_resize(img, b, crop.size, crop.size)?;
                if flip {
                    image::imageops::flip_horizontal_in_place(&mut square);
                }
                square
            }
            Transform::Eval { resize, crop } => {
                let (rw, rh) = shorter_side_size(w, h, resize);
                let full = CropBox {
                    left: 0,
                    top: 0,
                    width: w,
                    height: h,
                };
                let resized = crop_and_resize(img, full, rw, rh)?;
                center_crop(&resized, crop)
            }
        };
        write_chw(&pixels, norm, out);
        Ok(())
    }
}

/// torchvision's Resize(int): the shorter side becomes `size`, the longer one
/// `int(size * long / short)` (truncated).
pub fn shorter_side_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let long_of = |short: u32, long: u32| ((size as u64 * long as u64) / short as u64) as u32;
    if w <= h {
        (size, long_of(w, h).max(1))
    } else {
        (long_of(h, w).max(1), size)
    }
}

/// torchvision's CenterCrop: offsets `round((side - crop) / 2)` (Python rounding); an image
/// smaller than the crop is padded with black first, as torchvision does.
pub fn center_crop(img: &RgbImage, crop: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let offset = |side: u32| ((side as f64 - crop as f64) / 2.0).round_ties_even() as i64;
    let (left, top) = (offset(w), offset(h));
    RgbImage::from_fn(crop, crop, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

thread_local! {
    // A resizer keeps scratch buffers between calls; one per worker thread.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Why an image could not be transformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    #[error("image has no pixels")]
    NoPixels,
    #[error("resize failed")]
    Resize(#[source] fast_image_resize::ResizeError),
}

/// Cuts `region` out of `img` and resizes it to `out_w` x `out_h`. The region is copied first
/// so that, as with PIL's `crop` then `resize`, the filter sees no pixels outside it.
pub fn crop_and_resize(
    img: &RgbImage,
    region: CropBox,
    out_w: u32,
    out_h: u32,
) -> Result<RgbImage, TransformError> {
    let (w, h) = img.dimensions();
    let whole = region.left == 0 && region.top == 0 && region.width == w && region.height == h;
    let cropped;
    let src = if whole {
        img
    } else {
        cropped =
            image::imageops::crop_imm(img, region.left, region.top, region.width, region.height)
                .to_image();
        &cropped
    };
    if src.dimensions() == (out_w, out_h) {
        return Ok(src.clone());
    }
    let mut dst = RgbImage::new(out_w, out_h);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(src, &mut dst, &options))
        .map_err(TransformError::Resize)?;
    Ok(dst)
}

/// HWC bytes to normalised CHW floats.
fn write_chw(img: &RgbImage, norm: Normalisation, out: &mut [f32]) {
    let plane = (img.width() * img.height()) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer size");
    let affine = norm.affine();
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = p[0] as f32 * affine[0].0 + affine[0].1;
        g[i] = p[1] as f32 * affine[1].0 + affine[1].1;
        b[i] = p[2] as f32 * affine[2].0 + affine[2].1;
    }
}
