//! The release's class-balanced batch sampler (C classes x P images per batch) and the
//! reordering of its class-major batches into the model's view-major layout.
//!
//! Semantics, as the release's `BalancedBatchSampler`: every class's image list is shuffled
//! once; each batch draws C distinct classes at random; each drawn class contributes the next
//! P images of its list, and when fewer than P remain unvisited afterwards the list is
//! reshuffled and restarted. A class with fewer than P images in all gets P independent
//! random draws (with replacement). The state carries over from one epoch to the next.
//! An epoch has `floor(n / (C * P))` batches.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::DataError;
use super::error::BatchError;

/// What to do with a class that has fewer than P images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ShortClass {
    /// Fill its P slots with random draws with replacement (the release's behaviour; In-Shop
    /// and SOP have such classes).
    #[default]
    Resample,
    /// Refuse: an error names the class.
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerConfig {
    /// C: distinct classes per batch.
    pub classes_per_batch: usize,
    /// P: images per class.
    pub per_class: usize,
    pub seed: u64,
    pub short_class: ShortClass,
}

#[derive(Debug)]
pub struct BalancedSampler {
    cfg: SamplerConfig,
    /// Labels that have images, ascending.
    classes: Vec<usize>,
    /// Sample indices of each entry of `classes`, in their current shuffled order.
    lists: Vec<Vec<usize>>,
    /// How many of each list have been handed out since its last shuffle.
    used: Vec<usize>,
    n_samples: usize,
    rng: ChaCha8Rng,
}

impl BalancedSampler {
    /// `labels[i]` is the label of sample `i`; `class_name(label)` names a class in errors.
    pub fn new(
        labels: &[usize],
        cfg: SamplerConfig,
        class_name: impl Fn(usize) -> String,
    ) -> Result<Self, DataError> {
        let (c, p) = (cfg.classes_per_batch, cfg.per_class);
        if c == 0 || p == 0 {
            return Err(BatchError::Empty {
                classes: c,
                per_class: p,
            }
            .into());
        }
        let n_labels = labels.iter().max().map_or(0, |m| m + 1);
        let mut by_label = vec![Vec::new(); n_labels];
        for (i, &l) in labels.iter().enumerate() {
            by_label[l].push(i);
        }
        let (classes, lists): (Vec<usize>, Vec<Vec<usize>>) = by_label
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .unzip();
        if classes.len() < c {
            return Err(BatchError::TooFewClasses {
                have: classes.len(),
                need: c,
            }
            .into());
        }
        if labels.len() < c * p {
            return Err(BatchError::TooFewImages {
                have: labels.len(),
                classes: c,
                per_class: p,
            }
            .into());
        }
        if cfg.short_class == ShortClass::Error
            && let Some((k, l)) = classes.iter().zip(&lists).find(|(_, l)| l.len() < p)
        {
            return Err(BatchError::ShortClass {
                class: class_name(*k),
                have: l.len(),
                need: p,
            }
            .into());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut lists = lists;
        for l in &mut lists {
            l.shuffle(&mut rng);
        }
        Ok(Self {
            cfg,
            used: vec![0; classes.len()],
            classes,
            lists,
            n_samples: labels.len(),
            rng,
        })
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.n_samples / (self.cfg.classes_per_batch * self.cfg.per_class)
    }

    /// The next batch, class-major: entries `c*P .. c*P + P` are the images of class slot c.
    pub fn next_batch(&mut self) -> Vec<usize> {
        let p = self.cfg.per_class;
        let slots = rand::seq::index::sample(
            &mut self.rng,
            self.classes.len(),
            self.cfg.classes_per_batch,
        );
        let mut batch = Vec::with_capacity(self.cfg.classes_per_batch * p);
        for k in slots {
            let list = &mut self.lists[k];
            if self.used[k] + p > list.len() {
                for _ in 0..p {
                    batch.push(list[self.rng.random_range(0..list.len())]);
                }
            } else {
                batch.extend_from_slice(&list[self.used[k]..self.used[k] + p]);
            }
            self.used[k] += p;
            if self.used[k] + p > list.len() {
                list.shuffle(&mut self.rng);
                self.used[k] = 0;
            }
        }
        batch
    }

    /// One epoch of batches.
    pub fn epoch(&mut self) -> Vec<Vec<usize>> {
        (0..self.batches_per_epoch())
            .map(|_| self.next_batch())
            .collect()
    }
}

/// Reorders a class-major batch (`[c*P + v]`) into the model's view-major order: row
/// `v*C + c` is the v-th image of class slot c.
pub fn view_major<T: Clone>(class_major: &[T], classes: usize, per_class: usize) -> Vec<T> {
    assert_eq!(class_major.len(), classes * per_class, "batch is not C x P");
    (0..per_class)
        .flat_map(|v| (0..classes).map(move |c| class_major[c * per_class + v].clone()))
        .collect()
}
