//! ImageNet classification with the EfficientNet-Lite0 head: the "does it see sensibly" check
//! of the pretrained asset on real photos (`examples/classify.rs`).

use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use super::{EfficientNetLite, EfficientNetLiteConfig};
use crate::data::transform::{Normalisation, Transform, TransformError};
use crate::error::{Error, Result};
use crate::io::state_dict::load_torch;
use crate::io::weights::read_weights;

/// One of the top classes of an image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// ImageNet-1k class index (the sorted-WordNet-id order of torchvision and TF).
    pub class: usize,
    pub probability: f32,
}

/// EfficientNet-Lite0 with its 1000-class `_fc` head, in eval mode, from `weights` (the
/// committed `assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors`, or a `.pth`).
pub fn load_efficientnet_lite0(weights: &Path, device: &Device) -> Result<EfficientNetLite> {
    let dict = read_weights(weights)?;
    let model = EfficientNetLiteConfig::new()
        .with_num_classes(Some(1000))
        .init(device);
    load_torch(model, &dict, "", device).map_err(|e| {
        Error::from(e).context(format!(
            "loading {} as EfficientNet-Lite0",
            weights.display()
        ))
    })
}

/// Resize the shorter side to 256, centre crop 224, `(x - 127) / 128`: CHW floats.
pub fn preprocess(img: &RgbImage) -> Result<Vec<f32>, TransformError> {
    let t = Transform::eval(224);
    let s = t.output_size() as usize;
    let mut out = vec![0.0; 3 * s * s];
    t.apply(img, &mut rand::rng(), Normalisation::EfficientNet, &mut out)?;
    Ok(out)
}

/// The `k` most probable classes of each image, most probable first.
pub fn classify(
    model: &EfficientNetLite,
    images: &[RgbImage],
    k: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let Some(first) = model.fc.as_ref() else {
        return Err(Error::NoHead);
    };
    let classes = first.weight.val().dims()[1];
    let device = first.weight.val().device();
    let mut pixels = Vec::new();
    for img in images {
        pixels.extend(
            preprocess(img).map_err(|source| crate::data::DataError::Transform {
                sample: "an image to classify".into(),
                source,
            })?,
        );
    }
    let x = Tensor::<4>::from_data(
        TensorData::new(pixels, [images.len(), 3, 224, 224]),
        &device,
    );
    let logits = model.logits(model.forward(x)).expect("head present");
    let probs = crate::io::host::host_values(softmax(logits, 1));
    Ok(probs.chunks(classes).map(|p| top_k(p, k)).collect())
}

/// The `k` largest entries of `p`, largest first (ties: lower index first).
pub fn top_k(p: &[f32], k: usize) -> Vec<Prediction> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.into_iter()
        .take(k)
        .map(|class| Prediction {
            class,
            probability: p[class],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability() {
        let got = top_k(&[0.1, 0.4, 0.05, 0.4, 0.05], 3);
        let classes: Vec<usize> = got.iter().map(|p| p.class).collect();
        assert_eq!(classes, [1, 3, 0]);
    }

    #[test]
    fn classifies_a_synthetic_image_into_k_distinct_ordered_classes() {
        let device = Device::flex();
        let model = EfficientNetLiteConfig::new()
            .with_num_classes(Some(1000))
            .init(&device);
        // Not square, smaller than 256 on one side: exercises resize and crop.
        let img = RgbImage::from_fn(300, 200, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let preds = classify(&model, &[img.clone(), img], 5).unwrap();
        assert_eq!(preds.len(), 2);
        for p in &preds {
            assert_eq!(p.len(), 5);
            assert!(p.windows(2).all(|w| w[0].probability >= w[1].probability));
            let mut c: Vec<usize> = p.iter().map(|q| q.class).collect();
            assert!(c.iter().all(|&c| c < 1000));
            c.dedup();
            assert_eq!(c.len(), 5);
            assert!(p.iter().map(|q| q.probability).sum::<f32>() <= 1.0 + 1e-5);
        }
        assert_eq!(preds[0], preds[1], "same image, same answer");
    }
}
