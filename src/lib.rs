//! GCA-HNG: Globally Correlation-aware Hard Negative Generation for deep metric learning
//! (Peng et al., IJCV 2025), on burn.
//!
//! [`method`] is the paper (embedder, graph, GNN, synthesis, losses); [`nn`] the PyTorch-exact
//! building blocks it trains with. Around it: [`backbones`] and [`data`] feed it, [`train`]
//! runs the step and the run loop, [`eval`] measures and retrieves, [`io`] reads and writes
//! files, [`verify`] checks everything against the authors' release, [`bench`] times it.

pub mod backbones;
pub mod backends;
pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod io;
pub mod method;
pub mod nn;
pub mod train;
pub mod verify;
