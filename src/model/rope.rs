//! 2-D rotary position embedding of EVA-02 / EVA-X ("fast" variant, interleaved pairs).

/// Per-head rotary dimension split: 32 angles per axis for head_dim 64.
const THETA: f64 = 10000.0;

/// Cos and sin tables, `[grid_h * grid_w, head_dim]`, row-major over the patch grid.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Cosines of the angles.
    pub cos: Vec<f32>,
    /// Sines of the angles.
    pub sin: Vec<f32>,
    /// Rotary width (the head dimension).
    pub dim: usize,
}

/// Angles for one axis of length `n` with reference grid `r`: `[n, half]`, each frequency
/// repeated twice (interleaved), positions `i / n * r`.
fn axis_angles(n: usize, r: f64, half: usize) -> Vec<f64> {
    let nfreq = half / 2;
    let freqs: Vec<f64> = (0..nfreq)
        .map(|j| 1.0 / THETA.powf((2 * j) as f64 / half as f64))
        .collect();
    let mut a = vec![0.0; n * half];
    for i in 0..n {
        let t = i as f64 / n as f64 * r;
        for (j, f) in freqs.iter().enumerate() {
            a[i * half + 2 * j] = t * f;
            a[i * half + 2 * j + 1] = t * f;
        }
    }
    a
}

impl RopeTables {
    /// Tables for a `grid_h x grid_w` patch grid, reference grid `r`, head dimension `head_dim`.
    /// Each token's angles are its row's angles followed by its column's.
    pub fn new((grid_h, grid_w): (usize, usize), r: f64, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let ay = axis_angles(grid_h, r, half);
        let ax = axis_angles(grid_w, r, half);
        let n = grid_h * grid_w;
        let mut cos = Vec::with_capacity(n * head_dim);
        let mut sin = Vec::with_capacity(n * head_dim);
        for y in 0..grid_h {
            for x in 0..grid_w {
                for &a in ay[y * half..(y + 1) * half]
                    .iter()
                    .chain(&ax[x * half..(x + 1) * half])
                {
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        RopeTables {
            cos,
            sin,
            dim: head_dim,
        }
    }
}

impl RopeTables {
    /// No rotary embedding (plain ViTs): empty tables, which the attention kernels skip.
    pub fn none(head_dim: usize) -> Self {
        RopeTables {
            cos: Vec::new(),
            sin: Vec::new(),
            dim: head_dim,
        }
    }
}

/// Recover the reference grid `r` from stored tables `[n*n, 64]` (cos, sin): the angle of the
/// column-x part of token (0, 1) at frequency 1 is `r / n`. Rounded to an integer when it is
/// within 0.05 of one (stored tables are often fp16).
pub fn infer_reference_grid(
    cos: &[f32],
    sin: &[f32],
    tokens: usize,
    head_dim: usize,
) -> Option<f64> {
    let n = (tokens as f64).sqrt().round() as usize;
    if n * n != tokens || n < 2 || cos.len() != tokens * head_dim || sin.len() != cos.len() {
        return None;
    }
    let col = head_dim / 2; // first column-axis angle, frequency 1
    let angle = (sin[head_dim + col] as f64).atan2(cos[head_dim + col] as f64);
    let r = angle * n as f64;
    if !(r.is_finite() && r > 0.0) {
        return None;
    }
    Some(if (r - r.round()).abs() < 0.05 {
        r.round()
    } else {
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_grid_round_trips() {
        for r in [14.0, 16.0] {
            let t = RopeTables::new((14, 14), r, 64);
            assert_eq!(infer_reference_grid(&t.cos, &t.sin, 196, 64), Some(r));
        }
    }

    #[test]
    fn row_part_comes_first() {
        let t = RopeTables::new((3, 3), 3.0, 64);
        // token (1, 0): row angle 1 at frequency 1 in column 0, column part all zero.
        let row = &t.sin[3 * 64..4 * 64];
        assert!((row[0] - 1f32.sin()).abs() < 1e-7);
        assert_eq!(row[32], 0.0);
    }
}
