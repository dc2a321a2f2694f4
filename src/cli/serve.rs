//! `gca-hng serve`: the retrieval service and its page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use gca_hng::device::DeviceSpec;
use gca_hng::serve::model::{ImageEmbedder, ModelEmbedder};
use gca_hng::serve::pool::WorkerPool;
use gca_hng::serve::{ServeConfig, Service, serve};
use gca_hng::train::{self, setup};

use crate::shared::{Outcome, RetrievalArgs, open_device};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    retrieval: RetrievalArgs,
    /// Address to listen on. The default answers this machine only; bind another address
    /// only behind a proxy that authenticates, as the service has no authentication.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Embedding worker threads (default: one per core; at most 1024).
    #[arg(long, value_parser = count(1024))]
    workers: Option<usize>,
    /// Images that may wait for a worker; further requests get 503 (at most 1,000,000).
    #[arg(long, default_value_t = ServeConfig::default().queue, value_parser = count(1_000_000))]
    queue: usize,
    /// Most queued images a worker embeds in one forward pass (at most 4096).
    #[arg(long, default_value_t = ServeConfig::default().batch, value_parser = count(4096))]
    batch: usize,
    /// Largest request body, in MiB (at most 4096).
    #[arg(long, default_value_t = ServeConfig::default().max_body_bytes >> 20, value_parser = count(4096))]
    max_body_mib: usize,
    /// Deadline of a request, in seconds (at most a day).
    #[arg(long, default_value_t = ServeConfig::default().request_timeout.as_secs(), value_parser = seconds())]
    timeout_s: u64,
    /// Time a client has to send a request's headers, in seconds (at most a day).
    #[arg(long, default_value_t = ServeConfig::default().header_timeout.as_secs(), value_parser = seconds())]
    header_timeout_s: u64,
    /// Open connections at once (at most 1,000,000).
    #[arg(long, default_value_t = ServeConfig::default().max_connections, value_parser = count(1_000_000))]
    max_connections: usize,
}

/// A count from 1 to `max`. Upper bounds keep a typo from asking for unbounded threads or
/// memory, or from overflowing a deadline (an `Instant` plus a duration near `u64::MAX`
/// seconds panics inside hyper).
fn count(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

fn seconds() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::<u64>::new().range(1..=86_400)
}

pub fn run(args: ServeArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (spec, device) = open_device(device)?;
    let (setup::LoadedCheckpoint { model, config, .. }, gallery) =
        args.retrieval.open(&spec, &device, "serve")?;
    let store = train::image_store_for(&config, (0..gallery.rows()).map(|i| gallery.source(i)))?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let first = ModelEmbedder::new(
        &model.embedder,
        train::embed_settings(&config, false),
        &device,
    );
    // One embedding before opening the port: a model whose width differs from the gallery's
    // is refused here rather than on every request.
    let mut probe = first.copy();
    let row = probe
        .embed(&[image::RgbImage::new(8, 8)])
        .map_err(anyhow::Error::msg)
        .context("embedding a test image")?;
    anyhow::ensure!(
        row[0].len() == gallery.dim(),
        "the model embeds into {} dimensions but the gallery ({}) has {}",
        row[0].len(),
        gallery.describe(),
        gallery.dim()
    );
    let embedders: Vec<Box<dyn ImageEmbedder>> = (0..workers)
        .map(|_| Box::new(first.copy()) as Box<dyn ImageEmbedder>)
        .collect();
    let serve_config = ServeConfig {
        queue: args.queue,
        batch: args.batch,
        max_body_bytes: args.max_body_mib << 20,
        request_timeout: Duration::from_secs(args.timeout_s),
        header_timeout: Duration::from_secs(args.header_timeout_s),
        max_connections: args.max_connections,
        ..ServeConfig::default()
    };
    let pool = WorkerPool::new(embedders, serve_config.queue, serve_config.batch);
    let description = gallery.describe();
    let service = Arc::new(Service::new(gallery, store, pool, serve_config));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        let local = listener.local_addr()?;
        println!("gallery: {description}; {workers} embedding workers");
        println!("listening on http://{local}");
        serve(listener, service.clone(), shutdown_signal()).await;
        println!("stopped");
        anyhow::Ok(())
    })?;
    // Dropping the service stops the workers once their queue is empty.
    drop(service);
    Ok(Outcome::Success)
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: cannot handle SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("shutting down: finishing requests in flight");
}
