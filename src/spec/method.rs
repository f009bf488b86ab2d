//! What a spec knows of a training method (`method.kind`): its name, and the facts about it that the spec
//! itself needs to give a run its id and label (which `method.*` fields change what it computes), its epoch
//! count and its validation (whether it has more than one evaluation mode). Everything else a method is (how
//! it trains, what the memory probe, the bench and the figures do with it) lives in `train::methods`, whose
//! `Method` trait extends [`MethodRules`]; `spec` stays below the layers that train.
//!
//! The built-in methods are named here ([`BUILT_IN`]) by types ([`Dp`], [`Sdp`], the [`Baseline`]s) whose
//! [`MethodRules`] (and `Method`) impls live in their files in `src/train/`, so that this module imports
//! nothing above `spec`; a method defined outside the crate is registered with
//! `sdp::train::methods::register`, which registers its rules here too.

use super::RunSpec;
use crate::registry::{Named, Registry};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The facts about a method that the spec layer needs. The built-in methods implement it in `src/train/`.
pub trait MethodRules: Sync + 'static {
    /// The name specs give it in `method.kind` (`"dp"`, `"sdp"`, …).
    fn name(&self) -> &'static str;
    /// Whether `method.<field>` can change what `spec` (a run of this method) computes. Run ids reset the
    /// fields that cannot to their defaults, and labels leave them out; `kind` and `workers` always matter.
    fn field_matters(&self, spec: &RunSpec, field: &str) -> bool;
    /// Epochs this run trains (flop-matched SDP trains more than `workload.epochs`).
    fn train_epochs(&self, spec: &RunSpec) -> usize {
        spec.workload.epochs
    }
    /// Whether the method trains more than one model and so has evaluation modes other than `full`.
    fn many_models(&self) -> bool {
        false
    }
    /// What the method needs of the workload's model family; `plan` checks it before a run starts.
    fn needs(&self) -> Needs {
        Needs::default()
    }
}

/// What a method needs of the model family beyond training it whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The family can be narrowed to other widths (`Family::with_widths`).
    pub narrowing: bool,
    /// The family's networks take per-step drops (`Family::drops`, `Net::forward_dropping`).
    pub drops: bool,
}

/// A registered method's rules, as the registry holds them.
#[derive(Clone, Copy)]
pub struct Rules(pub &'static dyn MethodRules);

impl Named for Rules {
    fn name(&self) -> &'static str {
        self.0.name()
    }
}

/// Data parallelism (rules and training in `src/train/dp.rs`).
pub struct Dp;
/// Subnetwork data parallelism (`src/train/sdp.rs`).
pub struct Sdp;
/// The DP baselines (`src/train/baselines.rs`), which share their training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// DP on a dense model narrowed to an SDP worker's parameter count at `coverage`.
    SmallDense,
    /// DP on the full model; each worker skips each residual branch with probability 1 − coverage per step.
    StochasticDepth,
    /// DP on the full model; each worker drops each internal channel with probability 1 − coverage per step.
    Dropout,
}

/// The built-in methods, in the order figures and tables list them.
const BUILT_IN: &[Rules] = &[
    Rules(&Dp),
    Rules(&Sdp),
    Rules(&Baseline::SmallDense),
    Rules(&Baseline::StochasticDepth),
    Rules(&Baseline::Dropout),
];

/// Every method's rules: the built-in ones, then those registered (`sdp::train::methods::register`).
pub static RULES: Registry<Rules> = Registry::new("method", BUILT_IN);

/// The name of a registered method, as `method.kind` gives it. Serializes as the bare name (`"sdp"`), so
/// that run ids are those of the names; whether the name is registered is checked when a spec is validated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MethodName(String);

impl MethodName {
    pub fn new(name: &str) -> Self {
        Self(name.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The rules of the method named, or an error naming `method.kind` and the registered names.
    pub fn rules(&self) -> Result<&'static dyn MethodRules, String> {
        RULES
            .find(&self.0)
            .map(|r| r.0)
            .ok_or_else(|| format!("unknown method `{}` (registered: {})", self.0, RULES.names().join(", ")))
    }
}

impl Default for MethodName {
    fn default() -> Self {
        Self::new("dp")
    }
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run ids hash the serialized spec: a name must serialize as the bare string the enum it replaced did.
    #[test]
    fn names_serialize_as_bare_strings_default_to_dp_and_resolve() -> Result<()> {
        assert_eq!(serde_json::to_string(&MethodName::default())?, "\"dp\"");
        let built_in = ["dp", "sdp", "small_dense", "stochastic_depth", "dropout"];
        for name in built_in {
            let n: MethodName = serde_json::from_str(&format!("\"{name}\""))?;
            assert_eq!(serde_json::to_string(&n)?, format!("\"{name}\""));
            assert_eq!(n.rules().map(|r| r.name()), Ok(name));
        }
        assert_eq!(RULES.names()[..built_in.len()], built_in);
        let e = MethodName::new("nope").rules().err().unwrap_or_default();
        assert!(e.contains("unknown method `nope` (registered: dp, sdp, small_dense"), "{e}");
        Ok(())
    }
}
