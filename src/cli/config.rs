//! `gca-hng config`: the presets, and a configuration resolved to TOML.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use gca_hng::config::{ConfigBase, PRESETS};

use crate::shared::Outcome;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// List the presets.
    List,
    /// Print the full resolved TOML of a preset or a config file, with overrides applied.
    Show {
        /// A preset name (see `config list`).
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        preset: Option<String>,
        /// A TOML config file instead of a preset.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting, e.g. `--set optim.lr=3e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

pub fn run(what: ConfigCommand) -> Result<Outcome> {
    match what {
        ConfigCommand::List => {
            for name in PRESETS {
                println!("{name}");
            }
        }
        ConfigCommand::Show {
            preset,
            config,
            overrides,
        } => {
            let base = match (preset, config) {
                (Some(p), _) => ConfigBase::Preset(p),
                (None, Some(file)) => ConfigBase::File(file),
                (None, None) => anyhow::bail!("give a preset name or --config FILE"),
            };
            print!("{}", base.load()?.with_overrides(&overrides)?.to_toml());
        }
    }
    Ok(Outcome::Success)
}
