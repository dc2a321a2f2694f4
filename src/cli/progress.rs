//! The terminal display of a run: a progress bar per epoch with the running losses, images
//! per second and the time left, a bar while evaluating, and one summary line per epoch.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use gca_hng::eval::metrics::RetrievalMetrics;
use gca_hng::train::step::{Loss, StepMetrics};
use gca_hng::train::{EpochRecord, Observer};

/// Shows a run's progress on the terminal (bars only when stderr is one).
pub struct TerminalProgress {
    /// Printed before every line, e.g. the method's name in the demo.
    label: String,
    bar: Option<ProgressBar>,
    started: Instant,
    images: usize,
    sum_metric: f64,
    sum_gen: f64,
    steps: usize,
    epochs: usize,
}

impl TerminalProgress {
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            bar: None,
            started: Instant::now(),
            images: 0,
            sum_metric: 0.0,
            sum_gen: 0.0,
            steps: 0,
            epochs: 0,
        }
    }

    fn prefix(&self) -> String {
        if self.label.is_empty() {
            String::new()
        } else {
            format!("[{}] ", self.label)
        }
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{}{line}", self.prefix())),
            None => println!("{}{line}", self.prefix()),
        }
    }
}

/// `R@1 54.5 R@2 .. MAP@R 21.5 RP 30.1` for a line of output.
pub fn metrics_line(m: &RetrievalMetrics) -> String {
    let mut ks: Vec<(&String, &f64)> = m.recall.iter().collect();
    ks.sort_by_key(|(k, _)| k.parse::<usize>().unwrap_or(usize::MAX));
    let mut parts: Vec<String> = ks.iter().map(|(k, v)| format!("R@{k} {v:.1}")).collect();
    parts.push(format!("MAP@R {:.1}", m.map_at_r));
    parts.push(format!("RP {:.1}", m.r_precision));
    if let Some(nmi) = m.nmi {
        parts.push(format!("NMI {nmi:.1}"));
    }
    parts.join("  ")
}

impl Observer for TerminalProgress {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, steps: usize, done: usize) {
        self.finish_bar();
        self.epochs = epochs;
        self.started = Instant::now();
        self.images = 0;
        self.sum_metric = 0.0;
        self.sum_gen = 0.0;
        self.steps = 0;
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}epoch {epoch}/{epochs}", self.prefix()));
        bar.set_position(done as u64);
        self.bar = Some(bar);
    }

    fn step_done(&mut self, m: &StepMetrics, images: usize) {
        self.images += images;
        self.steps += 1;
        self.sum_metric += m.j_metric;
        self.sum_gen += m.j_gen;
        if let Some(bar) = &self.bar {
            let rate = self.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let n = self.steps as f64;
            bar.set_message(format!(
                "{} {:.3} {} {:.3} | {rate:.0} img/s",
                Loss::Metric.name(),
                self.sum_metric / n,
                Loss::Gen.name(),
                self.sum_gen / n
            ));
            bar.inc(1);
        }
    }

    fn evaluating(&mut self, split: &str, done: usize, total: usize) {
        if self.bar.as_ref().map(|b| b.length()) != Some(Some(total as u64)) {
            self.finish_bar();
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} images ETA {eta}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("{}embedding {split}", self.prefix()));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    fn epoch_done(&mut self, r: &EpochRecord) {
        self.finish_bar();
        let mut line = if r.epoch == 0 {
            "untrained:".to_string()
        } else {
            let losses: Vec<String> = [Loss::M, Loss::Syn, Loss::Gen]
                .iter()
                .map(|l| l.name())
                .filter_map(|k| Some(format!("{k} {:.3}", r.losses.get(k)?)))
                .collect();
            format!(
                "epoch {}/{}: {}  ({:.0} s, {:.0} img/s{})",
                r.epoch,
                self.epochs,
                losses.join("  "),
                r.train_seconds,
                r.images_per_second,
                if r.backbone_trained { "" } else { ", warm-up" }
            )
        };
        if let Some(v) = &r.validation {
            line.push_str(&format!("\n    validation  {}", metrics_line(v)));
        }
        if let Some(t) = &r.test {
            line.push_str(&format!(
                "\n    test        {}  (evaluated in {:.0} s)",
                metrics_line(t),
                r.eval_seconds
            ));
        }
        self.print(&line);
    }

    fn note(&mut self, message: &str) {
        self.print(message);
    }
}
