//! Evaluation metrics with the original's semantics (REFERENCE.md 6): per-class AUROC as
//! scikit-learn's `roc_auc_score` (ties count half), mAUC leaving out classes whose labels are
//! all one value, bootstrap confidence intervals, and COVIDx's accuracy, confusion matrix,
//! sensitivity and PPV.

use crate::rng::Rng;

/// Rows of one class sorted by score, grouped into runs of equal scores, for O(n) AUROCs with
/// any row weights.
pub struct RankedClass {
    /// Row indices in ascending score order.
    order: Vec<usize>,
    /// End (exclusive) of each run of tied scores within `order`.
    runs: Vec<usize>,
    /// The binary label of each row.
    positive: Vec<bool>,
    /// False for rows whose label is NaN (left out, e.g. CheXpert's `ignore` policy).
    valid: Vec<bool>,
}

impl RankedClass {
    /// Sort one class's scores (O(n log n)); NaN scores sort last; rows with a NaN label are
    /// left out.
    pub fn new(y_true: &[f64], y_score: &[f64]) -> Self {
        let mut order: Vec<usize> = (0..y_score.len()).collect();
        order.sort_by(|&a, &b| y_score[a].total_cmp(&y_score[b]));
        let mut runs = Vec::new();
        for i in 1..=order.len() {
            if i == order.len() || y_score[order[i]] != y_score[order[i - 1]] {
                runs.push(i);
            }
        }
        RankedClass {
            order,
            runs,
            positive: y_true.iter().map(|&v| v > 0.5).collect(),
            valid: y_true.iter().map(|v| !v.is_nan()).collect(),
        }
    }

    /// AUROC with each row counted `weight[row]` times (None: once), or None when the class
    /// has no positives or no negatives. Mann-Whitney U with ties counted half, which is what
    /// scikit-learn's trapezoidal ROC area gives.
    pub fn auroc(&self, weight: Option<&[u32]>) -> Option<f64> {
        let w = |r: usize| weight.map_or(1.0, |w| w[r] as f64);
        let mut neg_below = 0.0;
        let mut u = 0.0;
        let (mut npos, mut nneg) = (0.0, 0.0);
        let mut start = 0;
        for &end in &self.runs {
            let (mut p, mut n) = (0.0, 0.0);
            for &r in &self.order[start..end] {
                if !self.valid[r] {
                    continue;
                }
                if self.positive[r] {
                    p += w(r);
                } else {
                    n += w(r);
                }
            }
            u += p * (neg_below + 0.5 * n);
            neg_below += n;
            npos += p;
            nneg += n;
            start = end;
        }
        if npos == 0.0 || nneg == 0.0 {
            None
        } else {
            Some(u / (npos * nneg))
        }
    }
}

/// AUROC of one class (None when undefined).
pub fn auroc(y_true: &[f64], y_score: &[f64]) -> Option<f64> {
    RankedClass::new(y_true, y_score).auroc(None)
}

/// Per-class AUROCs and their mean over the defined ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AucSummary {
    /// Per class: the AUROC, or 0 where undefined (as the original records it).
    pub per_class: Vec<f64>,
    /// Classes left out of the mean (all labels one value).
    pub left_out: Vec<usize>,
    /// Mean over the classes with a defined AUROC.
    pub mean: f64,
}

/// Column `c` of a row-major `[n, k]` matrix.
fn column(m: &[f64], k: usize, c: usize) -> Vec<f64> {
    m.iter().skip(c).step_by(k).copied().collect()
}

fn summarize(aucs: Vec<Option<f64>>) -> AucSummary {
    let left_out: Vec<usize> = aucs
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_none())
        .map(|(i, _)| i)
        .collect();
    let defined: Vec<f64> = aucs.iter().flatten().copied().collect();
    let mean = if defined.is_empty() {
        0.0
    } else {
        defined.iter().sum::<f64>() / defined.len() as f64
    };
    AucSummary {
        per_class: aucs.iter().map(|a| a.unwrap_or(0.0)).collect(),
        left_out,
        mean,
    }
}

/// Per-class AUROC of `[n, k]` row-major labels and scores, and the mAUC.
pub fn auc_summary(y_true: &[f64], y_score: &[f64], k: usize) -> AucSummary {
    summarize(
        (0..k)
            .map(|c| auroc(&column(y_true, k, c), &column(y_score, k, c)))
            .collect(),
    )
}

/// A two-sided percentile interval.
pub type Interval = [f64; 2];

/// Bootstrap confidence intervals of the per-class AUROCs and of the mAUC.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bootstrap {
    /// Resamples drawn.
    pub resamples: usize,
    /// Seed.
    pub seed: u64,
    /// Confidence level (0.95).
    pub level: f64,
    /// Per class (None where the class was undefined on the full set).
    pub per_class: Vec<Option<Interval>>,
    /// Of the mean over the classes defined in each resample.
    pub mean: Interval,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Linear interpolation between order statistics (numpy's default).
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Resample rows with replacement `resamples` times (seeded); each class is sorted once and each
/// resample's AUROC is an O(n) pass with row multiplicities.
pub fn bootstrap(
    y_true: &[f64],
    y_score: &[f64],
    k: usize,
    resamples: usize,
    seed: u64,
) -> Bootstrap {
    let n = y_true.len().checked_div(k).unwrap_or(0);
    let ranked: Vec<RankedClass> = (0..k)
        .map(|c| RankedClass::new(&column(y_true, k, c), &column(y_score, k, c)))
        .collect();
    let full: Vec<bool> = ranked.iter().map(|r| r.auroc(None).is_some()).collect();
    let mut rng = Rng::new(seed);
    let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); k];
    let mut means = Vec::with_capacity(resamples);
    let mut counts = vec![0u32; n];
    for _ in 0..resamples {
        counts.iter_mut().for_each(|c| *c = 0);
        for _ in 0..n {
            counts[rng.below(n)] += 1;
        }
        let mut sum = 0.0;
        let mut defined = 0;
        for (c, r) in ranked.iter().enumerate() {
            if let Some(a) = r.auroc(Some(&counts)) {
                per[c].push(a);
                sum += a;
                defined += 1;
            }
        }
        if defined > 0 {
            means.push(sum / defined as f64);
        }
    }
    let level = 0.95;
    let (lo, hi) = ((1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0);
    let interval = |v: &mut Vec<f64>| -> Interval {
        v.sort_by(f64::total_cmp);
        [percentile(v, lo), percentile(v, hi)]
    };
    Bootstrap {
        resamples,
        seed,
        level,
        per_class: per
            .iter_mut()
            .zip(&full)
            .map(|(v, &ok)| (ok && !v.is_empty()).then(|| interval(v)))
            .collect(),
        mean: interval(&mut means),
    }
}

/// Single-label classification summary (COVIDx).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Classification {
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Per class: recall (true positives / actual).
    pub sensitivity: Vec<Option<f64>>,
    /// Per class: precision (true positives / predicted).
    pub ppv: Vec<Option<f64>>,
}

/// Accuracy, confusion matrix, sensitivity and PPV from one-hot labels and scores `[n, k]`
/// (the predicted class is the arg-max score, the true class the arg-max label).
pub fn classification(y_true: &[f64], y_score: &[f64], k: usize) -> Classification {
    let argmax = |r: &[f64]| {
        r.iter()
            .enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0
    };
    let mut confusion = vec![vec![0u64; k]; k];
    for (t, s) in y_true.chunks_exact(k).zip(y_score.chunks_exact(k)) {
        confusion[argmax(t)][argmax(s)] += 1;
    }
    let n: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    Classification {
        accuracy: ratio(correct, n).unwrap_or(0.0),
        sensitivity: (0..k)
            .map(|i| ratio(confusion[i][i], confusion[i].iter().sum()))
            .collect(),
        ppv: (0..k)
            .map(|i| ratio(confusion[i][i], (0..k).map(|t| confusion[t][i]).sum()))
            .collect(),
        confusion,
    }
}

/// A paired bootstrap comparison of two models' scores on the same rows: the difference of
/// their mAUCs (`b` minus `a`) under the same resamples.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Paired {
    /// mAUC(b) - mAUC(a) on all rows.
    pub delta: f64,
    /// Two-sided 95 % percentile interval of the difference.
    pub interval: Interval,
    /// Two-sided p-value of "no difference": twice the smaller share of resamples on either
    /// side of zero, counted as (count + 1) / (resamples + 1), at most 1.
    pub p_value: f64,
    /// Resamples drawn.
    pub resamples: usize,
}

/// Resample rows with replacement (seeded) and compare the mean AUROC over the classes
/// defined in each resample for scores `a` and `b` against the same labels.
pub fn paired_bootstrap(
    y_true: &[f64],
    a: &[f64],
    b: &[f64],
    k: usize,
    resamples: usize,
    seed: u64,
) -> Paired {
    let n = y_true.len().checked_div(k).unwrap_or(0);
    let rank = |s: &[f64]| -> Vec<RankedClass> {
        (0..k)
            .map(|c| RankedClass::new(&column(y_true, k, c), &column(s, k, c)))
            .collect()
    };
    let (ra, rb) = (rank(a), rank(b));
    let mean = |r: &[RankedClass], w: Option<&[u32]>| -> Option<f64> {
        let v: Vec<f64> = r.iter().filter_map(|c| c.auroc(w)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let delta = match (mean(&ra, None), mean(&rb, None)) {
        (Some(x), Some(y)) => y - x,
        _ => f64::NAN,
    };
    let mut rng = Rng::new(seed);
    let mut counts = vec![0u32; n];
    let mut diffs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        counts.iter_mut().for_each(|c| *c = 0);
        for _ in 0..n {
            counts[rng.below(n)] += 1;
        }
        if let (Some(x), Some(y)) = (mean(&ra, Some(&counts)), mean(&rb, Some(&counts))) {
            diffs.push(y - x);
        }
    }
    diffs.sort_by(f64::total_cmp);
    let below = diffs.iter().filter(|&&d| d <= 0.0).count();
    let above = diffs.iter().filter(|&&d| d >= 0.0).count();
    let r = diffs.len();
    let p_value = (2.0 * (below.min(above) + 1) as f64 / (r + 1) as f64).min(1.0);
    Paired {
        delta,
        interval: [percentile(&diffs, 0.025), percentile(&diffs, 0.975)],
        p_value,
        resamples: r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AUROC by comparing every positive with every negative.
    fn pairwise(y: &[f64], s: &[f64]) -> Option<f64> {
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..y.len() {
            for j in 0..y.len() {
                if y[i] > 0.5 && y[j] <= 0.5 {
                    den += 1.0;
                    num += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        (den > 0.0).then(|| num / den)
    }

    #[test]
    fn auroc_equals_brute_force_on_random_data_with_ties() {
        let mut rng = Rng::new(42);
        for trial in 0..200 {
            let n = 1 + rng.below(60);
            let levels = 1 + rng.below(if trial % 2 == 0 { 4 } else { 1000 });
            let y: Vec<f64> = (0..n).map(|_| rng.below(2) as f64).collect();
            let s: Vec<f64> = (0..n)
                .map(|_| rng.below(levels) as f64 / levels as f64)
                .collect();
            match (auroc(&y, &s), pairwise(&y, &s)) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{a} vs {b}"),
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn weighted_auroc_equals_repeated_rows() {
        let y = [1.0, 0.0, 1.0, 0.0, 1.0];
        let s = [0.3, 0.3, 0.9, 0.1, 0.2];
        let w = [2u32, 0, 1, 3, 1];
        let (mut yy, mut ss) = (Vec::new(), Vec::new());
        for i in 0..5 {
            for _ in 0..w[i] {
                yy.push(y[i]);
                ss.push(s[i]);
            }
        }
        let a = RankedClass::new(&y, &s).auroc(Some(&w)).unwrap();
        assert!((a - auroc(&yy, &ss).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn nan_labels_are_left_out() {
        let y = [1.0, f64::NAN, 0.0, 0.0];
        let s = [0.9, 0.0, 0.2, 0.3];
        assert_eq!(auroc(&y, &s), Some(1.0));
    }

    #[test]
    fn undefined_classes_are_left_out() {
        let y = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let s = [0.9, 0.1, 0.2, 0.3, 0.8, 0.4];
        let m = auc_summary(&y, &s, 2);
        assert_eq!(m.left_out, vec![1]);
        assert_eq!(m.per_class[1], 0.0);
        assert_eq!(m.mean, 1.0);
    }

    #[test]
    fn confusion_and_rates() {
        let y = [1., 0., 0., 1., 0., 1.];
        let s = [0.9, 0.1, 0.2, 0.8, 0.7, 0.3];
        let c = classification(&y, &s, 2);
        assert_eq!(c.confusion, vec![vec![1, 0], vec![1, 1]]);
        assert_eq!(c.accuracy, 2.0 / 3.0);
        assert_eq!(c.sensitivity, vec![Some(1.0), Some(0.5)]);
        assert_eq!(c.ppv, vec![Some(0.5), Some(1.0)]);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate() {
        let mut rng = Rng::new(3);
        let n = 400;
        let y: Vec<f64> = (0..n).map(|_| rng.below(2) as f64).collect();
        let s: Vec<f64> = y.iter().map(|&v| v * 0.5 + rng.unit()).collect();
        let b = bootstrap(&y, &s, 1, 200, 0);
        let a = auroc(&y, &s).unwrap();
        let [lo, hi] = b.per_class[0].unwrap();
        assert!(lo < a && a < hi, "{lo} {a} {hi}");
        assert_eq!(b, bootstrap(&y, &s, 1, 200, 0));
    }

    #[test]
    fn paired_bootstrap_separates_a_better_model_and_not_a_copy() {
        let mut r = Rng::new(5);
        let (n, k) = (300, 3);
        let y: Vec<f64> = (0..n * k).map(|_| (r.unit() < 0.3) as u8 as f64).collect();
        // a: weakly informative; b: strongly informative.
        let a: Vec<f64> = y.iter().map(|&t| t * 0.2 + r.unit()).collect();
        let b: Vec<f64> = y.iter().map(|&t| t * 1.5 + r.unit()).collect();
        let p = paired_bootstrap(&y, &a, &b, k, 500, 1);
        assert_eq!(p.resamples, 500);
        let (ma, mb) = (auc_summary(&y, &a, k).mean, auc_summary(&y, &b, k).mean);
        assert!((p.delta - (mb - ma)).abs() < 1e-12);
        assert!(p.delta > 0.2 && p.interval[0] > 0.0, "{p:?}");
        assert!(p.p_value < 0.01, "{p:?}");
        let same = paired_bootstrap(&y, &a, &a, k, 200, 1);
        assert_eq!(
            (same.delta, same.interval, same.p_value),
            (0.0, [0.0, 0.0], 1.0)
        );
    }
}
