//! Datasets, the class-balanced sampler, image transforms and the multi-threaded loader.
//!
//! Readers ([`cub`], [`cars`], [`sop`], [`inshop`], [`folder`], [`emoji`]) turn a dataset's
//! original layout into [`Dataset`]: named splits of samples with contiguous labels. The
//! [`sampler`] plans class-balanced training batches, [`transform`] turns a decoded image into
//! normalised CHW floats, and [`loader`] runs both on worker threads ahead of the model. Only
//! [`tensor`] knows about burn.

pub mod cars;
pub mod cub;
pub mod emoji;
pub mod error;
pub mod folder;
pub mod image_io;
pub mod inshop;
pub mod inspect;
pub mod labels;
pub mod loader;
pub mod mat5;
pub mod sampler;
pub mod sop;
pub mod sources;
pub mod tensor;
pub mod text;
pub mod transform;

use std::path::{Path, PathBuf};

pub use error::{BatchError, DataError};

/// Where a sample's pixels come from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    /// An image file (JPEG, PNG, ...).
    File(PathBuf),
    /// Icon `icon` of class `class` of the embedded emoji asset (indices into its class list).
    Emoji { class: usize, icon: usize },
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::File(p) => write!(f, "{}", p.display()),
            ImageSource::Emoji { class, icon } => write!(f, "emoji class {class} icon {icon}"),
        }
    }
}

/// One image and its label (a contiguous index into its split's [`Split::classes`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub source: ImageSource,
    pub label: usize,
}

/// A class of a split: its id in the original layout and a human-readable name where the
/// layout has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    pub original_id: String,
    pub name: Option<String>,
}

/// A named part of a dataset (`train`, `test`, `query`, `gallery`).
#[derive(Clone, Debug)]
pub struct Split {
    pub name: String,
    pub samples: Vec<Sample>,
    /// Indexed by label.
    pub classes: Vec<ClassInfo>,
}

impl Split {
    pub fn labels(&self) -> Vec<usize> {
        self.samples.iter().map(|s| s.label).collect()
    }
}

/// The file extensions taken for images, compared case-insensitively: torchvision's
/// `IMG_EXTENSIONS`, so that a folder dataset holds the images `ImageFolder` finds in the
/// release. The decoder reads every one of them (the `image` crate's `pnm` feature covers
/// `ppm` and `pgm`).
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// Whether `path` names a file with one of the [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The dataset layouts this crate reads.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// CUB-200-2011: `images.txt`, `image_class_labels.txt`, `images/`.
    Cub,
    /// Cars196: `cars_annos.mat` and `car_ims/`.
    Cars,
    /// Stanford Online Products: `Ebay_train.txt`, `Ebay_test.txt`.
    Sop,
    /// In-Shop Clothes Retrieval: `list_eval_partition.txt` and `img/`.
    Inshop,
    /// `train/<class>/*` and `test/<class>/*` (the release's converted tree).
    Folder,
    /// The emoji styles asset embedded in the binary (no root needed).
    Emoji,
}

crate::string_forms_from_value_enum!(DatasetKind: "dataset kind");

/// A dataset's splits, in a fixed order (`train` first).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub splits: Vec<Split>,
}

/// The file that lists split `split` of a `kind` dataset under `root`: what to fix when the
/// split comes out empty.
fn annotation_file(kind: DatasetKind, root: &Path, split: &str) -> PathBuf {
    match kind {
        DatasetKind::Cub => cub::resolve_root(root).join("images.txt"),
        DatasetKind::Cars => root.join("cars_annos.mat"),
        DatasetKind::Sop => sop::list_path(&sop::resolve_root(root), split),
        DatasetKind::Inshop => inshop::list_path(root),
        DatasetKind::Folder => root.join(split),
        DatasetKind::Emoji => PathBuf::from(emoji::ASSET_NAME),
    }
}

impl Dataset {
    /// Reads a dataset of `kind` under `root` (`root` is ignored for the embedded emoji set).
    pub fn open(kind: DatasetKind, root: &Path) -> Result<Dataset, DataError> {
        let splits = match kind {
            DatasetKind::Cub => cub::read(root)?,
            DatasetKind::Cars => cars::read(root)?,
            DatasetKind::Sop => sop::read(root)?,
            DatasetKind::Inshop => inshop::read(root)?,
            DatasetKind::Folder => folder::read(root)?,
            DatasetKind::Emoji => emoji::splits(emoji::EmojiAsset::embedded()?),
        };
        for split in &splits {
            if split.samples.is_empty() {
                return Err(DataError::EmptySplit {
                    annotation: annotation_file(kind, root, &split.name),
                    split: split.name.clone(),
                });
            }
        }
        Ok(Dataset { kind, splits })
    }

    /// The split `name`, or an error naming it.
    pub fn require_split(&self, name: &str) -> Result<&Split, DataError> {
        self.split(name).ok_or_else(|| DataError::NoSplit {
            kind: self.kind,
            split: name.to_string(),
            available: self.splits.iter().map(|s| s.name.clone()).collect(),
        })
    }

    pub fn split(&self, name: &str) -> Option<&Split> {
        self.splits.iter().find(|s| s.name == name)
    }
}
