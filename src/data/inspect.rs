//! `data inspect`: checks that every listed image exists and counts classes and images.

use std::collections::BTreeSet;

use super::error::MISSING_SHOWN;
use super::{DataError, Dataset, ImageSource};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitCounts {
    pub name: String,
    /// Distinct labels with at least one image in this split.
    pub classes: usize,
    pub images: usize,
}

/// Counts per split; an error lists the missing files (the first few and how many).
pub fn inspect(dataset: &Dataset) -> Result<Vec<SplitCounts>, DataError> {
    let mut missing = Vec::new();
    for split in &dataset.splits {
        for s in &split.samples {
            if let ImageSource::File(p) = &s.source
                && !p.is_file()
            {
                missing.push(p.clone());
            }
        }
    }
    if !missing.is_empty() {
        let missing_count = missing.len();
        let shown: Vec<_> = missing.into_iter().take(MISSING_SHOWN).collect();
        return Err(DataError::MissingImages {
            count: missing_count,
            why: shown.iter().map(|p| super::error::not_a_file(p)).collect(),
            shown,
        });
    }
    Ok(counts_without(dataset, &[]))
}

/// Counts per split of the images not in `left_out` (the unreadable ones `decode_all`
/// found), so that counts say what training and evaluation will see.
pub fn counts_without(dataset: &Dataset, left_out: &[DataError]) -> Vec<SplitCounts> {
    let left_out: BTreeSet<&std::path::Path> = left_out.iter().filter_map(|e| e.path()).collect();
    dataset
        .splits
        .iter()
        .map(|split| {
            let kept: Vec<_> = split
                .samples
                .iter()
                .filter(|s| match &s.source {
                    ImageSource::File(p) => !left_out.contains(p.as_path()),
                    ImageSource::Emoji { .. } => true,
                })
                .collect();
            SplitCounts {
                name: split.name.clone(),
                classes: kept.iter().map(|s| s.label).collect::<BTreeSet<_>>().len(),
                images: kept.len(),
            }
        })
        .collect()
}

/// `{"splits": {"train": {"classes": N, "images": M}, ...}}`, splits in dataset order.
pub fn counts_json(counts: &[SplitCounts]) -> String {
    let body: Vec<String> = counts
        .iter()
        .map(|c| {
            format!(
                "{}: {{\"classes\": {}, \"images\": {}}}",
                serde_json::Value::String(c.name.clone()),
                c.classes,
                c.images
            )
        })
        .collect();
    format!("{{\"splits\": {{{}}}}}", body.join(", "))
}

/// Decodes every image file of the dataset in parallel. Stops at the first unreadable one,
/// or with `skip_bad` returns all of them (sorted by path).
pub fn decode_all(dataset: &Dataset, skip_bad: bool) -> Result<Vec<DataError>, DataError> {
    use rayon::prelude::*;
    let files: Vec<&std::path::Path> = dataset
        .splits
        .iter()
        .flat_map(|s| &s.samples)
        .filter_map(|s| match &s.source {
            ImageSource::File(p) => Some(p.as_path()),
            ImageSource::Emoji { .. } => None,
        })
        .collect();
    let mut bad: Vec<DataError> = files
        .par_iter()
        .filter_map(|p| super::image_io::load_rgb(p).err())
        .collect();
    bad.sort_by(|a, b| a.path().cmp(&b.path()));
    match bad.first() {
        Some(first) if !skip_bad => Err(first.clone()),
        _ => Ok(bad),
    }
}
