//! GCA-HNG: Globally Correlation-aware Hard Negative Generation for deep metric learning
//! (Peng et al., IJCV 2025), on burn.
//!
//! The data flows one way: backbone -> [`embedding`] -> [`graph`] -> [`gnn`] -> [`synthesis`]
//! -> [`losses`] -> [`optim`], put together by [`train_step`]. [`reference`] checks the whole
//! chain against dumps of the authors' release. [`data`] reads the datasets and feeds batches.

pub mod backbone;
pub mod backbone_check;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod embed;
pub mod embedding;
pub mod evaluation;
pub mod gnn;
pub mod graph;
pub mod losses;
pub mod model;
pub mod norm;
pub mod npy;
pub mod optim;
pub mod progress;
pub mod proxy_anchor;
pub mod reference;
pub mod search;
pub mod state_dict;
pub mod synthesis;
pub mod train_step;
pub mod training;
