//! Experiment specs: TOML → validated, grid-expanded runs with stable ids (docs/design.md §4).
//!
//! A spec file is one experiment. Any field may hold a list instead of a scalar; lists expand into a grid
//! (cartesian product, times `seeds`). Fields whose value is itself a list (`workload.widths`, …) form a grid
//! axis only when given a list of lists. `--set key.path=value` overrides a field before expansion (a scalar
//! replaces a list). Unknown keys and bad values are errors naming the file, the key and its line.
//!
//! Raw input is validated once here into typed values; the rest of the program never re-checks strings.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// A spec error: usage-level (exit code 2), with the file, key and line where known.
#[derive(Debug)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

// ---------------------------------------------------------------------------------------------------------
// The typed schema of one run (every list resolved to a scalar).

/// Everything that determines one training run. Its hash is the run id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Experiment name (results go to `results/<name>/<run id>/`).
    pub name: String,
    pub seed: u64,
    pub workload: Workload,
    #[serde(default)]
    pub optim: Optim,
    #[serde(default)]
    pub method: Method,
}

/// What is trained: data, model, epochs, batch size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `shapes` | `cifar10` | `cifar100` | `svhn` | `folder:<path>` | `tokens:<dir>`.
    pub dataset: String,
    /// Seed of the generated `shapes` dataset (independent of the run seed, so all runs share the data).
    #[serde(default)]
    pub data_seed: u64,
    /// Training images to use (for `shapes`: to generate). Default: all (`shapes`: 10,000).
    #[serde(default)]
    pub train_samples: Option<usize>,
    /// Test images to use (for `shapes`: to generate). Default: all (`shapes`: 2,000).
    #[serde(default)]
    pub test_samples: Option<usize>,
    /// Tokens per training sequence of a token dataset (`tokens:<dir>`): an example is `context` input
    /// tokens and the `context` tokens that follow each. Default: 128 where a token dataset is used. Left
    /// out of the canonical spec when absent, so run ids of runs without it do not depend on the key existing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// A registered model (`crate::models::names`): `resnet18` | `wrn18` | `resnet` (the same family with
    /// explicit `widths`/`depths`) | `swin_t`.
    pub model: ModelName,
    /// Per-stage widths (Swin: dims), overriding the named model's.
    #[serde(default)]
    pub widths: Option<Vec<usize>>,
    /// Per-stage block counts, overriding the named model's.
    #[serde(default)]
    pub depths: Option<Vec<usize>>,
    /// Normalisation layers: `batch` (BatchNorm) or `none` (identity; used by exactness tests).
    #[serde(default)]
    pub norm: Norm,
    pub epochs: usize,
    /// Per-worker batch size.
    pub batch_size: usize,
    #[serde(default)]
    pub augment: Augment,
    /// Evaluate every this many epochs (the last epoch is always evaluated).
    #[serde(default = "one")]
    pub eval_every: usize,
    /// Test-set batch size for evaluation.
    #[serde(default = "eval_batch")]
    pub eval_batch_size: usize,
    /// Compute precision: `f32` (default) or `bf16` (bf16 activations and convolutions, f32 master
    /// weights, gradients, optimizer state and BatchNorm statistics; ResNet family only). Left out
    /// of the canonical spec when `f32`, so run ids of f32 runs do not depend on the key existing.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The name of a model in the registry of `crate::models`; an unregistered name does not parse.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ModelName(String);

impl ModelName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let names = crate::models::names();
        if names.contains(&name.as_str()) {
            Ok(Self(name))
        } else {
            let expected: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            Err(serde::de::Error::custom(format!("unknown variant `{name}`, expected one of {}", expected.join(", "))))
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    #[default]
    Batch,
    None,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Random-crop padding in pixels (0 disables cropping).
    #[serde(default = "four")]
    pub crop_pad: usize,
    /// Random horizontal flips.
    #[serde(default = "yes")]
    pub flip: bool,
    /// What the random crop reads outside the image: `zero` pixels (the default) or `reflect` (the image
    /// mirrored at its border, torchvision's `padding_mode="reflect"`). Left out of the canonical spec when
    /// `zero`, so run ids of zero-padded runs do not depend on the key existing.
    #[serde(default, skip_serializing_if = "PadMode::is_zero")]
    pub pad_mode: PadMode,
}

impl Default for Augment {
    fn default() -> Self {
        Self { crop_pad: 4, flip: true, pad_mode: PadMode::Zero }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PadMode {
    #[default]
    Zero,
    Reflect,
}

impl PadMode {
    pub fn is_zero(&self) -> bool {
        *self == PadMode::Zero
    }
}

/// The optimizer and its learning-rate schedule.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Optim {
    #[serde(default)]
    pub name: OptimName,
    #[serde(default = "lr_default")]
    pub lr: f64,
    #[serde(default = "momentum_default")]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default = "wd_default")]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: ScheduleName,
    /// Linear warm-up from 0 over this many epochs (fractions allowed).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// `step` schedule: epochs at which the rate is multiplied by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "gamma_default")]
    pub gamma: f64,
    /// AdamW betas.
    #[serde(default = "betas_default")]
    pub betas: Vec<f64>,
    #[serde(default = "adam_eps_default")]
    pub eps: f64,
    /// Global-norm gradient clipping: the gradients an optimizer step takes are scaled so that their
    /// joint L2 norm is at most this (PyTorch's `clip_grad_norm_`); 0 turns it off. Each SDP worker clips
    /// its own gradients (docs/protocol.md). Left out of the canonical spec when 0, so run ids of runs
    /// without clipping do not depend on the key existing.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub clip_grad_norm: f64,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

impl Default for Optim {
    fn default() -> Self {
        Self {
            name: OptimName::Sgd,
            lr: lr_default(),
            momentum: momentum_default(),
            nesterov: false,
            weight_decay: wd_default(),
            schedule: ScheduleName::Cosine,
            warmup_epochs: 0.0,
            milestones: vec![],
            gamma: gamma_default(),
            betas: betas_default(),
            eps: adam_eps_default(),
            clip_grad_norm: 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimName {
    #[default]
    Sgd,
    Adamw,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    Constant,
    Step,
    #[default]
    Cosine,
}

/// The algorithm under test.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Method {
    #[serde(default)]
    /// The method under test: a name in the registry of `src/train/methods.rs` (dp, sdp, small_dense, …).
    pub kind: MethodName,
    /// Number of workers K (simulated on one device, or one process per GPU).
    #[serde(default = "one")]
    pub workers: usize,
    /// SDP: masking strategy, a name in the registry of `src/masking/mod.rs` (block, neuron, …).
    #[serde(default = "block")]
    pub masking: String,
    /// SDP: `forward` (workers run their physical subnetwork) or `backward` (full forward, held gradients).
    #[serde(default)]
    pub regime: Regime,
    /// SDP: fraction C of the maskable units each worker holds; every unit is held by m = round(C·K) workers.
    #[serde(default = "coverage_default")]
    pub coverage: f64,
    /// SDP: average parameters after local steps (`params`) or gradients before them (`grads`).
    #[serde(default)]
    pub sync: SyncMode,
    /// SDP with `sync = "params"`: average every this many steps.
    #[serde(default = "one")]
    pub sync_every: usize,
    /// SDP: BatchNorm running statistics of the assembled model: `average` among holders, or `recompute`
    /// on the full model from training data before each evaluation.
    #[serde(default)]
    pub bn_stats: BnStats,
    /// SDP, forward regime: multiply kept activations by 1/keep in training (HeteroFL-style scaler): a held
    /// block's residual branch by K/m, a block's internal activations by n_b / kept_b.
    #[serde(default)]
    pub rescale: bool,
    /// SDP: redraw the masks every this many steps (0: fixed for the run).
    #[serde(default)]
    pub resample_every: usize,
    /// The evaluation mode reported as the headline `test_<metric>` (all modes are recorded).
    #[serde(default)]
    pub eval_mode: EvalMode,
    /// `same_steps`, or `flop_matched` (SDP trains epochs × 1/C).
    #[serde(default)]
    pub budget: Budget,
    /// SDP: every this many steps, record the cosine between each worker's gradient and the full model's
    /// gradient on the same batch (alignment.csv; 0: never).
    #[serde(default)]
    pub align_every: usize,
}

impl Default for Method {
    fn default() -> Self {
        Self {
            kind: MethodName::default(),
            workers: 1,
            masking: block(),
            regime: Regime::Forward,
            coverage: 1.0,
            sync: SyncMode::Params,
            sync_every: 1,
            bn_stats: BnStats::Average,
            rescale: false,
            resample_every: 0,
            eval_mode: EvalMode::Full,
            budget: Budget::SameSteps,
            align_every: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    #[default]
    Forward,
    Backward,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    #[default]
    Params,
    Grads,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BnStats {
    #[default]
    Average,
    Recompute,
}

/// How the model is evaluated (docs/design.md §1, "Evaluation").
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// The assembled full model with BN statistics averaged among holders.
    #[default]
    Full,
    /// The full model after BN recalibration on training data.
    Recal,
    /// The full model with each residual branch scaled by its holder fraction m/K.
    Scaled,
    /// The mean softmax of the K worker subnetworks.
    Ensemble,
    /// The mean accuracy of the individual worker subnetworks.
    SubnetMean,
}

impl EvalMode {
    pub const ALL: [EvalMode; 5] = [Self::Full, Self::Recal, Self::Scaled, Self::Ensemble, Self::SubnetMean];
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Recal => "recal",
            Self::Scaled => "scaled",
            Self::Ensemble => "ensemble",
            Self::SubnetMean => "subnet_mean",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    #[default]
    SameSteps,
    FlopMatched,
}

fn block() -> String {
    "block".into()
}
fn coverage_default() -> f64 {
    1.0
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn eval_batch() -> usize {
    500
}
fn lr_default() -> f64 {
    0.1
}
fn momentum_default() -> f64 {
    0.9
}
fn wd_default() -> f64 {
    5e-4
}
fn gamma_default() -> f64 {
    0.1
}
fn betas_default() -> Vec<f64> {
    vec![0.9, 0.999]
}
fn adam_eps_default() -> f64 {
    1e-8
}

/// Keys whose scalar value is a list: a list there is a value, a list of lists is a grid axis.
const LIST_KEYS: &[&str] = &["workload.widths", "workload.depths", "optim.milestones", "optim.betas"];

impl RunSpec {
    /// The spec with fields that cannot affect the run reset to their defaults, so that equal runs get
    /// equal ids (a grid over `kind = ["dp", "sdp"]` × coverage holds one DP run, not one per coverage).
    fn canonical(mut self) -> Self {
        // Every `method` field that cannot change this run (`method_field_matters`) takes its default,
        // through the serialized form so that the predicate is the only list of such fields.
        let (Ok(serde_json::Value::Object(mut m)), Ok(d)) =
            (serde_json::to_value(&self.method), serde_json::to_value(Method::default()))
        else {
            return self; // plain data: serializing cannot fail
        };
        for (field, v) in m.iter_mut() {
            if !self.method_field_matters(field) {
                *v = d[field.as_str()].clone();
            }
        }
        if let Ok(method) = serde_json::from_value(serde_json::Value::Object(m)) {
            self.method = method;
        }
        self
    }

    /// SDP with m = round(C·K) = K: every worker holds the whole model.
    pub fn full_coverage(&self) -> bool {
        crate::masking::holders(self.method.coverage, self.method.workers) == self.method.workers
    }

    /// Whether `method.<field>` can change what this run computes; [`RunSpec::canonical`] resets the
    /// fields that cannot, and labels leave them out.
    fn method_field_matters(&self, field: &str) -> bool {
        // An unknown method (an error of `validate`) keeps every field.
        self.method.kind.rules().map_or(true, |r| r.field_matters(self, field))
    }

    /// Epochs actually trained (the method's [`MethodRules::train_epochs`]: `flop_matched` SDP trains
    /// epochs × 1/C).
    pub fn train_epochs(&self) -> usize {
        self.method.kind.rules().map_or(self.workload.epochs, |r| r.train_epochs(self))
    }

    /// The stable run id: a hash of the resolved spec (every default filled in).
    pub fn id(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        let d = Sha256::digest(json.as_bytes());
        d.iter().take(5).map(|b| format!("{b:02x}")).collect()
    }

    /// Semantic checks that the type system cannot express; errors name the key.
    fn validate(&self) -> Result<(), (String, String)> {
        let w = &self.workload;
        let o = &self.optim;
        let m = &self.method;
        let err = |k: &str, msg: String| Err((k.to_string(), msg));
        if w.epochs == 0 {
            return err("workload.epochs", "must be at least 1".into());
        }
        if w.batch_size == 0 {
            return err("workload.batch_size", "must be at least 1".into());
        }
        if w.eval_every == 0 {
            return err("workload.eval_every", "must be at least 1".into());
        }
        if w.eval_batch_size == 0 {
            return err("workload.eval_batch_size", "must be at least 1".into());
        }
        for (k, v) in [
            ("workload.train_samples", w.train_samples),
            ("workload.test_samples", w.test_samples),
            ("workload.context", w.context),
        ] {
            if v == Some(0) {
                return err(k, "must be at least 1".into());
            }
        }
        if let Some(ws) = &w.widths {
            if ws.is_empty() || ws.contains(&0) {
                return err("workload.widths", "must be a non-empty list of positive widths".into());
            }
        }
        if let Some(ds) = &w.depths {
            if ds.is_empty() || ds.contains(&0) {
                return err("workload.depths", "must be a non-empty list of positive block counts".into());
            }
        }
        if let (Some(ws), Some(ds)) = (&w.widths, &w.depths) {
            if ws.len() != ds.len() {
                return err("workload.depths", format!("has {} stages but workload.widths has {}", ds.len(), ws.len()));
            }
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return err("optim.lr", format!("must be a positive number, got {}", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return err("optim.momentum", format!("must be in [0, 1), got {}", o.momentum));
        }
        if o.nesterov && o.momentum == 0.0 {
            return err("optim.nesterov", "needs a non-zero optim.momentum".into());
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return err("optim.weight_decay", format!("must be >= 0, got {}", o.weight_decay));
        }
        if !(o.warmup_epochs >= 0.0 && o.warmup_epochs < w.epochs as f64 + 1e-9) {
            return err(
                "optim.warmup_epochs",
                format!("must be in [0, workload.epochs = {}], got {}", w.epochs, o.warmup_epochs),
            );
        }
        if o.gamma.is_nan() || o.gamma <= 0.0 {
            return err("optim.gamma", format!("must be positive, got {}", o.gamma));
        }
        if o.betas.len() != 2 || o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return err("optim.betas", "must be two numbers in [0, 1)".into());
        }
        if !(o.clip_grad_norm >= 0.0 && o.clip_grad_norm.is_finite()) {
            return err("optim.clip_grad_norm", format!("must be >= 0 (0: no clipping), got {}", o.clip_grad_norm));
        }
        if m.workers == 0 {
            return err("method.workers", "must be at least 1".into());
        }
        if !(m.coverage > 0.0 && m.coverage <= 1.0) {
            return err("method.coverage", format!("must be in (0, 1], got {}", m.coverage));
        }
        if m.rescale && m.regime == Regime::Backward {
            return err("method.rescale", "applies to the forward regime (workers run their subnetworks)".into());
        }
        if m.sync_every == 0 {
            return err("method.sync_every", "must be at least 1".into());
        }
        let rules = m.kind.rules().map_err(|e| ("method.kind".to_string(), e))?;
        if !rules.many_models() && m.eval_mode != EvalMode::Full {
            return err("method.eval_mode", "this method has one model: only `full` applies".into());
        }
        Ok(())
    }
}

/// A judgement of one run that `spec` cannot make itself (what its names mean): `Err((key, why))`.
pub type Check<'a> = dyn Fn(&RunSpec) -> Result<(), (String, String)> + 'a;

mod load;
mod method;
pub use load::{parse_checked, Experiment, Run};
pub use method::{Baseline, Dp, MethodName, MethodRules, Needs, Rules, Sdp, RULES};

/// The smallest valid spec (a ResNet-18 on `shapes` for one epoch), which unit tests extend.
#[cfg(test)]
pub(crate) const MIN_SPEC: &str = r#"
name = "t"
[workload]
dataset = "shapes"
model = "resnet18"
epochs = 1
batch_size = 8
"#;

#[cfg(test)]
mod tests {
    use super::load::key_line;
    use super::*;

    const MIN: &str = MIN_SPEC;

    #[test]
    fn minimal_spec_gets_defaults() -> Result<()> {
        let e = crate::plan::parse(MIN, Path::new("t.toml"), &[])?;
        assert_eq!(e.runs.len(), 1);
        let s = &e.runs[0].spec;
        assert_eq!(s.optim.lr, 0.1);
        assert_eq!(s.method.workers, 1);
        assert_eq!(s.seed, 0);
        Ok(())
    }

    #[test]
    fn key_lines_are_found() -> Result<()> {
        let doc = toml_edit::ImDocument::parse(MIN.to_string())?;
        assert_eq!(key_line(&doc, "workload.epochs"), Some(6));
        assert_eq!(key_line(&doc, "name"), Some(2));
        assert_eq!(key_line(&doc, "method.workers"), None);
        Ok(())
    }

    #[test]
    fn pad_mode_zero_keeps_the_run_id_and_a_bad_mode_names_the_key() -> Result<()> {
        let plain = crate::plan::parse(MIN, Path::new("t.toml"), &[])?.runs[0].id.clone();
        let zero = crate::plan::parse(MIN, Path::new("t.toml"), &["workload.augment.pad_mode=zero".into()])?;
        assert_eq!(zero.runs[0].id, plain);
        let reflect = crate::plan::parse(MIN, Path::new("t.toml"), &["workload.augment.pad_mode=reflect".into()])?;
        assert_ne!(reflect.runs[0].id, plain);
        assert_eq!(reflect.runs[0].spec.workload.augment.pad_mode, PadMode::Reflect);
        let e = crate::plan::parse(MIN, Path::new("t.toml"), &["workload.augment.pad_mode=mirror".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("workload.augment.pad_mode") && e.contains("mirror") && e.contains("reflect"), "{e}");
        Ok(())
    }

    #[test]
    fn context_is_optional_positive_and_absent_from_ids_when_unset() -> Result<()> {
        let plain = &crate::plan::parse(MIN, Path::new("t.toml"), &[])?.runs[0];
        assert!(!serde_json::to_string(&plain.spec)?.contains("context"));
        let set = crate::plan::parse(MIN, Path::new("t.toml"), &["workload.context=64".into()])?;
        assert_eq!(set.runs[0].spec.workload.context, Some(64));
        assert_ne!(set.runs[0].id, plain.id);
        let e = crate::plan::parse(MIN, Path::new("t.toml"), &["workload.context=0".into()]).unwrap_err().to_string();
        assert!(e.contains("workload.context") && e.contains("must be at least 1"), "{e}");
        let typo = MIN.replace("epochs = 1", "epochs = 1\ncontxt = 64");
        let e = crate::plan::parse(&typo, Path::new("t.toml"), &[]).unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("workload.contxt"), "{e}");
        Ok(())
    }
}
