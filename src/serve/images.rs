//! Which gallery images `GET /images/...` may serve, and their thumbnails.
//!
//! A URL names an image relative to the gallery folder (the deepest folder that holds every
//! gallery file), or `emoji/CLASS/ICON` for the embedded set. Only images that are rows of
//! the gallery are served: a path with `..`, an absolute path or any file that is not a
//! gallery row is refused, and the file found must still lie inside the gallery folder once
//! links are resolved.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use crate::data::ImageSource;
use crate::data::loader::ImageStore;

/// Longest side of a thumbnail.
pub const THUMBNAIL_SIDE: u32 = 160;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageRefusal {
    #[error("the path leaves the gallery folder")]
    Outside,
    #[error("no gallery image has this path")]
    NotInGallery,
    #[error("the gallery image cannot be read: {0}")]
    Unreadable(String),
}

/// URL paths of the gallery's images.
pub struct GalleryImages {
    root: Option<PathBuf>,
    /// Canonical `root`, for the check after links are resolved.
    canonical_root: Option<PathBuf>,
    by_url: HashMap<String, usize>,
    urls: Vec<String>,
}

/// The deepest folder that holds every file.
fn common_folder<'a>(files: impl Iterator<Item = &'a Path>) -> Option<PathBuf> {
    let mut common: Option<PathBuf> = None;
    for f in files {
        let parent = f.parent().unwrap_or(Path::new(""));
        common = Some(match common {
            None => parent.to_path_buf(),
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common
}

/// Forward slashes, each segment percent-encoded where a URL needs it.
fn url_path(relative: &Path) -> String {
    relative
        .components()
        .map(|c| encode_segment(&c.as_os_str().to_string_lossy()))
        .collect::<Vec<_>>()
        .join("/")
}

fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl GalleryImages {
    pub fn new(sources: &[&ImageSource]) -> Self {
        let root = common_folder(sources.iter().filter_map(|s| match s {
            ImageSource::File(p) => Some(p.as_path()),
            ImageSource::Emoji { .. } => None,
        }));
        let canonical_root = root.as_ref().and_then(|r| {
            let r = if r.as_os_str().is_empty() {
                Path::new(".")
            } else {
                r
            };
            r.canonicalize().ok()
        });
        let mut by_url = HashMap::new();
        let urls: Vec<String> = sources
            .iter()
            .map(|s| match s {
                ImageSource::Emoji { class, icon } => format!("emoji/{class}/{icon}"),
                ImageSource::File(p) => {
                    let rel = root
                        .as_ref()
                        .and_then(|r| p.strip_prefix(r).ok())
                        .unwrap_or(p);
                    url_path(rel)
                }
            })
            .collect();
        for (row, url) in urls.iter().enumerate() {
            by_url.entry(decode_url(url)).or_insert(row);
        }
        Self {
            root,
            canonical_root,
            by_url,
            urls,
        }
    }

    /// The gallery folder, if the gallery has files.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// `/images/...` of a row.
    pub fn url(&self, row: usize) -> String {
        format!("/images/{}", self.urls[row])
    }

    /// The gallery row a (percent-decoded) path below `/images/` names.
    pub fn row(&self, path: &str) -> Result<usize, ImageRefusal> {
        let p = Path::new(path);
        if path.contains('\0')
            || path.contains('\\')
            || p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(ImageRefusal::Outside);
        }
        self.by_url
            .get(path)
            .copied()
            .ok_or(ImageRefusal::NotInGallery)
    }

    /// A PNG thumbnail of `source` (a gallery row's image).
    pub fn thumbnail(
        &self,
        store: &ImageStore,
        source: &ImageSource,
    ) -> Result<Vec<u8>, ImageRefusal> {
        if let (ImageSource::File(p), Some(root)) = (source, &self.canonical_root) {
            let real = p
                .canonicalize()
                .map_err(|e| ImageRefusal::Unreadable(e.to_string()))?;
            if !real.starts_with(root) {
                return Err(ImageRefusal::Outside);
            }
        }
        let img = store
            .load(source)
            .map_err(|e| ImageRefusal::Unreadable(crate::error::chain(&e)))?;
        let (w, h) = img.dimensions();
        let scale = (THUMBNAIL_SIDE as f64 / w.max(h) as f64).min(1.0);
        let (tw, th) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        let small = image::imageops::thumbnail(img.as_ref(), tw, th);
        let mut png = Vec::new();
        small
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| ImageRefusal::Unreadable(e.to_string()))?;
        Ok(png)
    }
}

/// Percent-decoding, as the router applies it to a request's path.
fn decode_url(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_relative_to_the_gallery_folder_and_traversal_is_refused() {
        let a = ImageSource::File("/data/inshop/img/WOMEN/Dresses/id_1/01 front.jpg".into());
        let b = ImageSource::File("/data/inshop/img/MEN/Tees/id_2/02_side.jpg".into());
        let e = ImageSource::Emoji { class: 3, icon: 4 };
        let g = GalleryImages::new(&[&a, &b, &e]);
        assert_eq!(g.root(), Some(Path::new("/data/inshop/img")));
        assert_eq!(g.url(0), "/images/WOMEN/Dresses/id_1/01%20front.jpg");
        assert_eq!(g.url(2), "/images/emoji/3/4");
        assert_eq!(g.row("WOMEN/Dresses/id_1/01 front.jpg"), Ok(0));
        assert_eq!(g.row("MEN/Tees/id_2/02_side.jpg"), Ok(1));
        assert_eq!(g.row("emoji/3/4"), Ok(2));
        for outside in [
            "../inshop/img/MEN/Tees/id_2/02_side.jpg",
            "MEN/../../../etc/passwd",
            "/etc/passwd",
            "MEN\\..\\x",
        ] {
            assert_eq!(g.row(outside), Err(ImageRefusal::Outside), "{outside}");
        }
        assert_eq!(
            g.row("MEN/Tees/id_2/other.jpg"),
            Err(ImageRefusal::NotInGallery)
        );
    }

    #[test]
    fn a_thumbnail_fits_the_side_and_a_linked_file_outside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gallery = dir.path().join("gallery");
        std::fs::create_dir_all(gallery.join("a")).unwrap();
        let inside = gallery.join("a/big.png");
        image::RgbImage::from_pixel(400, 200, image::Rgb([9, 9, 9]))
            .save(&inside)
            .unwrap();
        let secret = dir.path().join("secret.png");
        std::fs::copy(&inside, &secret).unwrap();
        let link = gallery.join("a/link.png");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let sources = [ImageSource::File(inside), ImageSource::File(link)];
        let g = GalleryImages::new(&sources.iter().collect::<Vec<_>>());
        let store = ImageStore::files();
        let png = g.thumbnail(&store, &sources[0]).unwrap();
        let back = image::load_from_memory(&png).unwrap();
        assert_eq!(
            (back.width(), back.height()),
            (THUMBNAIL_SIDE, THUMBNAIL_SIDE / 2)
        );
        assert_eq!(g.thumbnail(&store, &sources[1]), Err(ImageRefusal::Outside));
    }
}
