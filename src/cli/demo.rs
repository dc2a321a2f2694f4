//! `gca-hng demo`: GCA-HNG against the baseline on the embedded emoji styles.

use std::path::PathBuf;

use anyhow::Result;

use gca_hng::demo::{self, DemoOptions, QUICK, ResultsTable};
use gca_hng::device::DeviceSpec;
use gca_hng::train::setup::{self, EvalSet};

use crate::progress::TerminalProgress;
use crate::shared::{Outcome, stop_on_signal};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder: one run folder per method and seed, summary.json, learning-curves.svg,
    /// gallery.png. Started again with the same folder, an interrupted demo continues.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long, help = format!(
        "Smoke-sized: {} px images, {} steps per epoch, {} epochs, {} test classes",
        QUICK.image_size, QUICK.steps_per_epoch, QUICK.epochs, QUICK.test_classes
    ))]
    quick: bool,
    /// Seeds to run both methods with (comma-separated); two or more measure the seed spread,
    /// without which no winner is claimed.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    seeds: Vec<u64>,
    /// Epochs per run (default 3: one warm-up and two full epochs; DEMO.md's setting is 8).
    #[arg(long)]
    epochs: Option<usize>,
}

pub fn run(args: DemoArgs, device: Option<DeviceSpec>) -> Result<Outcome> {
    anyhow::ensure!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    let opts = DemoOptions {
        out: args.out.clone(),
        quick: args.quick,
        seeds: args.seeds.clone(),
        epochs: args.epochs,
        device: device.unwrap_or(DeviceSpec::Cpu).to_string(),
        stop: stop_on_signal(),
    };
    let c = demo::demo_config(&opts, true, opts.seeds[0])?;
    let data = setup::run_data(&c, None)?;
    let test_classes = match &data.test {
        EvalSet::Single(s) => s.classes.len(),
        EvalSet::QueryGallery { query, .. } => query.classes.len(),
    };
    println!(
        "demo: GCA-HNG vs the N-pair baseline on emoji styles ({} training classes, {test_classes} unseen test classes), EfficientNet-Lite0 at {} px, {} epochs, seeds {:?}, on {}",
        data.train.classes.len(),
        c.data.image_size,
        c.train.epochs,
        opts.seeds,
        opts.device
    );
    let summary = demo::run_demo(&opts, &mut |label| Box::new(TerminalProgress::new(label)))?;
    let Some(s) = summary else {
        println!(
            "stopped; run the same command again to continue from {}",
            args.out.display()
        );
        return Ok(Outcome::Interrupted);
    };
    let table = ResultsTable {
        summary: &s,
        feature_width: setup::backbone_config(&c)?.width(),
    };
    print!("\n{table}");
    println!("\n{}", s.verdict);
    println!(
        "took {:.0} s; wrote {1}/summary.json, learning-curves.svg, gallery.png and one run folder per method and seed",
        s.seconds,
        args.out.display()
    );
    Ok(Outcome::Success)
}
