//! Models: one interface ([`Backbone`], [`Classifier`]), the families behind it (EVA-X today),
//! and the [`registry`] that recognises a checkpoint's family. Kernels live in
//! [`crate::kernels`].
//!
//! Adding a family (a ResNet, a DenseNet, a plain ViT, a segmentation head) means a module
//! here implementing the traits and one entry in [`registry`]; the jobs (`predict`, `embed`,
//! `eval`, `cam`, `cam-eval`) only see `dyn Classifier`.

pub mod adapt;
pub mod cnn;
pub mod convert;
pub mod densenet;
pub mod eva_x;
pub mod grad;
pub mod inspect;
pub mod interp;
pub mod layouts;
pub mod random;
pub mod registry;
pub mod resnet;
pub mod rope;
pub mod token_cam;
pub mod training;
pub mod vit;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

pub use eva_x::train::EvaXTrainable;
pub use eva_x::{EvaX, EvaXConfig, Kind, LoadOptions, LoadReport, ModelError};

use crate::explain::CamSource;
use crate::preprocess::Normalization;
use crate::rng::Rng;

/// Fewest images of one slice in [`in_batch_slices`]: single images measured slower than the
/// whole batch (each dense layer then streams its weights from L3 for too few tokens).
const MIN_SLICE_IMAGES: usize = 2;

/// `f` of the batch `x` `[B, ...]`: on the CPU, one slice of images per thread, computed side
/// by side and joined along the batch axis; elsewhere, or for a batch too small to share, one
/// call. For inference, whose values for an image do not depend on the rest of its batch.
///
/// Each thread then takes its own images through the whole network, its activations in its
/// own caches and no wait for the other threads at the end of every layer (the layers' own
/// tasks still go to an idle thread). On EVA-X-S, batch 16, two threads: 8 % faster than
/// sharing every layer between the threads.
pub(crate) fn in_batch_slices<E>(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor, E> + Sync,
) -> Result<Tensor, E>
where
    E: From<candle_core::Error> + Send,
{
    use rayon::prelude::*;
    let b = x.dims().first().copied().unwrap_or(0);
    let slice = b.div_ceil(rayon::current_num_threads().max(1));
    if !x.device().is_cpu() || slice < MIN_SLICE_IMAGES || slice >= b {
        return f(x);
    }
    let parts = (0..b.div_ceil(slice))
        .into_par_iter()
        .map(|i| f(&x.narrow(0, i * slice, slice.min(b - i * slice))?))
        .collect::<Result<Vec<_>, E>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// An image representation.
#[derive(Debug, Clone)]
pub struct Representation {
    /// `[B, C]`: the pre-logits (pooled features after the family's final norm).
    pub pooled: Tensor,
    /// `[B, T, C]` per-token features, for families that have tokens.
    pub tokens: Option<Tensor>,
}

/// A feature extractor: images `[B, 3, H, W]` (normalised) to features.
pub trait Backbone: Send + Sync {
    /// The architecture's conventional name (`EVA-X-S`).
    fn name(&self) -> String;

    /// Where the weights live and the model computes.
    fn device(&self) -> &Device;

    /// Input sides must be multiples of this (the patch size, or a CNN's total stride).
    fn input_multiple(&self) -> usize;

    /// The input size the weights were trained at.
    fn default_input_size(&self) -> (usize, usize);

    /// The normalisation the original uses with this family.
    fn normalization(&self) -> Normalization;

    /// Layers whose outputs [`Backbone::forward_intermediates`] returns, input to output.
    fn layer_names(&self) -> Vec<String>;

    /// Outputs of the layers at `indices` (into [`Backbone::layer_names`]) as feature maps
    /// `[B, C, h, w]`, in the order asked; the model runs only as far as the deepest one.
    fn forward_intermediates(
        &self,
        x: &Tensor,
        indices: &[usize],
    ) -> Result<Vec<Tensor>, ModelError>;

    /// The representation of a batch.
    fn embed(&self, x: &Tensor) -> Result<Representation, ModelError>;
}

/// A backbone with a classification head, explainable by Grad-CAM.
pub trait Classifier: Backbone + CamSource {
    /// Classes of the head (`None` for weights without one, e.g. MIM pre-training).
    fn num_classes(&self) -> Option<usize>;

    /// Class logits `[B, K]`; an error for weights without a head.
    fn logits(&self, x: &Tensor) -> Result<Tensor, ModelError>;
}

/// Checks a training precision for a model that computes in f32, or in bf16 products on the
/// CPU: otherwise an error, `--precision P` followed by `what`.
pub(crate) fn f32_or_cpu_bf16(
    precision: crate::compute::Precision,
    device: &Device,
    what: &str,
) -> Result<(), ModelError> {
    use crate::compute::Precision;
    match precision {
        Precision::F32 => Ok(()),
        Precision::Bf16 if device.is_cpu() => Ok(()),
        p => Err(ModelError::Input(format!(
            "--precision {} {what}",
            p.name()
        ))),
    }
}

/// A classifier being trained: its parameters as variables, a differentiable forward, and the
/// family's rules for the optimiser's parameter groups. The training engine
/// ([`crate::train::engine`]) sees only this.
pub trait Trainable: Send {
    /// The architecture's conventional name.
    fn name(&self) -> String;

    /// Where the parameters live.
    fn device(&self) -> &Device;

    /// The normalisation the original trains this family with.
    fn normalization(&self) -> Normalization;

    /// Input sides must be multiples of this.
    fn input_multiple(&self) -> usize;

    /// The parameters by name (sorted).
    fn vars(&self) -> &BTreeMap<String, Var>;

    /// State saved and restored with the weights but not optimised (BatchNorm running
    /// statistics, which `forward_train` updates); none by default.
    fn buffers(&self) -> BTreeMap<String, Var> {
        BTreeMap::new()
    }

    /// PyTorch's `model.train()` (true, the default) or `model.eval()` (false): with false,
    /// BatchNorm layers normalise with their running statistics and leave them as they are;
    /// gradients still reach every parameter. A no-op for families without BatchNorm.
    fn set_training(&mut self, _training: bool) {}

    /// The forward's arithmetic (master weights stay f32, as with autocast); families that
    /// have only f32 refuse others in [`Trainable::set_precision`].
    fn precision(&self) -> crate::compute::Precision {
        crate::compute::Precision::F32
    }

    /// Compute the forward in `precision` (see [`Trainable::precision`]).
    fn set_precision(&mut self, precision: crate::compute::Precision) -> Result<(), ModelError> {
        use crate::compute::Precision;
        // bf16 on the CPU trains these families in f32 (the command line says so).
        let cpu_bf16 = precision == Precision::Bf16 && self.device().is_cpu();
        if precision == Precision::F32 || cpu_bf16 {
            Ok(())
        } else {
            Err(ModelError::Input(format!(
                "--precision {} is implemented for EVA-X models only",
                precision.name()
            )))
        }
    }

    /// Logits `[B, K]` of a batch, recording the graph; `drop_path` (stochastic depth) and
    /// any other training-time randomness drawn from `rng` when given.
    fn forward_train(
        &self,
        x: &Tensor,
        drop_path: f64,
        rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor>;

    /// The parameters' gradients by name once `backward` of a loss from
    /// [`Trainable::forward_train`] gave `store` (with those that fused training ops keep
    /// outside candle's graph).
    fn grads(
        &self,
        store: &candle_core::backprop::GradStore,
    ) -> candle_core::Result<crate::train::optim::Grads> {
        Ok(crate::train::optim::grads_by_name(self.vars(), store))
    }

    /// `(lr_scale, weight_decay)` of parameter `name` under the recipe's layer decay and
    /// weight decay.
    fn param_group(&self, name: &str, layer_decay: f64, weight_decay: f64) -> (f64, f64);

    /// An inference model with the current weights.
    fn to_inference(&self) -> Result<Box<dyn Classifier>, ModelError>;

    /// Metadata to store beside the weights so that they load back as this model.
    fn checkpoint_metadata(&self) -> Vec<(String, String)>;

    /// What was dropped or initialised fresh when the starting weights were adapted (a head
    /// of another class count, a missing `fc_norm` or stage), one line each.
    fn init_notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What every patch-token transformer's weights say about its shape: width, patch size, block
/// count, the `pos_embed` grid and the head's classes.
pub(crate) struct TokenGeometry {
    pub dim: usize,
    pub patch_size: usize,
    pub depth: usize,
    pub grid: usize,
    pub num_classes: Option<usize>,
}

/// Read and check [`TokenGeometry`] from `patch_embed.proj.weight`, `blocks.N.*`, `pos_embed`
/// and `head.weight` (`family`, with its article, names the model in messages).
pub(crate) fn token_geometry(
    sd: &BTreeMap<String, crate::checkpoint::Param>,
    family: &str,
) -> Result<TokenGeometry, ModelError> {
    let bad = |m: String| ModelError::Weights(m);
    let pw = sd
        .get("patch_embed.proj.weight")
        .ok_or_else(|| bad("missing patch_embed.proj.weight".into()))?;
    let [dim, 3, p, p2] = pw.shape[..] else {
        return Err(bad(format!(
            "patch_embed.proj.weight has shape {:?}, expected [C, 3, p, p]",
            pw.shape
        )));
    };
    if p != p2 || p == 0 || dim == 0 || dim % 64 != 0 {
        return Err(bad(format!(
            "patch_embed.proj.weight shape {:?} is not {family} patch embedding",
            pw.shape
        )));
    }
    let depth = sd
        .keys()
        .filter_map(|k| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|m| m + 1)
        .ok_or_else(|| bad("no blocks.N.* keys: not a ViT backbone".into()))?;
    let pos = sd
        .get("pos_embed")
        .ok_or_else(|| bad("missing pos_embed".into()))?;
    let n = pos.shape.get(1).copied().unwrap_or(0);
    let g = (n.saturating_sub(1) as f64).sqrt().round() as usize;
    if pos.shape.len() != 3 || g == 0 || g * g + 1 != n || pos.shape[2] != dim {
        return Err(bad(format!(
            "pos_embed has shape {:?}, expected [1, 1 + g*g, {dim}]",
            pos.shape
        )));
    }
    let num_classes = sd
        .get("head.weight")
        .map(|w| w.shape.first().copied().unwrap_or(0));
    if num_classes == Some(0) {
        return Err(bad(
            "head.weight has zero rows: a head without classes".into()
        ));
    }
    Ok(TokenGeometry {
        dim,
        patch_size: p,
        depth,
        grid: g,
        num_classes,
    })
}

/// `patch_embed` and `blocks.0` .. `blocks.{depth-1}`: the layers of a patch-token model.
pub(crate) fn token_layer_names(depth: usize) -> Vec<String> {
    std::iter::once("patch_embed".to_string())
        .chain((0..depth).map(|i| format!("blocks.{i}")))
        .collect()
}

/// [`Backbone::forward_intermediates`] of a patch-token model: `tokens` are the embedded tokens
/// `[B, 1 + gh * gw, C]` (class token first), `block(i, h)` runs block `i`; the patch tokens of
/// the layers at `indices` come back as maps `[B, C, gh, gw]`.
pub(crate) fn token_intermediates(
    depth: usize,
    indices: &[usize],
    grid: (usize, usize),
    tokens: Tensor,
    block: impl Fn(usize, &Tensor) -> Result<Tensor, ModelError>,
) -> Result<Vec<Tensor>, ModelError> {
    let n = depth + 1;
    if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
        return Err(ModelError::Input(format!(
            "layer index {bad} out of range (the model has {n} layers)"
        )));
    }
    let deepest = indices.iter().copied().max().unwrap_or(0);
    let mut h = tokens;
    let mut outs: Vec<Option<Tensor>> = vec![None; n];
    for (layer, out) in outs.iter_mut().enumerate().take(deepest + 1) {
        if layer > 0 {
            h = block(layer - 1, &h)?;
        }
        if indices.contains(&layer) {
            let (b, t, c) = h.dims3()?;
            *out = Some(
                h.narrow(1, 1, t - 1)?
                    .transpose(1, 2)?
                    .reshape((b, c, grid.0, grid.1))?,
            );
        }
    }
    Ok(indices
        .iter()
        .map(|&i| outs[i].clone().expect("computed above"))
        .collect())
}

/// The keys under `prefix` with it removed (renamed by `renames`, `(old, new)` substrings),
/// and the keys outside it.
pub(crate) fn strip_prefix(
    tensors: &BTreeMap<String, crate::checkpoint::Param>,
    prefix: &str,
    renames: &[(&str, &str)],
) -> (BTreeMap<String, crate::checkpoint::Param>, Vec<String>) {
    let mut outside = Vec::new();
    let sd = tensors
        .iter()
        .filter_map(|(k, v)| match k.strip_prefix(prefix) {
            Some(rest) => {
                let mut name = rest.to_string();
                for (old, new) in renames {
                    name = name.replace(old, new);
                }
                Some((name, v.clone()))
            }
            None => {
                outside.push(k.clone());
                None
            }
        })
        .collect();
    (sd, outside)
}

/// Patch embedding as a matrix product: images `[B, 3, gh * p, gw * p]` and the kernel as
/// `[C, 3 * p * p]` (a stride-`p` convolution) to tokens `[B, gh * gw, C]`.
pub fn patch_tokens(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    p: usize,
) -> candle_core::Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    let c = weight.dim(0)?;
    // The product in the weight's type (reduced precision), the tokens in the bias's.
    crate::kernels::patch_rows(&x.to_dtype(weight.dtype())?, p)?
        .matmul(&weight.t()?)?
        .to_dtype(bias.dtype())?
        .broadcast_add(bias)?
        .reshape((b, gh * gw, c))
}

/// The layer index of `name` in `layers`, or an error listing them.
pub fn layer_index(layers: &[String], name: &str) -> Result<usize, ModelError> {
    layers.iter().position(|l| l == name).ok_or_else(|| {
        ModelError::Input(format!(
            "no layer '{name}'; layers are: {}",
            layers.join(", ")
        ))
    })
}
