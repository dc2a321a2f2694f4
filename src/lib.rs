//! GCA-HNG: Globally Correlation-aware Hard Negative Generation for deep metric learning
//! (Peng et al., IJCV 2025), on burn.
//!
//! [`method`] is the paper (embedder, graph, GNN, synthesis, losses); [`nn`] the PyTorch-exact
//! building blocks it trains with. Around it: [`backbones`] and [`data`] feed it, [`train`]
//! runs the step and the run loop, [`eval`] measures and retrieves, [`io`] reads and writes
//! files, [`verify`] checks everything against the authors' release, [`bench`] times it.
//! Each area reports its own error enum; [`error::Error`] gathers them for the layers above.

/// `Display` and `FromStr` of enums that derive `clap::ValueEnum`, so that a variant's name
/// on the command line, in messages and (through serde's `rename_all = "kebab-case"`, which
/// spells the same) in files is written in one place: the variant itself.
#[macro_export]
macro_rules! string_forms_from_value_enum {
    ($($t:ty: $what:literal),* $(,)?) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let value = clap::ValueEnum::to_possible_value(self)
                    .expect("no variant is skipped");
                f.write_str(value.get_name())
            }
        }

        impl std::str::FromStr for $t {
            type Err = $crate::error::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <Self as clap::ValueEnum>::from_str(s, false).map_err(|_| {
                    $crate::error::UnknownName {
                        what: $what,
                        given: s.to_string(),
                        expected: <Self as clap::ValueEnum>::value_variants()
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                    }
                })
            }
        }
    )*};
}

pub mod backbones;
pub mod backends;
pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod index;
pub mod io;
pub mod method;
pub mod nn;
pub mod serve;
pub mod train;
pub mod verify;

pub use error::Error;
