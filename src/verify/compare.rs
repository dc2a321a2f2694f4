//! The one comparison engine of `verify reference` and `verify backbone`: a tensor against its
//! recorded value under a tolerance, the rows of a check, and the table they print as.

use std::fmt;

use crate::io::state_dict::HostTensor;

/// How a tensor is judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// Max abs error / max abs reference value.
    Relative(f64),
    /// Max abs error <= factor * max abs reference + absolute (gradients, whose scale varies
    /// by orders of magnitude between parameters).
    Gradient { factor: f64, absolute: f64 },
    /// Max abs error.
    Absolute(f64),
    /// Identical (integers).
    Exact,
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relative(r) => write!(f, "rel {r:.0e}"),
            Self::Gradient { factor, absolute } => write!(f, "{factor:.0e}*max+{absolute:.0e}"),
            Self::Absolute(a) => write!(f, "abs {a:.0e}"),
            Self::Exact => f.write_str("exact"),
        }
    }
}

/// One checked item: a compared tensor, or a check that could not compare (then `max_abs`
/// and `relative` are NaN and `note` says why).
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub max_abs: f64,
    pub relative: f64,
    /// What the row was judged by, as printed.
    pub tolerance: String,
    pub ok: bool,
    pub note: Option<String>,
}

impl Row {
    /// A row that failed before any value was compared.
    pub fn failed(
        name: impl Into<String>,
        tolerance: impl fmt::Display,
        note: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            max_abs: f64::NAN,
            relative: f64::NAN,
            tolerance: tolerance.to_string(),
            ok: false,
            note: Some(note.into()),
        }
    }
}

/// The outcome of a check.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Recorded tensors that nothing used or compared.
    pub unchecked: Vec<String>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.ok).count()
    }

    /// Something was compared, all of it passed, and nothing recorded was left out.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.failures() == 0 && self.unchecked.is_empty()
    }

    /// The table of rows (with `only_failures`, of the failed ones) and of unchecked tensors.
    pub fn table(&self, only_failures: bool) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .chain(self.unchecked.iter().map(String::len))
            .max()
            .unwrap_or(0)
            .max("tensor".len());
        let mut out = format!(
            "{:<width$} {:>11} {:>11} {:>16} {:>4}\n",
            "tensor", "max abs err", "rel err", "tolerance", "ok"
        );
        for row in self.rows.iter().filter(|r| !(only_failures && r.ok)) {
            out.push_str(&format!(
                "{:<width$} {:>11.3e} {:>11.3e} {:>16} {:>4}{}\n",
                row.name,
                row.max_abs,
                row.relative,
                row.tolerance,
                if row.ok { "ok" } else { "FAIL" },
                row.note
                    .as_ref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default()
            ));
        }
        for name in &self.unchecked {
            out.push_str(&format!("{name:<width$} not compared: FAIL\n"));
        }
        out
    }

    /// The closing line: `verify <subject>: counts on <device> -> PASS` (or FAIL).
    pub fn summary(&self, subject: &str, device: &str) -> String {
        format!(
            "verify {subject}: {} compared, {} failed, {} not compared on {device} -> {}",
            self.rows.len(),
            self.failures(),
            self.unchecked.len(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table(false))
    }
}

/// Compares `ours` with `reference` value by value (shapes may differ when the counts agree: a
/// file may keep pooled outputs as `[B, C, 1, 1]`). Equal infinities match; a NaN on either
/// side fails the row and shows as NaN, since NaN never equals anything.
pub fn compare(name: &str, ours: &HostTensor, reference: &HostTensor, tolerance: Tolerance) -> Row {
    if ours.numel() != reference.numel() {
        return Row::failed(
            name,
            tolerance,
            format!(
                "shape {:?} against the recorded {:?}",
                ours.shape, reference.shape
            ),
        );
    }
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    let (mut nan_ours, mut nan_reference) = (0usize, 0usize);
    for (&a, &b) in ours.data.iter().zip(&reference.data) {
        nan_ours += usize::from(a.is_nan());
        nan_reference += usize::from(b.is_nan());
        if a.is_nan() || b.is_nan() {
            continue;
        }
        // `a == b` first so that equal infinities count as a match, not as inf - inf = NaN.
        let diff = if a == b { 0.0 } else { (a - b).abs() };
        max_abs = max_abs.max(diff);
        if b.is_finite() {
            max_ref = max_ref.max(b.abs());
        }
    }
    if nan_ours + nan_reference > 0 {
        return Row::failed(
            name,
            tolerance,
            format!("NaN: {nan_ours} in ours, {nan_reference} recorded"),
        );
    }
    let relative = if max_ref > 0.0 {
        max_abs / max_ref
    } else {
        max_abs
    };
    let ok = match tolerance {
        Tolerance::Relative(r) => relative <= r,
        Tolerance::Gradient { factor, absolute } => max_abs <= factor * max_ref + absolute,
        Tolerance::Absolute(a) => max_abs <= a,
        Tolerance::Exact => max_abs == 0.0,
    };
    Row {
        name: name.into(),
        max_abs,
        relative,
        tolerance: tolerance.to_string(),
        ok,
        note: None,
    }
}

/// Compares like [`compare`], except that element `i` may also differ by `slack[i]`: the
/// room the GPU rule ([`AdamWSlack`]) leaves where rounding decides an AdamW update. The
/// printed errors are those of the other elements, judged by `tolerance` alone; the note
/// counts the elements with slack and how many of them needed it. Without slack this is
/// [`compare`].
pub fn compare_with_slack(
    name: &str,
    ours: &HostTensor,
    reference: &HostTensor,
    tolerance: Tolerance,
    slack: &[f64],
) -> Row {
    let relaxed = slack.iter().filter(|&&s| s > 0.0).count();
    if relaxed == 0 || slack.len() != ours.numel() {
        return compare(name, ours, reference, tolerance);
    }
    let whole = compare(name, ours, reference, tolerance);
    if whole.ok || whole.max_abs.is_nan() || ours.numel() != reference.numel() {
        return Row {
            note: Some(format!("{relaxed} elements with slack, none needed")),
            ..whole
        };
    }
    let max_ref = reference
        .data
        .iter()
        .filter(|b| b.is_finite())
        .fold(0.0f64, |m, b| m.max(b.abs()));
    // The largest error `tolerance` allows, as `compare` judges it.
    let base = match tolerance {
        Tolerance::Relative(r) if max_ref > 0.0 => r * max_ref,
        Tolerance::Relative(r) => r,
        Tolerance::Gradient { factor, absolute } => factor * max_ref + absolute,
        Tolerance::Absolute(a) => a,
        Tolerance::Exact => 0.0,
    };
    let (mut max_abs, mut needed, mut within) = (0.0f64, 0usize, true);
    for ((&a, &b), &s) in ours.data.iter().zip(&reference.data).zip(slack) {
        let diff = if a == b { 0.0 } else { (a - b).abs() };
        if s > 0.0 {
            needed += usize::from(diff > base);
            within &= diff <= base + s;
        } else {
            max_abs = max_abs.max(diff);
        }
    }
    let relative = if max_ref > 0.0 {
        max_abs / max_ref
    } else {
        max_abs
    };
    Row {
        name: name.into(),
        max_abs,
        relative,
        tolerance: format!("{tolerance}+slack"),
        ok: within && max_abs <= base,
        note: Some(format!(
            "{relaxed} elements with slack, {needed} needed it{}",
            if within { "" } else { "; beyond it" }
        )),
    }
}

/// The GPU rule for parameters after AdamW steps: which elements' updates rounding decides,
/// and how far that lets a parameter move.
///
/// AdamW moves an element by `lr * m_hat / (sqrt(v_hat) + eps)`, which does not shrink with
/// the gradient: on the first step it is `±lr` whatever the gradient's size. Where the first
/// moment `m` is within the rounding noise of the gradients that made it, the sign of the
/// update is noise, and a device that sums in another order (every GPU, llvmpipe too) moves
/// the element by a full `lr` the other way. Elsewhere the update is determined and the
/// parameter is held to the normal tolerance.
///
/// Fed every gradient the optimiser applied, in order, it follows `m` and its noise bound:
/// a gradient's noise is `noise * max |g|` over its tensor (rounding scales with the largest
/// terms summed), and `m`'s is the same moving average of those bounds. At each step where
/// `|m| <= noise(m)` the element gets slack `2 * lr * U`, `U` being the largest `|m_hat| /
/// sqrt(v_hat)` any gradient history allows at that step (Cauchy-Schwarz: 1 on the first
/// step, barely above 1 on the next ones): both runs may have moved it by up to `U * lr`,
/// in opposite directions. On the CPU no slack is used at all.
#[derive(Clone, Debug)]
pub struct AdamWSlack {
    noise: f64,
    beta_1: f64,
    beta_2: f64,
    m: Vec<f64>,
    m_noise: f64,
    steps: i32,
    slack: Vec<f64>,
}

impl AdamWSlack {
    /// PyTorch's betas (0.9, 0.999); `noise` is the relative rounding noise of a gradient.
    pub fn new(numel: usize, noise: f64) -> Self {
        Self {
            noise,
            beta_1: 0.9,
            beta_2: 0.999,
            m: vec![0.0; numel],
            m_noise: 0.0,
            steps: 0,
            slack: vec![0.0; numel],
        }
    }

    /// One AdamW step that applied `grad` with learning rate `lr`.
    pub fn step(&mut self, grad: &[f64], lr: f64) {
        assert_eq!(grad.len(), self.m.len(), "a gradient of another size");
        self.steps += 1;
        let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        let b1 = self.beta_1;
        self.m_noise = b1 * self.m_noise + (1.0 - b1) * self.noise * scale;
        let bound = 2.0 * lr * self.largest_ratio();
        for ((m, &g), slack) in self.m.iter_mut().zip(grad).zip(&mut self.slack) {
            *m = b1 * *m + (1.0 - b1) * g;
            if m.abs() <= self.m_noise {
                *slack += bound;
            }
        }
    }

    /// `max |m_hat| / sqrt(v_hat)` over all gradient histories of `self.steps` steps.
    fn largest_ratio(&self) -> f64 {
        let t = self.steps;
        let (b1, b2) = (self.beta_1, self.beta_2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        (1..=t)
            .map(|j| {
                let a = (1.0 - b1) * b1.powi(t - j) / c1;
                let b = (1.0 - b2) * b2.powi(t - j) / c2;
                a * a / b
            })
            .sum::<f64>()
            .sqrt()
    }

    /// The slack of each element so far (0 where every update was determined).
    pub fn slack(&self) -> &[f64] {
        &self.slack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> HostTensor {
        HostTensor::new(vec![v.len()], v.to_vec())
    }

    #[test]
    fn nan_never_passes_and_never_prints_as_zero() {
        for (ours, reference) in [
            (t(&[1.0, f64::NAN]), t(&[1.0, 2.0])),
            (t(&[1.0, 2.0]), t(&[1.0, f64::NAN])),
            (t(&[f64::NAN]), t(&[f64::NAN])),
        ] {
            let row = compare("x", &ours, &reference, Tolerance::Relative(1e-4));
            assert!(!row.ok);
            assert!(row.max_abs.is_nan() && row.relative.is_nan());
            let table = Report {
                rows: vec![row],
                unchecked: vec![],
            }
            .to_string();
            assert!(table.contains("NaN") && table.contains("FAIL"), "{table}");
        }
    }

    #[test]
    fn infinities_match_only_themselves() {
        let inf = f64::INFINITY;
        let row = compare("x", &t(&[inf, 1.0]), &t(&[inf, 1.0]), Tolerance::Exact);
        assert!(row.ok && row.max_abs == 0.0);
        let row = compare(
            "x",
            &t(&[inf, 1.0]),
            &t(&[1.0, 1.0]),
            Tolerance::Relative(1e-4),
        );
        assert!(!row.ok && row.max_abs.is_infinite());
        let row = compare("x", &t(&[-inf]), &t(&[inf]), Tolerance::Absolute(1.0));
        assert!(!row.ok);
    }

    #[test]
    fn tolerances_judge_as_documented() {
        let row = compare(
            "x",
            &t(&[1.0, 2.00001]),
            &t(&[1.0, 2.0]),
            Tolerance::Relative(1e-4),
        );
        assert!(row.ok && (row.relative - 5e-6).abs() < 1e-9);
        let row = compare(
            "x",
            &t(&[10.5]),
            &t(&[10.0]),
            Tolerance::Gradient {
                factor: 0.1,
                absolute: 0.0,
            },
        );
        assert!(row.ok);
        let row = compare("x", &t(&[1.0]), &t(&[1.0, 2.0]), Tolerance::Exact);
        assert!(!row.ok && row.note.is_some());
        let report = Report {
            rows: vec![],
            unchecked: vec![],
        };
        assert!(!report.passed(), "comparing nothing is not a pass");
    }

    #[test]
    fn slack_only_where_the_first_moment_is_rounding_noise() {
        let mut rule = AdamWSlack::new(3, 1e-3);
        rule.step(&[1.0, 1e-4, -2e-3], 0.01);
        assert_eq!(rule.slack()[0], 0.0);
        assert!((rule.slack()[1] - 0.02).abs() < 1e-12, "{:?}", rule.slack());
        assert_eq!(rule.slack()[2], 0.0);
        // A history's ratio bound exceeds 1 only slightly.
        assert!((0.999..1.01).contains(&rule.largest_ratio()));
        rule.step(&[1.0, 1.0, 1.0], 0.01);
        assert!(rule.largest_ratio() > 1.0 && rule.largest_ratio() < 1.01);
        assert!(
            (rule.slack()[1] - 0.02).abs() < 1e-12,
            "determined now, slack kept"
        );
    }

    #[test]
    fn slack_relaxes_only_its_elements() {
        let reference = t(&[1.0, 1.0]);
        let ours = t(&[1.0 + 1e-5, 1.0 - 0.02]);
        let strict = compare("p", &ours, &reference, Tolerance::Absolute(5e-5));
        assert!(!strict.ok);
        let row = compare_with_slack(
            "p",
            &ours,
            &reference,
            Tolerance::Absolute(5e-5),
            &[0.0, 0.02],
        );
        assert!(row.ok && row.max_abs < 2e-5, "{row:?}");
        let row = compare_with_slack(
            "p",
            &t(&[1.0 + 1e-4, 1.0]),
            &reference,
            Tolerance::Absolute(5e-5),
            &[0.0, 0.02],
        );
        assert!(!row.ok, "an element without slack keeps the tolerance");
        let row = compare_with_slack(
            "p",
            &t(&[1.0, 1.03]),
            &reference,
            Tolerance::Absolute(5e-5),
            &[0.0, 0.02],
        );
        assert!(!row.ok, "slack has a bound");
    }
}
