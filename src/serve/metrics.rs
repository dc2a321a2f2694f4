//! Counters for `GET /metrics`, written in Prometheus' text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&BUCKETS) {
            if seconds <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(&BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// What the service counts.
#[derive(Default)]
pub struct Metrics {
    /// `(route, status)` -> requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// route -> latency.
    latency: Mutex<BTreeMap<String, Histogram>>,
    embed: Mutex<Histogram>,
    /// Requests refused because the embedding queue was full.
    pub rejected: AtomicU64,
    pub in_flight: AtomicU64,
}

/// Gauges read at the time of the scrape.
pub struct Gauges {
    pub queued: usize,
    pub queue_capacity: usize,
    pub workers: usize,
    pub gallery_rows: usize,
}

impl Metrics {
    pub fn request_done(&self, route: &str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status))
            .or_default() += 1;
        self.latency
            .lock()
            .expect("metrics lock")
            .entry(route.to_string())
            .or_default()
            .observe(took.as_secs_f64());
    }

    pub fn embed_done(&self, took: Duration) {
        self.embed
            .lock()
            .expect("metrics lock")
            .observe(took.as_secs_f64());
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP gca_hng_requests_total HTTP requests answered, by route and status.\n# TYPE gca_hng_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "gca_hng_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP gca_hng_request_duration_seconds Time from request to response, by route.\n# TYPE gca_hng_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().expect("metrics lock").iter() {
            h.write(
                &mut out,
                "gca_hng_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        out.push_str("# HELP gca_hng_embed_duration_seconds Time from queueing an image to its embedding.\n# TYPE gca_hng_embed_duration_seconds histogram\n");
        self.embed.lock().expect("metrics lock").write(
            &mut out,
            "gca_hng_embed_duration_seconds",
            "",
        );
        let gauges = [
            (
                "gca_hng_rejected_total",
                "counter",
                "Requests refused with 503 because the embedding queue was full.",
                self.rejected.load(Ordering::Relaxed) as f64,
            ),
            (
                "gca_hng_in_flight_requests",
                "gauge",
                "Requests being answered.",
                self.in_flight.load(Ordering::Relaxed) as f64,
            ),
            (
                "gca_hng_queue_depth",
                "gauge",
                "Images waiting for an embedding worker.",
                g.queued as f64,
            ),
            (
                "gca_hng_queue_capacity",
                "gauge",
                "Images that may wait before requests are refused.",
                g.queue_capacity as f64,
            ),
            (
                "gca_hng_workers",
                "gauge",
                "Embedding worker threads.",
                g.workers as f64,
            ),
            (
                "gca_hng_gallery_rows",
                "gauge",
                "Images in the gallery.",
                g.gallery_rows as f64,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_cumulative_buckets_and_counts() {
        let m = Metrics::default();
        m.request_done("/search", 200, Duration::from_millis(3));
        m.request_done("/search", 200, Duration::from_millis(30));
        m.request_done("/search", 503, Duration::from_micros(100));
        let text = m.render(&Gauges {
            queued: 2,
            queue_capacity: 8,
            workers: 2,
            gallery_rows: 10,
        });
        assert!(text.contains("gca_hng_requests_total{route=\"/search\",status=\"200\"} 2\n"));
        assert!(text.contains("gca_hng_requests_total{route=\"/search\",status=\"503\"} 1\n"));
        assert!(text.contains(
            "gca_hng_request_duration_seconds_bucket{route=\"/search\",le=\"0.001\"} 1\n"
        ));
        assert!(text.contains(
            "gca_hng_request_duration_seconds_bucket{route=\"/search\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "gca_hng_request_duration_seconds_bucket{route=\"/search\",le=\"+Inf\"} 3\n"
        ));
        assert!(text.contains("gca_hng_queue_depth 2\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
