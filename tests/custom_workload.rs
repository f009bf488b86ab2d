//! A workload of another kind than images, added from outside the crate as a user would add one:
//! next-token prediction on token sequences. Each piece is one type behind one registry call — a split of
//! token sequences (`data::examples::Examples`) served by a dataset source (`data::registry::register`), a
//! task scoring every position's prediction (`task::register`), and a model family that embeds tokens
//! (`models::register`: the residual MLP of `tests/common/mlp.rs` with an embedding stem). DP and SDP
//! (block and neuron masking) then train it through the runner, with every evaluation mode, and its results
//! name its metric; the memory probe and the cost estimate work on it too. Nothing in the crate changed
//! for it.

mod common;

use anyhow::Result;
use candle_core::{Tensor, D};
use common::mlp::Stem;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sdp::data::augment::AugmentCfg;
use sdp::data::examples::{Batch, Examples, Input};
use sdp::data::registry as source;
use sdp::data::source::{DataSource, Request, Shape};
use sdp::data::Dataset;
use sdp::models::{self, Family, ModelArgs};
use sdp::results::{read_csv, read_metrics, WorkerRow};
use sdp::seed::{rng, Stream};
use sdp::task::{self, Metric, Task};
use std::sync::{Arc, Once};

/// Vocabulary size and sequence length.
const VOCAB: usize = 16;
const LEN: usize = 8;

/// Sequences of a toy language whose next token is a function of the current one,
/// `x[i+1] = (5·x[i] + 3) mod VOCAB`, from a random first token. An example's input is positions
/// `0..LEN`, its targets positions `1..=LEN`.
struct Tokens {
    /// `n` rows of `LEN + 1` tokens.
    seqs: Vec<u32>,
}

impl Tokens {
    fn generate(n: usize, r: &mut ChaCha8Rng) -> Self {
        let mut seqs = Vec::with_capacity(n * (LEN + 1));
        for _ in 0..n {
            let mut t = r.random_range(0..VOCAB as u32);
            for _ in 0..=LEN {
                seqs.push(t);
                t = (5 * t + 3) % VOCAB as u32;
            }
        }
        Self { seqs }
    }

    fn row(&self, i: usize) -> &[u32] {
        &self.seqs[i * (LEN + 1)..(i + 1) * (LEN + 1)]
    }

    /// Token ids (batch, LEN) and next tokens (batch, LEN) of sequences `indices`.
    fn take(&self, indices: &[usize]) -> Batch {
        let x = indices.iter().flat_map(|&i| self.row(i)[..LEN].to_vec()).collect();
        let y = indices.iter().flat_map(|&i| self.row(i)[1..].to_vec()).collect();
        let dims = vec![indices.len(), LEN];
        Batch { x: Input::U32(x), x_dims: dims.clone(), y, y_dims: dims }
    }
}

impl Examples for Tokens {
    fn len(&self) -> usize {
        self.seqs.len() / (LEN + 1)
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![LEN]
    }

    /// Nothing to augment.
    fn batch(&self, indices: &[usize], _cfg: &AugmentCfg, _epoch_key: Option<u64>) -> Batch {
        self.take(indices)
    }

    fn subset(&self, n: usize, _seed: u64) -> Arc<dyn Examples> {
        Arc::new(Tokens { seqs: self.seqs[..n.min(self.len()) * (LEN + 1)].to_vec() })
    }
}

/// The dataset `test_tokens`: generated train and test splits of the sizes a spec asks for.
struct TokenSource;

impl DataSource for TokenSource {
    fn shape(&self, req: &Request) -> Result<Shape> {
        Ok(Shape { train: req.train.unwrap_or(256), test: req.test.unwrap_or(64), classes: VOCAB, hw: (1, LEN) })
    }

    fn load(&self, req: &Request) -> Result<Dataset> {
        let s = self.shape(req)?;
        Ok(Dataset {
            name: "test_tokens".into(),
            train: Arc::new(Tokens::generate(s.train, &mut rng(req.seed, Stream::Synthetic, 0, 0))),
            test: Arc::new(Tokens::generate(s.test, &mut rng(req.seed, Stream::Synthetic, 1, 0))),
            classes: (0..VOCAB).map(|t| format!("token{t}")).collect(),
            mean: [0.0; 3],
            std: [1.0; 3],
        })
    }

    fn generated(&self) -> bool {
        true
    }

    fn task(&self) -> &'static str {
        "test_next_token"
    }

    /// Random sequences for the memory probe.
    fn random_batch(&self, _shape: &Shape, n: usize, r: &mut ChaCha8Rng) -> Batch {
        Tokens::generate(n, r).take(&(0..n).collect::<Vec<_>>())
    }
}

/// Next-token prediction: logits (batch, LEN, VOCAB) against targets (batch, LEN); an example scores the
/// fraction of its positions predicted right.
struct NextToken;

impl Task for NextToken {
    fn metric(&self) -> Metric {
        Metric::fraction("tokacc", "next-token accuracy")
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }

    fn score(&self, scores: &Tensor, targets: &[u32]) -> Result<f64> {
        let pred = scores.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        Ok(pred.iter().zip(targets).filter(|(p, t)| p == t).count() as f64 / LEN as f64)
    }

    fn ensemble_member(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax_last_dim(logits)
    }

    fn ensemble_loss(&self, probs: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::nll(&probs.flatten_to(1)?.clamp(1e-12f32, 1f32)?.log()?, &targets.flatten_all()?)
    }
}

/// The residual MLP of `tests/common/mlp.rs` with an embedding stem and a head at every position: logits
/// (batch, LEN, VOCAB).
fn token_mlp(a: &ModelArgs) -> Result<Box<dyn Family>> {
    common::mlp::family(a, Stem::Embed { positions: LEN }, 2)
}

fn register_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        source::register("test_tokens", None, &TokenSource).expect("registering the source");
        task::register("test_next_token", &NextToken).expect("registering the task");
        models::register("test_token_mlp", token_mlp).expect("registering the family");
    });
}

const SPEC: &str = r#"
name = "tokens"
seeds = [0]

[workload]
dataset = "test_tokens"
train_samples = 256
test_samples = 64
model = "test_token_mlp"
widths = [16]
depths = [2]
epochs = 3
batch_size = 16

[optim]
lr = 0.1

[method]
kind = ["dp", "sdp"]
workers = 2
masking = ["block", "neuron"]
coverage = 0.5
"#;

#[test]
fn a_token_workload_trains_under_dp_and_sdp_through_the_runner() -> Result<()> {
    register_once();
    let exp = common::parse_with(SPEC, &[])?;
    assert_eq!(exp.runs.len(), 3, "DP, SDP block, SDP neuron");
    let results = tempfile::tempdir()?;
    let done = sdp::runner::run_all(std::slice::from_ref(&exp), &common::run_options(results.path()))?;
    assert_eq!(done.done, 3);
    for run in &exp.runs {
        let dir = results.path().join("tokens").join(&run.id);
        let metrics = read_metrics(&dir.join("metrics.csv"))?;
        assert_eq!(metrics.metric, "tokacc", "{}", run.label);
        let last = metrics.rows.last().expect("an evaluation");
        // Chance is 1/16: every method learns the toy language's next-token map.
        assert!(last.test_metric > 0.5, "{}: next-token accuracy {}", run.label, last.test_metric);
        if run.spec.method.kind.as_str() == "sdp" {
            let modes: Vec<&str> = last.modes.keys().map(String::as_str).collect();
            assert_eq!(modes, ["ensemble", "full", "recal", "scaled", "subnet_mean"], "{}", run.label);
        }
        // The activation estimate took the token input's shape ([LEN]).
        let workers = read_csv::<WorkerRow>(&dir.join("workers.csv"))?;
        assert!(workers.iter().all(|w| w.activation_bytes_est > 0), "{}: {workers:?}", run.label);
    }
    let (metric, rows) = sdp::results::read_summary(&results.path().join("tokens/summary.csv"))?;
    assert_eq!((metric.as_str(), rows.len()), ("tokacc", 3));
    Ok(())
}

#[test]
fn data_info_describes_a_split_that_is_not_images() -> Result<()> {
    register_once();
    let info = sdp::data::fetch::info("test_tokens", "unused".as_ref())?;
    assert!(info.loadable, "{info}");
    common::check_contains(&info.to_string(), &["train: 256 examples, test: 64 examples, input shape [8], 16 classes"])
}

#[test]
fn the_memory_probe_trains_a_worker_on_the_sources_random_batch() -> Result<()> {
    register_once();
    let exp = common::parse_with(SPEC, &[])?;
    let probe = |i: usize, worker: Option<usize>| {
        sdp::memprobe::probe(&exp.runs[i].spec, worker, 2, &candle_core::Device::Cpu, std::path::Path::new("datasets"))
    };
    let (dp, sdp_block) = (probe(0, None)?, probe(1, Some(0))?);
    // Coverage 0.5 of two blocks: the worker holds the embedding, the head and one block. (The peak bytes
    // are not checked: the probe measures its process, meant to be a fresh one, and tests share theirs.)
    let block = (2 * 16 + 1) * 32;
    assert_eq!(dp.params - sdp_block.params, block, "DP {dp:?}, SDP worker {sdp_block:?}");
    Ok(())
}

#[test]
fn the_cost_estimate_times_steps_on_the_sources_random_batches() -> Result<()> {
    register_once();
    let exp = common::parse_with(SPEC, &[])?;
    let cache = tempfile::tempdir()?;
    let opts = sdp::cost::CostOptions::new("cpu", Some(cache.path().join("times.json")), "datasets".as_ref())?;
    let report = sdp::cost::estimate(std::slice::from_ref(&exp), &opts)?;
    assert_eq!((report.runs.len(), report.measured), (3, 3));
    assert!(report.runs.iter().all(|r| r.total_s() > 0.0), "{:?}", report.runs);
    Ok(())
}
