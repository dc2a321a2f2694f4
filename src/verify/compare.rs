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
}
