//! Decodes image files to 8-bit RGB, whatever their mode, as PIL's `convert("RGB")` does
//! for the release: grey is replicated, palettes are expanded, alpha is dropped (not
//! composited), CMYK JPEGs are converted, 16-bit channels are scaled to 8 bits.

use crate::error::Cause;
use std::io::{Cursor, Read};
use std::path::Path;

use image::{ImageFormat, ImageReader, RgbImage};

use super::DataError;

/// Largest image file read: the decoder may allocate at most 512 MB (`image`'s default
/// limit), which no compressed file beyond this size decodes within.
const MAX_FILE_BYTES: u64 = 1 << 30;

pub fn load_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bad = |why: String| DataError::Image {
        path: path.to_path_buf(),
        source: Cause(why),
    };
    let file = crate::io::regular::open(path).map_err(|e| DataError::read(path, e))?;
    let size = file.metadata().map_err(|e| DataError::read(path, e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(bad(format!(
            "the file has {size} bytes, more than any image read here ({MAX_FILE_BYTES})"
        )));
    }
    // Read whole, then decoded from memory: the JPEG check below needs the bytes, and one
    // read is cheaper than the decoder's many small ones.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::read(path, e))?;
    let reader = ImageReader::new(Cursor::new(&bytes[..]))
        // The extension can lie (a PNG named .jpg is common in scraped data); trust the bytes.
        .with_guessed_format()
        .map_err(|e| DataError::read(path, e))?;
    if reader.format() == Some(ImageFormat::Jpeg) && !jpeg_reaches_its_end(&bytes) {
        return Err(bad(JPEG_TRUNCATED.to_string()));
    }
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

/// Why a JPEG that [`jpeg_reaches_its_end`] refuses is refused.
pub const JPEG_TRUNCATED: &str =
    "the JPEG is truncated: its data ends before the end-of-image marker";

/// Whether a JPEG's bytes reach its end-of-image marker. `image`'s JPEG decoder (zune-jpeg,
/// lenient by design) fills whatever a truncated file lacks with grey and reports nothing,
/// so a half-downloaded photo would train and embed as a grey-bottomed picture; PIL, which
/// the release reads images with, refuses it ("image file is truncated"), and so does this.
/// zune-jpeg's strict mode would also refuse files PIL reads (stray bytes between
/// segments), and no crate offers the end check alone, hence this walk over the marker
/// segments: each segment's length is skipped, and a scan's entropy-coded data runs to the
/// first 0xFF that is neither a stuffed byte (0xFF00) nor a restart marker. It stops at the
/// first end-of-image, so data appended after it (a motion photo's video) is not looked at.
pub fn jpeg_reaches_its_end(bytes: &[u8]) -> bool {
    let byte = |i: usize| bytes.get(i).copied();
    let mut i = 2; // past the start-of-image marker
    loop {
        // Bytes between segments that are not a marker are skipped, as libjpeg does.
        match byte(i) {
            None => return false,
            Some(0xFF) => {}
            Some(_) => {
                i += 1;
                continue;
            }
        }
        // A marker: 0xFF, any number of 0xFF fill bytes, then its code.
        while byte(i) == Some(0xFF) {
            i += 1;
        }
        let Some(code) = byte(i) else { return false };
        i += 1;
        match code {
            0xD9 => return true,
            // Codes that stand alone, without a length.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let (Some(hi), Some(lo)) = (byte(i), byte(i + 1)) else {
            return false;
        };
        i += usize::from(u16::from_be_bytes([hi, lo]));
        if code == 0xDA {
            // Start of scan: its entropy-coded data follows the header.
            loop {
                let Some(at) = bytes
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
                else {
                    return false;
                };
                i += at;
                match byte(i + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
        std::fs::read(dir.join(name)).unwrap()
    }

    fn baseline_jpeg() -> Vec<u8> {
        let img = RgbImage::from_fn(37, 29, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    /// Every cut of a whole JPEG is refused, the whole file is not, and bytes appended after
    /// its end (a motion photo's video) are not looked at: baseline, and progressive with
    /// ten scans and restart markers (`progressive_restarts.jpg`, written by Pillow).
    #[test]
    fn every_truncation_of_a_jpeg_is_found_and_whole_files_pass() {
        for whole in [baseline_jpeg(), fixture("progressive_restarts.jpg")] {
            assert!(jpeg_reaches_its_end(&whole));
            for cut in 0..whole.len() {
                assert!(!jpeg_reaches_its_end(&whole[..cut]), "cut at {cut}");
            }
            let mut longer = whole.clone();
            longer.extend_from_slice(b"\xFF\xDA\x00\x08 then anything at all");
            assert!(jpeg_reaches_its_end(&longer));
        }
    }

    #[test]
    fn a_truncated_jpeg_is_an_error_naming_the_file_and_a_whole_one_loads() {
        let dir = tempfile::tempdir().unwrap();
        let whole = fixture("progressive_restarts.jpg");
        let good = dir.path().join("good.jpg");
        std::fs::write(&good, &whole).unwrap();
        assert_eq!(load_rgb(&good).unwrap().dimensions(), (61, 47));
        // Named .png: the bytes decide the format, and so the check.
        let half = dir.path().join("half.png");
        std::fs::write(&half, &whole[..whole.len() / 2]).unwrap();
        let err = load_rgb(&half).unwrap_err();
        let text = crate::error::chain(&err);
        assert!(
            text.contains("half.png") && text.contains("truncated"),
            "{text}"
        );
    }
}
