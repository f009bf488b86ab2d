//! Next-token prediction (language modelling): logits (batch, T, vocab) against the next tokens (batch, T);
//! the loss is the mean cross-entropy per token, and the headline is the same quantity on the validation
//! split, in nats (lower is better, what the paper reports). The ensemble averages the workers' token
//! distributions and scores the mean distribution's cross-entropy.

use super::{Metric, Task};
use crate::spec::EvalMode;
use anyhow::Result;
use candle_core::{Tensor, D};

pub struct NextToken;

/// Sum over the batch's sequences of each sequence's mean negative log-likelihood per token, from
/// per-position log-probabilities `logp` (batch·T, vocab).
fn nll_per_sequence_sum(logp: &Tensor, targets: &[u32], positions: usize) -> Result<f64> {
    let y = Tensor::from_slice(targets, (targets.len(), 1), logp.device())?;
    let picked = logp.gather(&y, 1)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    Ok(-picked / positions as f64)
}

impl Task for NextToken {
    fn metric(&self) -> Metric {
        Metric::loss("nll", "loss per token (nats)")
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }

    /// Each sequence's mean cross-entropy per token, summed over the batch.
    fn score(&self, logits: &Tensor, targets: &[u32]) -> Result<f64> {
        let t = logits.dim(1)?;
        let logp = candle_nn::ops::log_softmax(&logits.flatten_to(1)?, D::Minus1)?;
        nll_per_sequence_sum(&logp, targets, t)
    }

    fn ensemble_member(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax_last_dim(logits)
    }

    fn ensemble_loss(&self, probs: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::nll(&probs.flatten_to(1)?.clamp(1e-12f32, 1f32)?.log()?, &targets.flatten_all()?)
    }

    /// The mean distribution's cross-entropy per token (clamped away from 0), summed over sequences.
    fn ensemble_score(&self, probs: &Tensor, targets: &[u32]) -> Result<f64> {
        let t = probs.dim(1)?;
        nll_per_sequence_sum(&probs.flatten_to(1)?.clamp(1e-12f32, 1f32)?.log()?, targets, t)
    }

    /// No recalibration: a decoder's RMSNorms keep no statistics to recompute.
    fn eval_modes(&self) -> &'static [EvalMode] {
        &[EvalMode::Full, EvalMode::Scaled, EvalMode::Ensemble, EvalMode::SubnetMean]
    }
}
