//! Grad-CAM for EVA-X: the pieces [`crate::model::token_cam`] cuts the model into.

use candle_core::Tensor;

use super::EvaX;
use crate::explain::{CamBatch, CamSource};
use crate::model::token_cam::{self, CamLayer, TokenStack};
use crate::model::{ModelError, grad};

impl TokenStack for EvaX {
    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn grid(&self, x: &Tensor) -> Result<(usize, usize), ModelError> {
        self.grid_of(x)
    }

    fn tokens_after(&self, x: &Tensor, n: usize) -> Result<Tensor, ModelError> {
        self.forward_blocks(x, n)
    }

    fn norm1(&self, i: usize, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.blocks[i].norm1.forward(x, self.kernels)?)
    }

    fn block_from_norm1(
        &self,
        i: usize,
        x: &Tensor,
        y: &Tensor,
        grid: (usize, usize),
    ) -> Result<Tensor, ModelError> {
        let rope = self.rope_for(grid)?;
        Ok(grad::block_from_norm1(
            &self.blocks[i],
            x,
            y,
            &rope,
            self.kernels,
        )?)
    }

    fn block(&self, i: usize, x: &Tensor, grid: (usize, usize)) -> Result<Tensor, ModelError> {
        let rope = self.rope_for(grid)?;
        Ok(grad::block(&self.blocks[i], x, &rope, self.kernels)?)
    }

    fn head_logits(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (Some(fc_norm), Some(head)) = (&self.fc_norm, &self.head) else {
            return Err(ModelError::Input(
                "Grad-CAM needs a fine-tuned checkpoint with fc_norm and a classification head"
                    .into(),
            ));
        };
        Ok(grad::head_logits(tokens, fc_norm, head, self.kernels)?)
    }
}

impl CamSource for EvaX {
    fn default_cam_layer(&self) -> String {
        "last".into()
    }

    fn check_cam_layer(&self, layer: &str) -> Result<(), ModelError> {
        CamLayer::parse(layer, self.config.depth).map(|_| ())
    }

    fn activation_grads(
        &self,
        x: &Tensor,
        layer: &str,
        choose: &dyn Fn(usize, &[f32]) -> Vec<usize>,
    ) -> Result<CamBatch, ModelError> {
        token_cam::activation_grads(self, x, layer, choose)
    }
}
