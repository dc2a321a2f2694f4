//! `gca-hng weights`: read and convert weight files.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::io::state_dict::StoredDtype;
use gca_hng::io::weights::{inspect_weights, read_weights};

use crate::shared::Outcome;

#[derive(Subcommand)]
pub enum WeightsCommand {
    /// List every tensor: name, shape, stored dtype.
    Inspect { file: PathBuf },
    /// Convert a checkpoint (or safetensors file) to safetensors.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// f32 or f16.
        #[arg(long, default_value = "f32")]
        dtype: StoredDtype,
    },
}

pub fn run(what: WeightsCommand) -> Result<Outcome> {
    match what {
        WeightsCommand::Inspect { file } => {
            let infos = inspect_weights(&file)?;
            for t in &infos {
                println!("{:<60} {:<6} {:?}", t.name, t.dtype, t.shape);
            }
            let values: usize = infos
                .iter()
                .map(|t| t.shape.iter().product::<usize>())
                .sum();
            println!(
                "{}: {} tensors, {values} values",
                file.display(),
                infos.len()
            );
        }
        WeightsCommand::Convert {
            input,
            output,
            dtype,
        } => {
            let dict = read_weights(&input)?;
            dict.replace_safetensors_as(&output, dtype)?;
            println!(
                "{} -> {} ({} tensors, {dtype})",
                input.display(),
                output.display(),
                dict.tensors.len()
            );
        }
    }
    Ok(Outcome::Success)
}
