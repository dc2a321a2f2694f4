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
                if u64::from(rw) * u64::from(rh) <= WHOLE_RESIZE_MAX_PIXELS {
                    let full = CropBox {
                        left: 0,
                        top: 0,
                        width: w,
                        height: h,
                    };
                    let resized = crop_and_resize(img, full, rw, rh)?;
                    center_crop(&resized, crop)
                } else {
                    resize_centre_window(img, (rw, rh), crop)?
                }
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

/// Above this many pixels, the test transform resizes only the centre window it keeps. A
/// 1 x 10,000,000 image (a few kilobytes as a PNG) resized whole to a shorter side of 64
/// would need 120 GB; below this bound (an aspect ratio up to 4096:1 at 64 px, 256:1 at 256
/// px) the whole resize runs as torchvision's does.
const WHOLE_RESIZE_MAX_PIXELS: u64 = 1 << 24;

/// The centre `crop` x `crop` window of `img` resized to `rw` x `rh`, computed without the
/// rest of the resized image: the window's box in source coordinates is resized, and the
/// filter still reads the source pixels around the box, so each value is the whole resize's
/// up to the rounding of the filter's weights. Where the window leaves the resized image
/// (a shorter side below `crop`), the rest is black, as [`center_crop`] pads.
fn resize_centre_window(
    img: &RgbImage,
    (rw, rh): (u32, u32),
    crop: u32,
) -> Result<RgbImage, TransformError> {
    let (w, h) = img.dimensions();
    let offset = |side: u32| ((side as f64 - crop as f64) / 2.0).round_ties_even() as i64;
    let (left, top) = (offset(rw), offset(rh));
    // The window's part inside the resized image, in resized pixels.
    let span = |start: i64, side: u32| {
        let a = start.max(0) as u32;
        let b = (start + i64::from(crop)).min(i64::from(side)) as u32;
        (a, b)
    };
    let ((x0, x1), (y0, y1)) = (span(left, rw), span(top, rh));
    let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
    let bx = x0 as f64 * sx;
    let by = y0 as f64 * sy;
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(
            bx,
            by,
            ((x1 - x0) as f64 * sx).min(w as f64 - bx),
            ((y1 - y0) as f64 * sy).min(h as f64 - by),
        );
    let mut part = RgbImage::new(x1 - x0, y1 - y0);
    RESIZER
        .with(|r| r.borrow_mut().resize(img, &mut part, &options))
        .map_err(TransformError::Resize)?;
    if part.dimensions() == (crop, crop) {
        return Ok(part);
    }
    let mut out = RgbImage::new(crop, crop);
    image::imageops::replace(&mut out, &part, x0 as i64 - left, y0 as i64 - top);
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(w: u32, h: u32) -> RgbImage {
        let mut state = 12345u32;
        RgbImage::from_fn(w, h, |x, y| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let n = (state >> 24) as u8 / 4;
            image::Rgb([(x * 7 % 200) as u8 + n, (y * 11 % 200) as u8 + n, n])
        })
    }

    fn whole_then_centre(img: &RgbImage, resize: u32, crop: u32) -> RgbImage {
        let (w, h) = img.dimensions();
        let (rw, rh) = shorter_side_size(w, h, resize);
        let full = CropBox {
            left: 0,
            top: 0,
            width: w,
            height: h,
        };
        center_crop(&crop_and_resize(img, full, rw, rh).unwrap(), crop)
    }

    /// The window alone against the whole resize then the centre crop, for long images both
    /// ways, down- and up-scaled, and a shorter side below the crop (black padding): equal
    /// up to the rounding of the filter weights.
    #[test]
    fn the_centre_window_alone_is_the_whole_resize_cropped() {
        for (w, h, resize, crop) in [
            (900, 20, 16, 14),
            (23, 700, 18, 16),
            (3, 500, 40, 32),
            (300, 5, 12, 16),
        ] {
            let img = noisy(w, h);
            let expected = whole_then_centre(&img, resize, crop);
            let (rw, rh) = shorter_side_size(w, h, resize);
            let window = resize_centre_window(&img, (rw, rh), crop).unwrap();
            assert_eq!(window.dimensions(), (crop, crop));
            let worst = expected
                .as_raw()
                .iter()
                .zip(window.as_raw())
                .map(|(&a, &b)| a.abs_diff(b))
                .max()
                .unwrap();
            assert!(worst <= 1, "{w}x{h}: off by {worst}");
        }
    }

    /// A 1 x 10,000,000 image resized whole to a shorter side of 64 would take 120 GB.
    #[test]
    fn an_extremely_long_image_takes_only_its_window() {
        let img = RgbImage::from_pixel(1, 10_000_000, image::Rgb([30, 60, 90]));
        let t = Transform::Eval {
            resize: 64,
            crop: 56,
        };
        let mut out = vec![0.0; 3 * 56 * 56];
        t.apply(
            &img,
            &mut rand::rng(),
            Normalisation::EfficientNet,
            &mut out,
        )
        .unwrap();
        // A constant image stays constant.
        assert!(out[..56 * 56].iter().all(|&v| v == (30.0 - 127.0) / 128.0));
    }
}
