//! The two HNSW candidates of issue 12 on the same data, for the choice recorded in the
//! README ("Index and serve"): usearch (through `gca_hng::index`) and hnsw_rs, both with
//! M = 16 and efConstruction = 128, both answering queries on all cores.
//!
//! `cargo run --release --features compare-hnsw-rs --example ann_candidates -- ROWS DIM QUERIES`

use std::time::Instant;

use hnsw_rs::prelude::{DistCosine, Hnsw};
use rayon::prelude::*;

use gca_hng::bench::index::synthetic_clustered;
use gca_hng::data::ImageSource;
use gca_hng::index::{
    BuildOptions, ExactGallery, Gallery, Hit, IndexFile, RowRecords, SearchMode, build, recall_at,
};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS DIM QUERIES"))
        .collect();
    let (rows, dim, queries) = match args[..] {
        [r, d, q] => (r, d, q),
        _ => (60_000, 512, 500),
    };
    let gallery = synthetic_clustered(rows, dim, 1000, 0.35, 0, 0);
    let query = synthetic_clustered(queries, dim, 1000, 0.35, 0, 1);
    let sources: Vec<ImageSource> = (0..rows)
        .map(|i| ImageSource::File(format!("{i}").into()))
        .collect();
    let exact = ExactGallery::new(&gallery, dim, sources.clone(), None).unwrap();
    let truth: Vec<Vec<Hit>> = query
        .chunks(dim)
        .map(|q| exact.search(q, 10, SearchMode::Exact).unwrap())
        .collect();
    drop(exact);
    println!(
        "{rows} x {dim}, {queries} queries, {} threads",
        rayon::current_num_threads()
    );
    let efs = [16, 32, 64, 128];

    let path = std::env::temp_dir().join(format!("ann-candidates-{}.index", std::process::id()));
    let started = Instant::now();
    build(
        &gallery,
        dim,
        &RowRecords::new(&sources, None),
        &BuildOptions::default(),
        &path,
        &mut |_, _| {},
    )
    .unwrap();
    println!("usearch: build {:.1} s", started.elapsed().as_secs_f64());
    let index = IndexFile::open(&path).unwrap();
    for ef in efs {
        index.set_expansion_search(ef);
        let started = Instant::now();
        let found: Vec<Vec<Hit>> = query
            .par_chunks(dim)
            .map(|q| index.search(q, 10, SearchMode::Approximate).unwrap())
            .collect();
        let qps = found.len() as f64 / started.elapsed().as_secs_f64();
        println!(
            "usearch: ef {ef:>3}  {qps:>8.0} q/s  recall@1 {:.4}  recall@10 {:.4}",
            recall_at(&truth, &found, 1),
            recall_at(&truth, &found, 10)
        );
    }
    drop(index);
    let _ = std::fs::remove_file(&path);

    let started = Instant::now();
    let hnsw = Hnsw::<f32, DistCosine>::new(16, rows, 16, 128, DistCosine {});
    let data: Vec<(&[f32], usize)> = gallery
        .chunks(dim)
        .enumerate()
        .map(|(i, r)| (r, i))
        .collect();
    hnsw.parallel_insert_slice(&data);
    println!("hnsw_rs: build {:.1} s", started.elapsed().as_secs_f64());
    for ef in efs {
        let started = Instant::now();
        let found: Vec<Vec<Hit>> = query
            .par_chunks(dim)
            .map(|q| {
                hnsw.search(q, 10, ef)
                    .into_iter()
                    .map(|n| Hit {
                        row: n.d_id,
                        score: 1.0 - n.distance,
                    })
                    .collect()
            })
            .collect();
        let qps = found.len() as f64 / started.elapsed().as_secs_f64();
        println!(
            "hnsw_rs: ef {ef:>3}  {qps:>8.0} q/s  recall@1 {:.4}  recall@10 {:.4}",
            recall_at(&truth, &found, 1),
            recall_at(&truth, &found, 10)
        );
    }
}
