//! Maps a layout's original class ids to contiguous labels `0..K`, in sorted id order.

use std::collections::BTreeMap;

use super::{ClassInfo, ImageSource, Sample, Split};

/// One image as a reader finds it: its class's sort key (numeric ids sort as numbers),
/// original id and name, and where its pixels are.
#[derive(Clone, Debug)]
pub struct Entry<K> {
    pub key: K,
    pub original_id: String,
    pub name: Option<String>,
    pub source: ImageSource,
}

/// Builds splits that share one label mapping (In-Shop's query and gallery must, so that a
/// query's label means the same item in the gallery). Pass one split at a time for
/// independent mappings. Samples keep the order the reader gave them.
pub fn labelled_splits<K: Ord + Clone>(parts: Vec<(&str, Vec<Entry<K>>)>) -> Vec<Split> {
    let mut classes: BTreeMap<K, ClassInfo> = BTreeMap::new();
    for (_, entries) in &parts {
        for e in entries {
            classes.entry(e.key.clone()).or_insert_with(|| ClassInfo {
                original_id: e.original_id.clone(),
                name: e.name.clone(),
            });
        }
    }
    let label_of: BTreeMap<K, usize> = classes
        .keys()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .collect();
    let infos: Vec<ClassInfo> = classes.into_values().collect();
    parts
        .into_iter()
        .map(|(name, entries)| Split {
            name: name.to_string(),
            samples: entries
                .into_iter()
                .map(|e| Sample {
                    label: label_of[&e.key],
                    source: e.source,
                })
                .collect(),
            classes: infos.clone(),
        })
        .collect()
}

/// One split with its own label mapping.
pub fn labelled_split<K: Ord + Clone>(name: &str, entries: Vec<Entry<K>>) -> Split {
    labelled_splits(vec![(name, entries)])
        .pop()
        .expect("one part in, one split out")
}
