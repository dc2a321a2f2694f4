//! `gca-hng verify`: this implementation against recorded outputs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::backbones::BackboneKind;
use gca_hng::device::DeviceSpec;
use gca_hng::verify::backbone::verify_backbone;
use gca_hng::verify::reference::{ParameterRule, verify_reference_with};

use crate::shared::{Outcome, open_device};

#[derive(Subcommand)]
pub enum VerifyCommand {
    /// Replay a dump of the authors' release and compare every stage, gradient, loss and
    /// parameter it records. On a device other than `cpu`, parameters after AdamW steps are
    /// judged by the GPU rule (README, "Devices"): elements whose update rounding decides get
    /// the slack of that update.
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
        /// The architecture.
        #[arg(long)]
        arch: BackboneKind,
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
            print!("{report}");
            println!(
                "{}",
                report.summary(
                    &format!("backbone {arch} {}", weights.display()),
                    &spec.to_string()
                )
            );
            Ok(Outcome::passed(report.passed()))
        }
        VerifyCommand::Reference { dump, quiet } => {
            let report = verify_reference_with(&dump, &device, ParameterRule::for_device(&spec))?;
            print!("{}", report.table(quiet));
            println!(
                "{}",
                report.summary(&format!("reference {}", dump.display()), &spec.to_string())
            );
            Ok(Outcome::passed(report.passed()))
        }
    }
}
