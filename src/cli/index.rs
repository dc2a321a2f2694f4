//! `gca-hng index`: approximate nearest-neighbour index files for large galleries.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use gca_hng::index::{BuildOptions, Gallery, IndexFile, Metric, Quantisation, RowRecords, build};

use gca_hng::io::embedding_files::EmbeddingFiles;

use crate::shared::{Outcome, read_gallery, same_file};

#[derive(clap::Subcommand)]
pub enum IndexCommand {
    /// Build an HNSW index file from embeddings (PREFIX.npy, PREFIX.paths.txt and, when
    /// present, PREFIX.labels.npy) for `search --index` and `serve --index`.
    Build(BuildArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Embeddings: the prefix `embed --out` wrote, or a run's `test-embeddings`.
    #[arg(long)]
    gallery: PathBuf,
    /// The index file to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = Metric::Cosine)]
    metric: Metric,
    /// How vectors are stored: f32, or f16 / i8 for a half / a quarter of the memory.
    #[arg(long, default_value_t = Quantisation::F32)]
    quantisation: Quantisation,
    /// Graph edges per node (HNSW's M).
    #[arg(long, default_value_t = BuildOptions::default().connectivity)]
    connectivity: usize,
    /// Candidates kept while inserting (efConstruction).
    #[arg(long, default_value_t = BuildOptions::default().expansion_add)]
    expansion_add: usize,
    /// Candidates kept while searching (ef), stored as the index's default.
    #[arg(long, default_value_t = BuildOptions::default().expansion_search)]
    expansion_search: usize,
}

pub fn run(what: IndexCommand) -> Result<Outcome> {
    match what {
        IndexCommand::Build(args) => build_index(args),
    }
}

fn build_index(args: BuildArgs) -> Result<Outcome> {
    let options = BuildOptions {
        metric: args.metric,
        quantisation: args.quantisation,
        connectivity: args.connectivity,
        expansion_add: args.expansion_add,
        expansion_search: args.expansion_search,
    };
    options.check()?;
    // The index replaces --out when it is written: never one of the files it is built from.
    let inputs = EmbeddingFiles::new(&args.gallery);
    for input in inputs.all() {
        anyhow::ensure!(
            !same_file(&input, &args.out),
            "--out {} is the gallery's own {}; choose another file for the index",
            args.out.display(),
            input.display()
        );
    }
    let crate::shared::GalleryFiles {
        values,
        dim,
        sources,
        labels,
        model,
    } = read_gallery(&args.gallery)?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = ProgressBar::new(sources.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("indexing {bar:30} {pos}/{len} rows, {eta} left")
                .expect("valid template"),
        );
        Some(bar)
    } else {
        None
    };
    let started = Instant::now();
    build(
        &values,
        dim,
        &RowRecords {
            sources: &sources,
            labels: labels.as_deref(),
            model: model.as_ref(),
        },
        &options,
        &args.out,
        &mut |done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done as u64);
            }
        },
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let index = IndexFile::open(&args.out)?;
    println!(
        "indexed {} in {:.1} s -> {}",
        index.describe(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(Outcome::Success)
}
