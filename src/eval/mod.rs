//! Evaluation and retrieval: embedding images with a trained model, the retrieval metrics,
//! exact nearest neighbours and a picture of the results.

pub mod embed;
pub mod grid;
pub mod metrics;
pub mod nmi;
pub mod topk;
