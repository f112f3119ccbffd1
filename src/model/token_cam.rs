//! Grad-CAM for token models (EVA-X, plain ViTs), computed as pytorch-grad-cam 1.5 does
//! (REFERENCE.md 7): the model runs its inference path up to the target layer; from there on it
//! is rebuilt from differentiable operations with the layer's output as a leaf variable, so one
//! CAM costs a forward pass plus a backward pass through the layers after the target only. A
//! family provides the pieces through [`TokenStack`]; the CAM arithmetic is in
//! [`crate::explain`].

use candle_core::{Tensor, Var};

use super::ModelError;
use crate::explain::CamBatch;

/// Which activation Grad-CAM explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamLayer {
    /// The output of block `i`'s `norm1` (the original's choice for the last block).
    Norm1(usize),
    /// The output of block `i`.
    Output(usize),
}

impl CamLayer {
    /// Parse `last` (the last block's `norm1`), `blocks.N.norm1` or `blocks.N` (negative N
    /// counts from the end) for a model of `depth` blocks.
    pub fn parse(s: &str, depth: usize) -> Result<Self, ModelError> {
        if s == "last" {
            return Ok(CamLayer::Norm1(depth - 1));
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(|| {
            ModelError::Input(format!(
                "layer '{s}': expected last, blocks.N.norm1 or blocks.N"
            ))
        })?;
        let (n, norm1) = match rest.strip_suffix(".norm1") {
            Some(n) => (n, true),
            None => (rest, false),
        };
        let i: i64 = n
            .parse()
            .map_err(|_| ModelError::Input(format!("layer '{s}': bad block index")))?;
        let i = if i < 0 { depth as i64 + i } else { i };
        if i < 0 || i >= depth as i64 {
            return Err(ModelError::Input(format!(
                "layer '{s}': the model has {depth} blocks"
            )));
        }
        Ok(if norm1 {
            CamLayer::Norm1(i as usize)
        } else {
            CamLayer::Output(i as usize)
        })
    }
}

/// The pieces of a transformer (class token first, then the patch tokens) that Grad-CAM needs.
pub trait TokenStack {
    /// Number of blocks.
    fn depth(&self) -> usize;

    /// The patch grid of an input batch.
    fn grid(&self, x: &Tensor) -> Result<(usize, usize), ModelError>;

    /// Token states after the first `n` blocks (inference path).
    fn tokens_after(&self, x: &Tensor, n: usize) -> Result<Tensor, ModelError>;

    /// Block `i`'s first norm of `x` (inference path).
    fn norm1(&self, i: usize, x: &Tensor) -> Result<Tensor, ModelError>;

    /// Block `i` on input `x` with `y = norm1(x)` given separately, differentiably.
    fn block_from_norm1(
        &self,
        i: usize,
        x: &Tensor,
        y: &Tensor,
        grid: (usize, usize),
    ) -> Result<Tensor, ModelError>;

    /// Block `i`, differentiably.
    fn block(&self, i: usize, x: &Tensor, grid: (usize, usize)) -> Result<Tensor, ModelError>;

    /// Class logits from the last token states, differentiably (an error without a head).
    fn head_logits(&self, tokens: &Tensor) -> Result<Tensor, ModelError>;
}

/// Logits, the targets `choose` picks per image, and per round of targets the activations and
/// gradients at `layer` (see [`crate::explain::CamSource::activation_grads`]).
pub fn activation_grads(
    m: &impl TokenStack,
    x: &Tensor,
    layer: &str,
    choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
) -> Result<CamBatch, ModelError> {
    let layer = CamLayer::parse(layer, m.depth())?;
    let grid = m.grid(x)?;
    let (start, leaf, features) = match layer {
        CamLayer::Norm1(i) => {
            let xi = m.tokens_after(x, i)?;
            let y = Var::from_tensor(&m.norm1(i, &xi)?)?;
            let out = m.block_from_norm1(i, &xi, y.as_tensor(), grid)?;
            (i + 1, y, out)
        }
        CamLayer::Output(i) => {
            let y = Var::from_tensor(&m.tokens_after(x, i + 1)?)?;
            let t = y.as_tensor().clone();
            (i + 1, y, t)
        }
    };
    let mut h = features;
    for i in start..m.depth() {
        h = m.block(i, &h, grid)?;
    }
    let logits = m.head_logits(&h)?;
    // Patch tokens only: the class token has no place on the grid.
    let patches = |t: &Tensor| -> candle_core::Result<Tensor> {
        let n = t.dim(1)?;
        t.narrow(1, 1, n - 1)?.contiguous()
    };
    crate::explain::gradient_rounds(&logits, &leaf, &patches, grid, choose)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_parse() {
        assert_eq!(CamLayer::parse("last", 12).unwrap(), CamLayer::Norm1(11));
        assert_eq!(
            CamLayer::parse("blocks.3.norm1", 12).unwrap(),
            CamLayer::Norm1(3)
        );
        assert_eq!(
            CamLayer::parse("blocks.-1", 12).unwrap(),
            CamLayer::Output(11)
        );
        assert!(CamLayer::parse("blocks.12", 12).is_err());
        assert!(CamLayer::parse("head", 12).is_err());
    }
}
