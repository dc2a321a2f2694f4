//! Files: PyTorch state dicts and their names, pretrained weight files, `.npy` arrays,
//! embedding files and atomic writes.

pub mod atomic;
pub mod embedding_files;
pub mod host;
pub mod npy;
pub mod state_dict;
pub mod weights;
