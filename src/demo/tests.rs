use super::*;

fn metrics(r1: f64, r10: f64) -> RetrievalMetrics {
    RetrievalMetrics {
        recall: [("1".to_string(), r1), ("10".to_string(), r10)].into(),
        map_at_r: 12.34,
        r_precision: 20.0,
        ..RetrievalMetrics::default()
    }
}

fn method(r1: f64, curve: Vec<(f64, f64)>) -> MethodResults {
    MethodResults {
        mean: metrics(r1, 90.0),
        curves: [("0".to_string(), curve)].into(),
        ..MethodResults::default()
    }
}

#[test]
fn results_table_lists_recalls_in_k_order_and_the_curves_side_by_side() {
    let summary = DemoSummary {
        gca_hng: method(55.0, vec![(0.0, 50.0), (1.0, 55.0)]),
        baseline: method(52.5, vec![(0.0, 50.0)]),
        pretrained_features: Some(metrics(40.0, 80.0)),
        margin_r_at_1: 2.5,
        seed_spread_r_at_1: None,
        verdict: String::new(),
        seeds: vec![0],
        epochs: 1,
        steps_per_epoch: None,
        test_images: 0,
        seconds: 0.0,
    };
    let table = ResultsTable {
        summary: &summary,
        feature_width: 321,
    }
    .to_string();
    let lines: Vec<&str> = table.lines().collect();
    // "10" sorts before "2" as text; the table orders k as numbers.
    assert!(lines[0].starts_with("test classes, final epoch (1 seed)"));
    assert!(lines[0].find("R@1").unwrap() < lines[0].find("R@10").unwrap());
    assert!(
        lines[1].starts_with("pretrained features (321-d)"),
        "{table}"
    );
    assert!(lines[1].contains("  40.0  80.0    12.3    20.0"), "{table}");
    assert!(lines[2].starts_with("baseline (N-pair)"));
    assert!(lines[3].starts_with("GCA-HNG"));
    assert_eq!(lines[4], "");
    assert!(lines[7].ends_with("50.0       50.0     +0.0"), "{table}");
    // Epoch 1 has no baseline value: no margin.
    assert_eq!(lines[8].trim_end(), "              1      55.0");
    assert!(table.ends_with('\n'));
}
