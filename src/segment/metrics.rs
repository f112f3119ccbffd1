//! mmsegmentation's `IoUMetric`: per class, intersections and unions summed over the whole set
//! (not averaged per image), IoU and Dice from those totals, and their means over the classes
//! that occur (NaN-skipping, as mmseg's `nanmean`).

/// Label value left out of every count (mmseg's `ignore_index`).
pub const IGNORE: u32 = 255;

/// Running totals per class over a set of prediction / label maps.
#[derive(Debug, Clone)]
pub struct IouTotals {
    intersect: Vec<u64>,
    area_pred: Vec<u64>,
    area_label: Vec<u64>,
}

/// Per-class IoU and Dice and their means.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegScores {
    /// IoU per class (NaN for a class absent from both predictions and labels).
    pub iou_per_class: Vec<f64>,
    /// Dice per class.
    pub dice_per_class: Vec<f64>,
    /// Mean IoU over the classes with a value.
    pub miou: f64,
    /// Mean Dice over the classes with a value.
    pub mdice: f64,
}

impl IouTotals {
    /// Empty totals for `classes` classes.
    pub fn new(classes: usize) -> Self {
        IouTotals {
            intersect: vec![0; classes],
            area_pred: vec![0; classes],
            area_label: vec![0; classes],
        }
    }

    /// Add one map pair (equal lengths; labels equal to [`IGNORE`] skipped). Values at or
    /// above the class count are an error naming them.
    pub fn add(&mut self, pred: &[u32], label: &[u32]) -> Result<(), String> {
        if pred.len() != label.len() {
            return Err(format!(
                "prediction has {} pixels, label {}",
                pred.len(),
                label.len()
            ));
        }
        let k = self.intersect.len() as u32;
        for (&p, &l) in pred.iter().zip(label) {
            if l == IGNORE {
                continue;
            }
            if p >= k || l >= k {
                return Err(format!("class {} outside 0..{k}", p.max(l)));
            }
            self.area_pred[p as usize] += 1;
            self.area_label[l as usize] += 1;
            if p == l {
                self.intersect[p as usize] += 1;
            }
        }
        Ok(())
    }

    /// Add counts made elsewhere: per class, intersection, predicted and true pixels.
    pub fn add_counts(&mut self, intersect: &[u64], pred: &[u64], label: &[u64]) {
        for c in 0..self.intersect.len().min(intersect.len()) {
            self.intersect[c] += intersect[c];
            self.area_pred[c] += pred[c];
            self.area_label[c] += label[c];
        }
    }

    /// IoU and Dice from the totals.
    pub fn scores(&self) -> SegScores {
        let per_class = |f: &dyn Fn(f64, f64, f64) -> f64| -> Vec<f64> {
            (0..self.intersect.len())
                .map(|c| {
                    f(
                        self.intersect[c] as f64,
                        self.area_pred[c] as f64,
                        self.area_label[c] as f64,
                    )
                })
                .collect()
        };
        let iou = per_class(&|i, p, l| i / (p + l - i));
        let dice = per_class(&|i, p, l| 2.0 * i / (p + l));
        let nanmean = |v: &[f64]| {
            let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            ok.iter().sum::<f64>() / ok.len() as f64
        };
        SegScores {
            miou: nanmean(&iou),
            mdice: nanmean(&dice),
            iou_per_class: iou,
            dice_per_class: dice,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_over_the_set_not_per_image() {
        let mut t = IouTotals::new(2);
        // Image 1: 1 of 2 foreground pixels found; image 2: all background, one false positive.
        t.add(&[1, 0, 0, 0], &[1, 1, 0, 0]).unwrap();
        t.add(&[1, 0, 0, 255], &[0, 0, 0, 255]).unwrap();
        let s = t.scores();
        // Foreground: I = 1, P = 2, L = 2; background: I = 4, P = 5, L = 5 (the 255 skipped).
        assert_eq!(s.iou_per_class, vec![4.0 / 6.0, 1.0 / 3.0]);
        assert_eq!(s.dice_per_class, vec![8.0 / 10.0, 2.0 / 4.0]);
        assert!(t.add(&[2], &[0]).is_err());
        assert!(t.add(&[0, 1], &[0]).is_err());
    }
}
