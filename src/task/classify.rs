//! Image classification: cross-entropy over class logits, accuracy, and the mean softmax as the ensemble.

use super::{Metric, Task};
use anyhow::Result;
use candle_core::Tensor;

/// Class logits of shape (batch, classes) against `u32` labels.
pub struct Classify;

impl Task for Classify {
    fn metric(&self) -> Metric {
        Metric::fraction("acc", "accuracy")
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::cross_entropy(logits, labels)
    }

    /// Correct predictions: the arg-max class equals the label.
    fn score(&self, scores: &Tensor, labels: &[u32]) -> Result<f64> {
        let pred = scores.argmax(1)?.to_vec1::<u32>()?;
        Ok(pred.iter().zip(labels).filter(|(p, t)| p == t).count() as f64)
    }

    fn ensemble_member(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax_last_dim(logits)
    }

    /// Negative log-likelihood of the mean probabilities (clamped away from 0).
    fn ensemble_loss(&self, probs: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::nll(&probs.clamp(1e-12f32, 1f32)?.log()?, labels)
    }
}
