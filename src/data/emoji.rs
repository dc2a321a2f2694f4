//! The emoji styles dataset embedded in the binary (`assets/emoji/`): one class per emoji,
//! one image per icon set that draws it. Icons are SVG and are rasterised on demand with
//! resvg (on white, aspect preserved, centred), then kept in memory and optionally on disk.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use image::RgbImage;
use resvg::{tiny_skia, usvg};
use serde::Deserialize;

use super::labels::{Entry, labelled_split};
use super::{DataError, ImageSource, Split};

/// The compressed asset, as committed.
static ASSET_GZ: &[u8] = include_bytes!("../../assets/emoji/emoji-styles.json.gz");

pub(crate) const ASSET_NAME: &str = "assets/emoji/emoji-styles.json.gz";
const FORMAT: &str = "gca-hng-emoji-styles";

#[derive(Clone, Debug, Deserialize)]
pub struct EmojiAsset {
    pub format: String,
    pub version: u32,
    pub sets: Vec<IconSet>,
    /// Sorted by name.
    pub classes: Vec<EmojiClass>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IconSet {
    pub id: String,
    pub name: String,
    pub license: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EmojiClass {
    pub name: String,
    /// In the asset's set order, at most one per set.
    pub icons: Vec<Icon>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Icon {
    pub set: String,
    /// `[left, top, width, height]`.
    pub view_box: [f64; 4],
    /// SVG inner markup.
    pub body: String,
}

impl Icon {
    /// The icon as a standalone SVG document.
    pub fn svg(&self) -> String {
        let [l, t, w, h] = self.view_box;
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="{l} {t} {w} {h}">{}</svg>"#,
            self.body
        )
    }
}

impl EmojiAsset {
    /// The asset compiled into the binary, decompressed and parsed once per process.
    pub fn embedded() -> Result<&'static EmojiAsset, DataError> {
        static ASSET: OnceLock<Result<EmojiAsset, DataError>> = OnceLock::new();
        ASSET
            .get_or_init(|| EmojiAsset::from_gzip(ASSET_GZ, ASSET_NAME))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Parses a gzip-compressed asset; `name` labels errors.
    pub fn from_gzip(gz: &[u8], name: &str) -> Result<EmojiAsset, DataError> {
        let path = std::path::Path::new(name);
        let err = |m: String| DataError::file(path, m);
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut json)
            .map_err(|e| DataError::read(path, e))?;
        let asset: EmojiAsset = serde_json::from_slice(&json).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            source: Arc::new(e),
        })?;
        if asset.format != FORMAT || asset.version != 1 {
            return Err(err(format!(
                "format `{}` version {} is not `{FORMAT}` version 1",
                asset.format, asset.version
            )));
        }
        if let Some(w) = asset.classes.windows(2).find(|w| w[0].name >= w[1].name) {
            return Err(err(format!(
                "classes not sorted by name: `{}` before `{}`",
                w[0].name, w[1].name
            )));
        }
        for class in &asset.classes {
            for icon in &class.icons {
                let [_, _, w, h] = icon.view_box;
                if !(w > 0.0 && h > 0.0 && w.is_finite() && h.is_finite()) {
                    return Err(err(format!(
                        "class `{}`, set `{}`: view box {:?} has no area",
                        class.name, icon.set, icon.view_box
                    )));
                }
            }
        }
        Ok(asset)
    }

    pub fn image_count(&self) -> usize {
        self.classes.iter().map(|c| c.icons.len()).sum()
    }

    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes
            .binary_search_by(|c| c.name.as_str().cmp(name))
            .ok()
    }
}

/// The project's split: classes in name order, the first `floor(K / 2)` train, the rest test.
pub fn splits(asset: &EmojiAsset) -> Vec<Split> {
    let half = asset.classes.len() / 2;
    let part = |range: std::ops::Range<usize>| {
        range
            .flat_map(|c| {
                let class = &asset.classes[c];
                (0..class.icons.len()).map(move |i| Entry {
                    key: c,
                    original_id: class.name.clone(),
                    name: Some(class.name.clone()),
                    source: ImageSource::Emoji { class: c, icon: i },
                })
            })
            .collect::<Vec<_>>()
    };
    vec![
        labelled_split("train", part(0..half)),
        labelled_split("test", part(half..asset.classes.len())),
    ]
}

/// Why an icon could not be rasterised.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RasterError {
    #[error("SVG does not parse")]
    Svg(#[source] Arc<usvg::Error>),
    #[error("bad size {0}")]
    Size(u32),
}

/// Rasterises one icon: `size` x `size` pixels on white, the view box scaled to fit and
/// centred.
pub fn rasterise(icon: &Icon, size: u32) -> Result<RgbImage, RasterError> {
    let tree = usvg::Tree::from_str(&icon.svg(), &usvg::Options::default())
        .map_err(|e| RasterError::Svg(Arc::new(e)))?;
    let mut pixmap = tiny_skia::Pixmap::new(size, size).ok_or(RasterError::Size(size))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    let tree_size = tree.size();
    let (w, h) = (tree_size.width(), tree_size.height());
    let scale = size as f32 / w.max(h);
    let transform = tiny_skia::Transform::from_scale(scale, scale).post_translate(
        (size as f32 - w * scale) / 2.0,
        (size as f32 - h * scale) / 2.0,
    );
    resvg::render(&tree, transform, &mut pixmap.as_mut());
    // The white background makes every pixel opaque, so the premultiplied colour is the
    // colour itself.
    let rgb: Vec<u8> = pixmap
        .pixels()
        .iter()
        .flat_map(|p| [p.red(), p.green(), p.blue()])
        .collect();
    Ok(RgbImage::from_raw(size, size, rgb).expect("size x size x 3 bytes"))
}

/// Rasterises icons at one size and keeps every raster (in memory, and as PNG under
/// `disk_cache/<size>/<set>/<class>.png` when a cache folder is given). Memory: `3 * size^2`
/// bytes per icon, about 1.3 GB for all 8,874 icons at 224 px.
pub struct EmojiRasteriser {
    asset: &'static EmojiAsset,
    size: u32,
    disk_cache: Option<PathBuf>,
    memory: Mutex<HashMap<(usize, usize), Arc<RgbImage>>>,
}

impl EmojiRasteriser {
    pub fn new(asset: &'static EmojiAsset, size: u32, disk_cache: Option<PathBuf>) -> Self {
        Self {
            asset,
            size,
            disk_cache,
            memory: Mutex::new(HashMap::new()),
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn get(&self, class: usize, icon: usize) -> Result<Arc<RgbImage>, DataError> {
        if let Some(img) = self.memory.lock().expect("cache lock").get(&(class, icon)) {
            return Ok(img.clone());
        }
        let c = self
            .asset
            .classes
            .get(class)
            .ok_or(DataError::NoEmojiClass { class })?;
        let i = c.icons.get(icon).ok_or_else(|| DataError::NoEmojiIcon {
            name: c.name.clone(),
            icon,
        })?;
        let disk = self.disk_cache.as_ref().map(|d| {
            d.join(self.size.to_string())
                .join(&i.set)
                .join(format!("{}.png", c.name))
        });
        let cached = disk
            .as_ref()
            .and_then(|p| image::open(p).ok())
            .map(|img| img.to_rgb8())
            .filter(|img| img.dimensions() == (self.size, self.size));
        let img = match cached {
            Some(img) => img,
            None => {
                let img = rasterise(i, self.size).map_err(|e| DataError::Rasterise {
                    name: c.name.clone(),
                    set: i.set.clone(),
                    source: e,
                })?;
                if let Some(p) = &disk {
                    // A cache that cannot be written only costs time; the raster is fine.
                    let _ = p
                        .parent()
                        .map(std::fs::create_dir_all)
                        .transpose()
                        .ok()
                        .and_then(|_| img.save(p).ok());
                }
                img
            }
        };
        let img = Arc::new(img);
        self.memory
            .lock()
            .expect("cache lock")
            .insert((class, icon), img.clone());
        Ok(img)
    }
}

/// A grid for people to look at: one row per class, one column per icon set (grey where a
/// set lacks the emoji), `cell` pixels per icon with a 2-pixel gap.
pub fn montage(asset: &EmojiAsset, classes: &[usize], cell: u32) -> Result<RgbImage, DataError> {
    let gap = 2;
    let cols = asset.sets.len() as u32;
    let rows = classes.len() as u32;
    let mut out = RgbImage::from_pixel(
        cols * (cell + gap) + gap,
        rows * (cell + gap) + gap,
        image::Rgb([90, 90, 90]),
    );
    for (r, &c) in classes.iter().enumerate() {
        let class = asset
            .classes
            .get(c)
            .ok_or(DataError::NoEmojiClass { class: c })?;
        for (s, set) in asset.sets.iter().enumerate() {
            let x = gap + s as u32 * (cell + gap);
            let y = gap + r as u32 * (cell + gap);
            let tile = match class.icons.iter().find(|i| i.set == set.id) {
                Some(icon) => rasterise(icon, cell).map_err(|e| DataError::Rasterise {
                    name: class.name.clone(),
                    set: set.id.clone(),
                    source: e,
                })?,
                None => RgbImage::from_pixel(cell, cell, image::Rgb([200, 200, 200])),
            };
            image::imageops::replace(&mut out, &tile, x as i64, y as i64);
        }
    }
    Ok(out)
}

/// The outcome of rasterising every icon once.
#[derive(Debug, Default)]
pub struct RenderCheck {
    pub rendered: usize,
    /// `(class, set, why)` of icons that failed to parse.
    pub failed: Vec<(String, String, RasterError)>,
    /// `(class, set)` of icons that rendered as plain white.
    pub blank: Vec<(String, String)>,
}

/// Rasterises every icon of the asset at `size` (in parallel) and reports failures and
/// blank results.
pub fn check_all(asset: &EmojiAsset, size: u32) -> RenderCheck {
    use rayon::prelude::*;
    let jobs: Vec<(&EmojiClass, &Icon)> = asset
        .classes
        .iter()
        .flat_map(|c| c.icons.iter().map(move |i| (c, i)))
        .collect();
    let results: Vec<_> = jobs
        .par_iter()
        .map(|(c, i)| (c, i, rasterise(i, size)))
        .collect();
    let mut check = RenderCheck::default();
    for (c, i, r) in results {
        match r {
            Ok(img) if img.pixels().all(|p| p.0 == [255, 255, 255]) => {
                check.blank.push((c.name.clone(), i.set.clone()))
            }
            Ok(_) => check.rendered += 1,
            Err(e) => check.failed.push((c.name.clone(), i.set.clone(), e)),
        }
    }
    check
}
