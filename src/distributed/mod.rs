//! Data-parallel training with one correlation graph over the whole global batch.
//!
//! K processes (ranks) train one model. Every step the class-balanced sampler draws the same
//! global C x P batch on every rank (same seed, same replay); rank r decodes and runs the
//! backbone on its share of the classes only, slots `r*C/K .. (r+1)*C/K` of every view. The
//! backbone features are all-gathered into the global view-major batch, and every rank then
//! computes the embedding head, the graph, the GNN, the synthesis and all losses on the whole
//! batch, redundantly and identically, so that the graph spans all `C*P` nodes exactly as on
//! one device. The gradient of the metric loss with respect to the gathered features is
//! sliced to this rank's rows and pushed through the local backbone; the backbone gradients
//! are then summed across ranks (all-reduce), which is the single-device gradient up to the
//! order of summation. Head, GNN, classifier and proxy gradients are computed from identical
//! inputs by identical code, so they are identical without communication; a periodic
//! checksum of every parameter and buffer proves it and stops the run if they ever drift.
//!
//! The collective operations sit behind [`Collective`]: MPI (cargo feature `distributed`,
//! [`mpi::MpiCollective`]) today, NCCL for CUDA users later.

#[cfg(feature = "distributed")]
pub mod mpi;

use std::hash::Hasher;
use std::rc::Rc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::backbones::Backbone;
use crate::io::host::host_values;
use crate::train::step::{BackboneBackward, FeatureExchange};

/// Why a data-parallel run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error(
        "{classes} classes per batch cannot be shared among {ranks} processes: the process count must divide `data.classes_per_batch`"
    )]
    Indivisible { classes: usize, ranks: usize },
    #[error(
        "`model.batch_norm = \"train\"` normalises the backbone with batch statistics, which each process would take over its own share only; data-parallel training needs \"eval\" or \"frozen\" (synchronised BatchNorm is not implemented)"
    )]
    BatchStatistics,
    #[error(
        "the processes' parameters differ after epoch {epoch} step {step} (checksums by rank: {checksums}); they must stay bit-identical, so the run stops"
    )]
    Drift {
        epoch: usize,
        step: usize,
        checksums: String,
    },
    #[error("collective `{what}` failed: {message}")]
    Collective { what: &'static str, message: String },
}

/// The collective operations data-parallel training needs. Every rank calls the same
/// operations in the same order; each call returns once all ranks have contributed.
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// This process's rank among those on its machine (picks its GPU).
    fn local_rank(&self) -> usize;
    /// The number of processes on this machine (share its CPU cores).
    fn local_size(&self) -> usize;
    /// Every rank's `local` (all of the same length), concatenated in rank order.
    fn all_gather(&self, what: &'static str, local: &[f32]) -> Result<Vec<f32>, DistributedError>;
    /// Element-wise sum over all ranks, in place; every rank gets the same result.
    fn all_reduce_sum(
        &self,
        what: &'static str,
        values: &mut [f32],
    ) -> Result<(), DistributedError>;
    /// Element-wise maximum over all ranks, in place.
    fn all_reduce_max(
        &self,
        what: &'static str,
        values: &mut [u64],
    ) -> Result<(), DistributedError>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, what: &'static str, value: u64) -> Result<Vec<u64>, DistributedError>;
    /// Waits for every rank, without the collective timeout: the other ranks wait here while
    /// rank 0 evaluates and writes checkpoints, which may take long.
    fn wait_for_all(&self, what: &'static str) -> Result<(), DistributedError>;
    /// Bytes this rank has handed to and received from collectives so far.
    fn traffic(&self) -> Traffic;
}

/// Payload bytes through the collectives, counted by this rank: for an all-gather the bytes
/// it receives (the global buffer), for an all-reduce the buffer it reduces. What crosses
/// the wire depends on the algorithm (a ring all-reduce sends and receives `2(K-1)/K` times
/// the buffer per rank); BENCHMARKS.md works that out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub gather_bytes: u64,
    pub reduce_bytes: u64,
    pub small_bytes: u64,
}

/// A data-parallel run's settings.
#[derive(Clone)]
pub struct Distributed {
    pub collective: Rc<dyn Collective>,
    /// Compare parameter checksums across ranks every this many steps (and after every epoch).
    pub checksum_every: usize,
    /// Test only: each rank builds its graph from its own share and the gradients are
    /// averaged, as a plain data-parallel wrapper would do. It does not reproduce the
    /// single-device run; the equivalence test shows that it fails.
    pub local_graph: bool,
}

impl std::fmt::Debug for Distributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributed")
            .field("rank", &self.collective.rank())
            .field("size", &self.collective.size())
            .field("checksum_every", &self.checksum_every)
            .field("local_graph", &self.local_graph)
            .finish()
    }
}

/// How the class slots of a global batch are shared among ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    /// C of the global batch.
    pub classes: usize,
    /// P.
    pub per_class: usize,
}

impl Shard {
    pub fn new(
        rank: usize,
        ranks: usize,
        classes: usize,
        per_class: usize,
    ) -> Result<Self, DistributedError> {
        if ranks == 0 || !classes.is_multiple_of(ranks) {
            return Err(DistributedError::Indivisible { classes, ranks });
        }
        Ok(Self {
            rank,
            ranks,
            classes,
            per_class,
        })
    }

    /// Class slots per rank.
    pub fn local_classes(&self) -> usize {
        self.classes / self.ranks
    }

    /// The rows of the global view-major batch this rank holds, in its own view-major order:
    /// `v*C + r*C/K + c` for view v and local slot c.
    pub fn rows(&self) -> Vec<usize> {
        let cl = self.local_classes();
        (0..self.per_class)
            .flat_map(|v| (0..cl).map(move |c| v * self.classes + self.rank * cl + c))
            .collect()
    }

    /// Reorders an all-gather of every rank's `[P*C/K, width]` rows (rank-major) into the
    /// global view-major `[C*P, width]` batch.
    pub fn global_order(&self, gathered: &[f32], width: usize) -> Vec<f32> {
        let cl = self.local_classes();
        let per_rank = self.per_class * cl * width;
        let mut out = Vec::with_capacity(gathered.len());
        for v in 0..self.per_class {
            for r in 0..self.ranks {
                let start = r * per_rank + v * cl * width;
                out.extend_from_slice(&gathered[start..start + cl * width]);
            }
        }
        out
    }
}

/// The data-parallel [`FeatureExchange`] of one step.
pub struct Exchange<'a> {
    pub collective: &'a dyn Collective,
    pub shard: Shard,
    pub local_graph: bool,
    /// This rank's features, tracked by autodiff, while the backbone trains.
    local: Option<Tensor<2>>,
    /// The gathered features: a leaf whose gradient is the upstream gradient of every rank.
    global: Option<Tensor<2>>,
}

impl<'a> Exchange<'a> {
    pub fn new(collective: &'a dyn Collective, shard: Shard, local_graph: bool) -> Self {
        Self {
            collective,
            shard,
            local_graph,
            local: None,
            global: None,
        }
    }

    /// Sums (or, for the local-graph variant, averages) the gradients of `module` across
    /// ranks in one buffer.
    fn reduce<M: Module>(
        &self,
        module: &M,
        mut grads: GradientsParams,
        average: bool,
    ) -> Result<GradientsParams, DistributedError> {
        let mut flat = Flatten {
            grads: &mut grads,
            values: Vec::new(),
            parts: Vec::new(),
        };
        module.visit(&mut flat);
        let Flatten {
            mut values, parts, ..
        } = flat;
        if values.is_empty() {
            return Ok(grads);
        }
        self.collective
            .all_reduce_sum("backbone gradients", &mut values)?;
        if average {
            let k = self.shard.ranks as f32;
            values.iter_mut().for_each(|v| *v /= k);
        }
        let mut at = 0;
        for part in parts {
            let n: usize = part.shape.iter().product();
            part.register(&mut grads, &values[at..at + n]);
            at += n;
        }
        Ok(grads)
    }
}

/// One parameter's gradient in the flat buffer of an all-reduce.
struct FlatPart {
    id: burn::module::ParamId,
    shape: Vec<usize>,
    device: burn::tensor::Device,
}

impl FlatPart {
    fn register(&self, grads: &mut GradientsParams, values: &[f32]) {
        let data = TensorData::new(values.to_vec(), self.shape.clone());
        match self.shape.len() {
            1 => grads.register::<1>(self.id, Tensor::from_data(data, &self.device)),
            2 => grads.register::<2>(self.id, Tensor::from_data(data, &self.device)),
            3 => grads.register::<3>(self.id, Tensor::from_data(data, &self.device)),
            4 => grads.register::<4>(self.id, Tensor::from_data(data, &self.device)),
            d => unreachable!("no parameter of this model has {d} dimensions"),
        }
    }
}

struct Flatten<'g> {
    grads: &'g mut GradientsParams,
    values: Vec<f32>,
    parts: Vec<FlatPart>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.parts.push(FlatPart {
                id: param.id,
                shape: g.dims().to_vec(),
                device: g.device(),
            });
            self.values.extend(host_values(g));
        }
    }
}

impl FeatureExchange for Exchange<'_> {
    type Error = DistributedError;

    fn features(&mut self, local: Tensor<2>) -> Result<Tensor<2>, DistributedError> {
        if self.local_graph {
            return Ok(local);
        }
        let [rows, width] = local.dims();
        let device = local.device();
        let tracked = local.is_tracked();
        let gathered = self
            .collective
            .all_gather("backbone features", &host_values(local.clone().detach()))?;
        let global = self.shard.global_order(&gathered, width);
        let mut global = Tensor::<2>::from_data(
            TensorData::new(global, [rows * self.shard.ranks, width]),
            &device,
        );
        if tracked {
            global = global.require_grad();
            self.local = Some(local);
        }
        self.global = Some(global.clone());
        Ok(global)
    }

    fn backbone_gradients(
        &mut self,
        grads: &mut Gradients,
        backbone: &Backbone,
    ) -> Result<GradientsParams, DistributedError> {
        if self.local_graph {
            let g = GradientsParams::from_module(grads, backbone);
            return self.reduce(backbone, g, true);
        }
        let (Some(local), Some(global)) = (self.local.take(), self.global.take()) else {
            // Frozen backbone (warm-up): nothing to send back.
            return Ok(GradientsParams::new());
        };
        let Some(upstream) = global.grad_remove(grads) else {
            return Ok(GradientsParams::new());
        };
        // This rank's rows of d(loss)/d(features), as the single-device backward would hand
        // them to the backbone.
        let [_, width] = upstream.dims();
        // On `local`'s (autodiff) device: the product below must join its graph.
        let device = local.device();
        let all = host_values(upstream);
        let mine: Vec<f32> = self
            .shard
            .rows()
            .into_iter()
            .flat_map(|row| all[row * width..(row + 1) * width].iter().copied())
            .collect();
        let rows = mine.len() / width;
        let upstream = Tensor::<2>::from_data(TensorData::new(mine, [rows, width]), &device);
        let g = BackboneBackward::new(local, Some(upstream)).run(backbone);
        self.reduce(backbone, g, false)
    }

    fn shared_gradients<M: Module>(
        &mut self,
        module: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, DistributedError> {
        if self.local_graph {
            self.reduce(module, grads, true)
        } else {
            Ok(grads)
        }
    }
}

/// A hash of every float parameter and buffer of `module`, bit for bit.
///
/// A parameter not yet initialised (burn initialises lazily, at first use, drawing from the
/// device's generator) counts by its shape only: reading it here would initialise it out of
/// the order a single process uses, and so give it other random values than one process gets.
pub fn checksum<M: Module>(module: &M) -> u64 {
    struct Hash(std::collections::hash_map::DefaultHasher);
    impl ModuleVisitor for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_initialized() {
                self.0.write_u8(0);
                for d in param.lazy_shape().dims::<D>() {
                    self.0.write_usize(d);
                }
                return;
            }
            self.0.write_u8(1);
            for v in host_values(param.val()) {
                self.0.write_u32(v.to_bits());
            }
        }
    }
    let mut h = Hash(Default::default());
    module.visit(&mut h);
    h.0.finish()
}

/// Fails with [`DistributedError::Drift`] unless every rank's `module` hashes alike.
pub fn check_identical<M: Module>(
    collective: &dyn Collective,
    module: &M,
    epoch: usize,
    step: usize,
) -> Result<(), DistributedError> {
    let sums = collective.all_gather_u64("parameter checksums", checksum(module))?;
    if sums.iter().all(|&s| s == sums[0]) {
        return Ok(());
    }
    Err(DistributedError::Drift {
        epoch,
        step,
        checksums: sums
            .iter()
            .enumerate()
            .map(|(r, s)| format!("{r}: {s:016x}"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_global_batch_once_and_gather_back_in_order() {
        let (classes, per_class, width) = (6, 3, 2);
        for ranks in [1, 2, 3, 6] {
            let shards: Vec<Shard> = (0..ranks)
                .map(|r| Shard::new(r, ranks, classes, per_class).unwrap())
                .collect();
            let mut rows: Vec<usize> = shards.iter().flat_map(|s| s.rows()).collect();
            rows.sort();
            assert_eq!(rows, (0..classes * per_class).collect::<Vec<_>>());
            // Each row's values are its global index: gathering must put them back in place.
            let gathered: Vec<f32> = shards
                .iter()
                .flat_map(|s| s.rows())
                .flat_map(|row| std::iter::repeat_n(row as f32, width))
                .collect();
            let global = shards[0].global_order(&gathered, width);
            let expected: Vec<f32> = (0..classes * per_class)
                .flat_map(|row| std::iter::repeat_n(row as f32, width))
                .collect();
            assert_eq!(global, expected, "{ranks} ranks");
            // A rank's rows are whole classes: every view of each of its slots.
            for s in &shards {
                let slots: std::collections::BTreeSet<usize> =
                    s.rows().iter().map(|r| r % classes).collect();
                assert_eq!(slots.len(), classes / ranks);
                assert_eq!(s.rows().len(), per_class * classes / ranks);
            }
        }
    }

    #[test]
    fn a_process_count_that_does_not_divide_the_classes_is_refused() {
        let err = Shard::new(0, 4, 6, 2).unwrap_err().to_string();
        assert!(
            err.contains("6 classes") && err.contains("4 processes"),
            "{err}"
        );
    }
}
