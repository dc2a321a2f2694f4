//! Decodes image files to 8-bit RGB, whatever their mode, as PIL's `convert("RGB")` does
//! for the release: grey is replicated, palettes are expanded, alpha is dropped (not
//! composited), CMYK JPEGs are converted, 16-bit channels are scaled to 8 bits.

use crate::error::Cause;
use std::path::Path;

use image::{ImageReader, RgbImage};

use super::DataError;

pub fn load_rgb(path: &Path) -> Result<RgbImage, DataError> {
    crate::io::regular::check(path).map_err(|e| DataError::read(path, e))?;
    let reader = ImageReader::open(path)
        .map_err(|e| DataError::read(path, e))?
        // The extension can lie (a PNG named .jpg is common in scraped data); trust the bytes.
        .with_guessed_format()
        .map_err(|e| DataError::read(path, e))?;
    let img = reader.decode().map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        source: Cause::of(&e),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::NoPixels {
            path: path.to_path_buf(),
        });
    }
    Ok(img.into_rgb8())
}
