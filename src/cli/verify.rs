//! `gca-hng verify`: this implementation against recorded outputs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::device::DeviceSpec;
use gca_hng::verify::backbone::{Arch, verify_backbone};
use gca_hng::verify::reference::verify_reference;

use crate::shared::{Outcome, open_device};

#[derive(Subcommand)]
pub enum VerifyCommand {
    /// Replay a dump of the authors' release and compare every stage, gradient, loss and
    /// parameter it records.
    Reference {
        /// The dump (`.safetensors`).
        dump: PathBuf,
        /// Print only failures and the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Run a pretrained backbone on the inputs stored in an expected-outputs file and compare
    /// every output recorded for the architecture.
    Backbone {
        /// resnet50, googlenet, vit-s16 or efficientnet-lite0.
        #[arg(long)]
        arch: Arch,
        /// Weights: PyTorch `.pth` or safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// Expected outputs (`.safetensors` with `input*` tensors).
        #[arg(long)]
        expected: PathBuf,
    },
}

pub fn run(what: VerifyCommand, device: Option<DeviceSpec>) -> Result<Outcome> {
    let (spec, device) = open_device(device)?;
    match what {
        VerifyCommand::Backbone {
            arch,
            weights,
            expected,
        } => {
            let report = verify_backbone(arch, &weights, &expected, &device)?;
            println!(
                "{:<24} {:>11} {:>11} {:>10} {:>4}",
                "output", "max abs err", "rel err", "tolerance", "ok"
            );
            for row in &report.rows {
                println!(
                    "{:<24} {:>11.3e} {:>11.3e} {:>10.0e} {:>4}{}",
                    row.name,
                    row.max_abs,
                    row.relative,
                    report.tolerance,
                    if row.ok { "ok" } else { "FAIL" },
                    row.problem
                        .as_ref()
                        .map(|p| format!("  ({p})"))
                        .unwrap_or_default()
                );
            }
            let failed = report.rows.iter().filter(|r| !r.ok).count();
            println!(
                "verify backbone {arch} {}: {} compared, {failed} failed on {} -> {}",
                weights.display(),
                report.rows.len(),
                spec,
                if report.passed() { "PASS" } else { "FAIL" }
            );
            Ok(Outcome::passed(report.passed()))
        }
        VerifyCommand::Reference { dump, quiet } => {
            let report = verify_reference(&dump, &device)?;
            println!(
                "{:<72} {:>11} {:>11} {:>16} {:>4}",
                "tensor", "max abs err", "rel err", "tolerance", "ok"
            );
            for row in &report.rows {
                if quiet && row.ok {
                    continue;
                }
                println!(
                    "{:<72} {:>11.3e} {:>11.3e} {:>16} {:>4}{}",
                    row.name,
                    row.max_abs,
                    row.relative,
                    row.tolerance,
                    if row.ok { "ok" } else { "FAIL" },
                    row.note
                        .as_ref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
            for name in &report.unchecked {
                println!("{name:<72} not compared: FAIL");
            }
            println!(
                "verify reference {}: {} compared, {} failed, {} not compared on {} -> {}",
                dump.display(),
                report.rows.len(),
                report.failures(),
                report.unchecked.len(),
                spec,
                if report.passed() { "PASS" } else { "FAIL" }
            );
            Ok(Outcome::passed(report.passed()))
        }
    }
}
