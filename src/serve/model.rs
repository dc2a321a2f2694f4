//! Images from request bytes to embeddings: decoding with limits, the test-time transform
//! and the trained embedder.

use std::io::Cursor;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use image::{ImageReader, Limits, RgbImage};

use crate::data::image_io::{JPEG_TRUNCATED, jpeg_reaches_its_end};
use crate::eval::embed::EmbedSettings;
use crate::method::embedder::Embedder;

/// Largest side a request's image may have; larger ones are refused before decoding so that
/// a small compressed file cannot expand into gigabytes.
pub const MAX_SIDE: u32 = 8192;
/// Most bytes the decoder may allocate for one image.
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body is empty; send the image file's bytes")]
    Empty,
    #[error("the body is not an image in a known format (JPEG, PNG, GIF, BMP, PNM, WebP, TIFF)")]
    UnknownFormat,
    #[error("the image does not decode: {0}")]
    Corrupt(String),
    #[error("the image has no pixels")]
    NoPixels,
}

/// Decodes an image file's bytes to RGB, refusing images larger than [`MAX_SIDE`] or
/// [`MAX_DECODED_BYTES`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => return Err(DecodeError::UnknownFormat),
        Some(image::ImageFormat::Jpeg) if !jpeg_reaches_its_end(bytes) => {
            return Err(DecodeError::Corrupt(JPEG_TRUNCATED.to_string()));
        }
        Some(_) => {}
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DecodeError::NoPixels);
    }
    Ok(img.into_rgb8())
}

/// Turns decoded images into embedding rows. Each worker thread owns one.
pub trait ImageEmbedder: Send {
    /// One row per image, in order.
    fn embed(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, String>;
}

/// A trained embedder in evaluation mode with its test-time transform.
pub struct ModelEmbedder {
    embedder: Embedder,
    settings: EmbedSettings,
    device: Device,
}

impl ModelEmbedder {
    pub fn new(embedder: &Embedder, settings: EmbedSettings, device: &Device) -> Self {
        Self {
            // Evaluation mode: BatchNorm on running statistics, no autodiff graph.
            embedder: embedder.valid(),
            settings,
            device: device.clone().inner(),
        }
    }

    /// Another copy for another worker thread.
    pub fn copy(&self) -> Self {
        Self {
            embedder: self.embedder.clone(),
            settings: self.settings,
            device: self.device.clone(),
        }
    }
}

impl ImageEmbedder for ModelEmbedder {
    fn embed(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, String> {
        let transform = crate::data::transform::Transform::Eval {
            resize: self.settings.resize,
            crop: self.settings.crop,
        };
        let size = self.settings.crop as usize;
        let per_image = 3 * size * size;
        let mut pixels = vec![0f32; images.len() * per_image];
        // The evaluation transform draws nothing; the generator only fills the signature.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        for (img, out) in images.iter().zip(pixels.chunks_mut(per_image)) {
            transform
                .apply(img, &mut rng, self.settings.normalisation, out)
                .map_err(|e| e.to_string())?;
        }
        let input = Tensor::<4>::from_data(
            TensorData::new(pixels, [images.len(), 3, size, size]),
            &self.device,
        );
        let z = self.embedder.forward_in(input, self.settings.precision);
        let [_, dim] = z.dims();
        let values = crate::io::host::host_values(z);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the model produced a non-finite value (row {})",
                i / dim.max(1)
            ));
        }
        Ok(values.chunks(dim.max(1)).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bytes_are_named_and_good_ones_decode() {
        assert!(matches!(decode_image(b""), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_image(b"plain text, no image"),
            Err(DecodeError::UnknownFormat)
        ));
        let mut png = Vec::new();
        image::RgbImage::from_pixel(5, 3, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(decode_image(&png).unwrap().dimensions(), (5, 3));
        assert!(matches!(
            decode_image(&png[..png.len() / 2]),
            Err(DecodeError::Corrupt(_))
        ));
        // A truncated JPEG, which the decoder alone would fill with grey.
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10]))
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        assert_eq!(decode_image(&jpeg).unwrap().dimensions(), (16, 16));
        assert!(matches!(
            decode_image(&jpeg[..jpeg.len() - 40]),
            Err(DecodeError::Corrupt(m)) if m == JPEG_TRUNCATED
        ));
        // A header that claims a huge canvas is refused before any pixel is allocated.
        // (IHDR's width at bytes 16..20, its CRC over type and data at 29..33.)
        let mut huge = png.clone();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let err = decode_image(&huge).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Corrupt(m) if m.contains("limit")),
            "{err}"
        );
    }
}
