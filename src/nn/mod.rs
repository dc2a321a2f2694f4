//! Building blocks that behave exactly as PyTorch's: BatchNorm with PyTorch's running
//! statistics and AdamW with PyTorch's bookkeeping.

pub mod adamw;
pub mod batch_norm;
