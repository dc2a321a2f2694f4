//! `gca-hng search`: the nearest gallery images of query images.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use gca_hng::data::sources::{collect_images, collect_images_following, unlabelled_samples};
use gca_hng::device::DeviceSpec;
use gca_hng::eval::embed::{EmbedOutput, embed_samples};
use gca_hng::eval::grid::{GridRow, result_grid, save_png};
use gca_hng::index::SearchMode;
use gca_hng::io::embedding_files::source_line;
use gca_hng::train::{self, setup};

use crate::shared::{Outcome, RetrievalArgs, open_device};

#[derive(clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    retrieval: RetrievalArgs,
    /// With --index: score every row instead of walking the graph (the default for
    /// galleries too small to gain from the graph).
    #[arg(long)]
    exact: bool,
    /// Query images, folders or `emoji:CLASS:ICON`.
    #[arg(required = true)]
    queries: Vec<PathBuf>,
    /// Results per query.
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Also draw the queries and their results into this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Follow links to folders outside the query folders (each folder is still walked once).
    #[arg(long)]
    follow_links: bool,
}

pub fn run(args: SearchArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (spec, device) = open_device(device)?;
    anyhow::ensure!(args.top > 0, "--top must be at least 1");
    let (setup::LoadedCheckpoint { model, config, .. }, gallery) =
        args.retrieval.open(&spec, &device, "search")?;
    let queries = if args.follow_links {
        collect_images_following(&args.queries)?
    } else {
        collect_images(&args.queries)?
    };
    let store = Arc::new(train::image_store_for(
        &config,
        queries
            .iter()
            .chain((0..gallery.rows()).map(|i| gallery.source(i))),
    )?);
    let e = embed_samples(
        &model.embedder,
        EmbedOutput::Embedding,
        Arc::new(unlabelled_samples(queries.iter().cloned())),
        store.clone(),
        &train::embed_settings(&config, false),
        &device,
        &mut |_, _| {},
    )?;
    e.check_finite("the query embeddings")?;
    for (_, err) in &e.skipped {
        eprintln!("left out {}", gca_hng::error::chain(err));
    }
    anyhow::ensure!(
        e.dim == gallery.dim(),
        "the model embeds into {} dimensions but the gallery ({}) has {}",
        e.dim,
        gallery.describe(),
        gallery.dim()
    );
    let mode = if args.exact {
        SearchMode::Exact
    } else {
        SearchMode::Auto
    };
    let hits: Vec<Vec<(usize, f32)>> = e
        .values
        .chunks(e.dim)
        .map(|q| {
            Ok(gallery
                .search(q, args.top, mode)?
                .into_iter()
                .map(|h| (h.row, h.score))
                .collect())
        })
        .collect::<Result<_>>()?;
    let sources: Vec<_> = (0..gallery.rows()).map(|i| gallery.source(i)).collect();
    if args.json {
        let out: Vec<serde_json::Value> = queries
            .iter()
            .zip(&hits)
            .map(|(q, h)| {
                serde_json::json!({
                    "query": source_line(q),
                    "results": h.iter().map(|&(i, score)| serde_json::json!({"path": source_line(sources[i]), "label": gallery.label(i), "score": score})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (q, h) in queries.iter().zip(&hits) {
            println!("{}", source_line(q));
            for (rank, &(i, score)) in h.iter().enumerate() {
                println!("  {:>3}. {score:.4}  {}", rank + 1, source_line(sources[i]));
            }
        }
    }
    if let Some(grid) = &args.grid {
        let rows: Vec<GridRow> = queries
            .iter()
            .zip(&hits)
            .map(|(q, h)| GridRow {
                query: q.clone(),
                results: h.iter().map(|&(i, _)| (sources[i].clone(), None)).collect(),
            })
            .collect();
        save_png(&result_grid(&store, &rows, 96)?, grid)?;
        if !args.json {
            println!("wrote {}", grid.display());
        }
    }
    Ok(Outcome::Success)
}
