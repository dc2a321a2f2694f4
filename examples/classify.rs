//! Top-5 ImageNet classes of a few photos with the pretrained EfficientNet-Lite0.
//!
//! `cargo run --release --example classify -- [--weights FILE] [--labels FILE] IMAGE...`
//!
//! `--labels`: one class name per line in class-index order (1000 lines);
//! `scripts/imagenet_labels_from_darknet.sh` writes one from Debian's `darknet` package.
//! Without it only indices are printed.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use gca_hng::backbones::classify::{classify, load_efficientnet_lite0};

fn main() -> Result<()> {
    let mut weights = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/efficientnet-lite0/efficientnet-lite0-f16.safetensors"
    ));
    let mut labels: Option<Vec<String>> = None;
    let mut images = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--weights" => weights = args.next().context("--weights needs a file")?.into(),
            "--labels" => {
                let path = args.next().context("--labels needs a file")?;
                let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
                labels = Some(text.lines().map(str::to_owned).collect());
            }
            _ => images.push(PathBuf::from(a)),
        }
    }
    if images.is_empty() {
        bail!("usage: classify [--weights FILE] [--labels FILE] IMAGE...");
    }
    let device = Device::flex();
    let model = load_efficientnet_lite0(&weights, &device)?;
    let decoded = images
        .iter()
        .map(|p| {
            image::open(p)
                .with_context(|| p.display().to_string())
                .map(|i| i.to_rgb8())
        })
        .collect::<Result<Vec<_>>>()?;
    for (path, top) in images.iter().zip(classify(&model, &decoded, 5)?) {
        println!("{}", path.display());
        for p in top {
            let name = labels
                .as_ref()
                .and_then(|l| l.get(p.class))
                .map_or("", String::as_str);
            println!("  {:>4} {:6.2}%  {name}", p.class, 100.0 * p.probability);
        }
    }
    Ok(())
}
