use super::*;
use crate::eval::nmi::normalized_mutual_information;

fn device() -> Device {
    Device::flex()
}

#[test]
fn recall_and_map_on_a_hand_checked_case() {
    // 1-D-like embeddings on a circle: items 0,1 (label 0) close; 2,3 (label 1) close;
    // item 4 (label 0) sits next to label 1's items.
    let pts: [(f32, f32); 5] = [
        (1.0, 0.0),
        (0.99, 0.14),
        (0.0, 1.0),
        (0.14, 0.99),
        (0.3, 0.95),
    ];
    let values: Vec<f32> = pts.iter().flat_map(|&(a, b)| [a, b]).collect();
    let labels = [0, 0, 1, 1, 0];
    let set = Embeddings {
        values: &values,
        labels: &labels,
        dim: 2,
    };
    let m = evaluate(&set, &[1, 2], None, &device()).unwrap();
    // Angles: 0 -> 0°, 1 -> 8.0°, 4 -> 72.5°, 3 -> 82.0°, 2 -> 90°.
    // Nearest neighbours: 0->1 hit, 1->0 hit, 2->3 hit, 3->2 hit (8.0° < 9.5°), 4->3 miss.
    assert!((m.recall["1"] - 80.0).abs() < 1e-9, "{m:?}");
    // Item 4's two nearest (3, 2) are both label 1: still a miss at k = 2.
    assert!((m.recall["2"] - 80.0).abs() < 1e-9, "{m:?}");
    // AP@R: items 0 and 1 (R = 2) find both others first: 1; items 2 and 3 (R = 1): 1;
    // item 4 (R = 2) ranks 3 and 2 first: 0. Mean 4/5.
    assert!((m.map_at_r - 80.0).abs() < 1e-9, "{m:?}");
    assert!((m.r_precision - 80.0).abs() < 1e-9, "{m:?}");
}

#[test]
fn in_shop_rule_counts_items_above_the_best_positive() {
    let q = [1.0f32, 0.0];
    let g = [0.9f32, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 1.0];
    let ql = [5];
    let gl = [1, 2, 5, 5];
    let m = evaluate_query_gallery(
        &Embeddings {
            values: &q,
            labels: &ql,
            dim: 2,
        },
        &Embeddings {
            values: &g,
            labels: &gl,
            dim: 2,
        },
        &[1, 2, 3],
        &device(),
    )
    .unwrap();
    // Two other-label items score above the best positive: a hit from k = 3 on.
    assert_eq!(m.recall["1"], 0.0);
    assert_eq!(m.recall["2"], 0.0);
    assert_eq!(m.recall["3"], 100.0);
}

#[test]
fn queries_without_positives_are_counted_not_averaged() {
    let values = [1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0];
    let labels = [0, 0, 7];
    let m = evaluate(
        &Embeddings {
            values: &values,
            labels: &labels,
            dim: 2,
        },
        &[1],
        None,
        &device(),
    )
    .unwrap();
    assert_eq!(m.queries_without_positives, 1);
    assert!((m.map_at_r - 100.0).abs() < 1e-9);
    assert!((m.recall["1"] - 200.0 / 3.0).abs() < 1e-9);
}

#[test]
fn nmi_is_one_for_separated_clusters_and_low_for_noise() {
    let mut values = Vec::new();
    let mut labels = Vec::new();
    for c in 0..4 {
        for i in 0..10 {
            let angle = c as f32 * 1.5 + i as f32 * 0.001;
            values.extend([angle.cos(), angle.sin()]);
            labels.push(c);
        }
    }
    let set = Embeddings {
        values: &values,
        labels: &labels,
        dim: 2,
    };
    let m = evaluate(&set, &[1], Some(3), &device()).unwrap();
    assert!((m.nmi.unwrap() - 100.0).abs() < 1e-6, "{m:?}");
    let shuffled: Vec<i64> = (0..40).map(|i| (i * 7 % 4) as i64).collect();
    let clusters: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    assert!(normalized_mutual_information(&clusters, &shuffled) < 0.2);
}

#[test]
fn bad_shapes_are_errors() {
    let values = [1.0f32, 0.0, 1.0];
    let labels = [0, 1];
    let err = evaluate(
        &Embeddings {
            values: &values,
            labels: &labels,
            dim: 2,
        },
        &[1],
        None,
        &device(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        EmbeddingsError::Ragged {
            what: "embeddings",
            values: 3,
            dim: 2
        }
    );
    let values = [1.0f32, f32::NAN];
    let err = evaluate(
        &Embeddings {
            values: &values,
            labels: &[0],
            dim: 2,
        },
        &[1],
        None,
        &device(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            EmbeddingsError::NotFinite {
                index: 1,
                row: 0,
                ..
            }
        ),
        "{err}"
    );
}
