//! A picture of retrieval results: each query followed by its nearest images.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::data::loader::ImageStore;
use crate::data::{DataError, ImageSource};

/// One row of a results picture: the query and its results, each result marked right
/// (green), wrong (red) or unknown (grey) when labels are not known.
pub struct GridRow {
    pub query: ImageSource,
    pub results: Vec<(ImageSource, Option<bool>)>,
}

/// Draws each query (blue frame) followed by its results, one row per query, `cell` pixels a
/// tile.
pub fn result_grid(store: &ImageStore, rows: &[GridRow], cell: u32) -> Result<RgbImage, DataError> {
    let border = 4;
    let gap = 6;
    let cols = rows.iter().map(|r| r.results.len() + 1).max().unwrap_or(1) as u32;
    let tile = cell + 2 * border;
    let width = gap + cols * (tile + gap) + gap;
    let height = gap + rows.len() as u32 * (tile + gap);
    let mut out = RgbImage::from_pixel(width, height.max(1), Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        let y = gap + r as u32 * (tile + gap);
        let mut items = vec![(&row.query, Rgb([40, 90, 220]))];
        for (source, right) in &row.results {
            let colour = match right {
                Some(true) => Rgb([40, 170, 60]),
                Some(false) => Rgb([220, 50, 40]),
                None => Rgb([160, 160, 160]),
            };
            items.push((source, colour));
        }
        for (c, (source, colour)) in items.into_iter().enumerate() {
            // The query gets an extra gap after it.
            let x = gap + c as u32 * (tile + gap) + if c > 0 { gap } else { 0 };
            let img = store.load(source)?;
            let thumb = image::imageops::resize(
                img.as_ref(),
                cell,
                cell,
                image::imageops::FilterType::Triangle,
            );
            let framed = {
                let mut f = RgbImage::from_pixel(tile, tile, colour);
                image::imageops::replace(&mut f, &thumb, border as i64, border as i64);
                f
            };
            if x + tile <= out.width() {
                image::imageops::replace(&mut out, &framed, x as i64, y as i64);
            }
        }
    }
    Ok(out)
}

/// Writes a PNG, naming the file in errors.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), DataError> {
    img.save(path).map_err(|e| DataError::WriteImage {
        path: path.to_path_buf(),
        source: crate::error::Cause::of(&e),
    })
}
