//! Checks of this implementation against recorded outputs: the release's dumps
//! ([`reference`]) and PyTorch's backbone outputs ([`backbone`]), both through [`compare`].

pub mod backbone;
pub mod compare;
pub mod dump;
pub mod reference;
