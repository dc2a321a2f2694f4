//! Files: PyTorch state dicts and their names, pretrained weight files, `.npy` arrays,
//! embedding files and atomic writes.

pub mod atomic;
pub mod embedding_files;
pub mod error;
pub mod host;
pub mod npy;
pub mod regular;
pub mod state_dict;
pub mod weights;

pub use error::{IoError, WeightsError};
