//! Checks of this implementation against recorded outputs: the release's dumps
//! ([`reference`]) and PyTorch's backbone outputs ([`backbone`]).

pub mod backbone;
pub mod reference;
