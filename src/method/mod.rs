//! The method of the paper, tensors only: the embedder, the correlation graph, the GNN that
//! decodes it, the synthesis of hard negatives and the losses, held together by [`model`].
//!
//! The data flows one way: [`embedder`] -> [`graph`] -> [`gnn`] -> [`synthesis`] ->
//! [`losses`]; `crate::train::step` runs it with the three optimisers.

pub mod embedder;
pub mod gnn;
pub mod graph;
pub mod losses;
pub mod model;
pub mod synthesis;
