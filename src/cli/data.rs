//! `gca-hng data`: look at datasets and the embedded emoji set.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::data::{DatasetKind, emoji, inspect};

use crate::shared::{Outcome, open_dataset};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Read a dataset's annotations, check that every listed image exists, and print the
    /// number of classes and images of each split.
    Inspect {
        /// The dataset layout.
        #[arg(long)]
        kind: DatasetKind,
        /// The dataset's folder (not needed for `emoji`).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Also decode every image (in parallel) to find unreadable ones.
        #[arg(long)]
        decode: bool,
        /// With --decode: report unreadable images instead of stopping at the first (the
        /// counts then leave them out).
        #[arg(long, requires = "decode")]
        skip_bad_images: bool,
        /// Print `{"splits": {"train": {"classes": N, "images": M}, ...}}` only.
        #[arg(long)]
        json: bool,
    },
    /// The embedded emoji dataset: draw classes in all their styles, or check that every
    /// icon renders.
    Emoji {
        /// Write a montage (one row per class, one column per icon set) to this PNG.
        #[arg(long)]
        montage: Option<PathBuf>,
        /// Classes to draw (names); default: 12 classes spread over the list, plus the
        /// fluent-emoji filter cases `umbrella` and `umbrella-with-rain-drops`.
        #[arg(long, num_args = 1..)]
        classes: Vec<String>,
        /// Pixels per icon in the montage.
        #[arg(long, default_value_t = 96)]
        cell: u32,
        /// Rasterise every icon and report failures and blank results.
        #[arg(long)]
        check: bool,
    },
}

pub fn run(what: DataCommand) -> Result<Outcome> {
    match what {
        DataCommand::Inspect {
            kind,
            root,
            decode,
            skip_bad_images,
            json,
        } => inspect_dataset(kind, root, decode, skip_bad_images, json)?,
        DataCommand::Emoji {
            montage,
            classes,
            cell,
            check,
        } => emoji_set(montage, &classes, cell, check)?,
    }
    Ok(Outcome::Success)
}

fn inspect_dataset(
    kind: DatasetKind,
    root: Option<PathBuf>,
    decode: bool,
    skip_bad_images: bool,
    json: bool,
) -> Result<()> {
    let dataset = open_dataset(kind, root)?;
    let mut counts = inspect::inspect(&dataset)?;
    let mut bad = Vec::new();
    if decode {
        bad = inspect::decode_all(&dataset, skip_bad_images)?;
        counts = inspect::counts_without(&dataset, &bad);
    }
    if json {
        println!("{}", inspect::counts_json(&counts));
    } else {
        for c in &counts {
            println!(
                "{:<8} {:>7} classes {:>9} images",
                c.name, c.classes, c.images
            );
        }
    }
    if !bad.is_empty() {
        eprintln!("{} unreadable images skipped:", bad.len());
        for e in &bad {
            eprintln!("  {e}");
        }
    }
    Ok(())
}

fn emoji_set(montage: Option<PathBuf>, classes: &[String], cell: u32, check: bool) -> Result<()> {
    let asset = emoji::EmojiAsset::embedded()?;
    let splits = emoji::splits(asset);
    for s in &splits {
        println!(
            "{:<6} {:>5} classes {:>6} images",
            s.name,
            s.classes.len(),
            s.samples.len()
        );
    }
    if check {
        let r = emoji::check_all(asset, 64);
        println!(
            "rendered {} of {} icons at 64 px; {} failed, {} blank",
            r.rendered,
            asset.image_count(),
            r.failed.len(),
            r.blank.len()
        );
        for (c, s, e) in &r.failed {
            println!("  failed: {c} ({s}): {e}");
        }
        for (c, s) in &r.blank {
            println!("  blank: {c} ({s})");
        }
    }
    if let Some(path) = montage {
        let chosen: Vec<usize> = if classes.is_empty() {
            let k = asset.classes.len();
            let mut v: Vec<usize> = (0..12).map(|i| i * k / 12).collect();
            v.extend(
                ["umbrella", "umbrella-with-rain-drops"]
                    .iter()
                    .filter_map(|n| asset.class_index(n)),
            );
            v
        } else {
            classes
                .iter()
                .map(|n| {
                    asset
                        .class_index(n)
                        .ok_or_else(|| anyhow::anyhow!("no emoji class `{n}`"))
                })
                .collect::<Result<_>>()?
        };
        let img = emoji::montage(asset, &chosen, cell)?;
        gca_hng::eval::grid::save_png(&img, &path)?;
        let sets: Vec<&str> = asset.sets.iter().map(|s| s.id.as_str()).collect();
        println!("wrote {} (columns: {})", path.display(), sets.join(", "));
        for (r, c) in chosen.iter().enumerate() {
            println!("  row {r}: {}", asset.classes[*c].name);
        }
    }
    Ok(())
}
