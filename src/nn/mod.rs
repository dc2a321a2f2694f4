//! Building blocks that behave exactly as PyTorch's: BatchNorm with PyTorch's running
//! statistics, AdamW with PyTorch's bookkeeping, and autocast-style mixed precision.

pub mod adamw;
pub mod batch_norm;
pub mod precision;
