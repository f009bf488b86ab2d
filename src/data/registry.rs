//! The dataset registry: every dataset a spec can name (`workload.dataset`) is a [`DataSource`] registered
//! under that name. A new dataset is one file implementing the trait and one line in [`BUILT_IN`] (or a
//! [`register`] call from outside the crate).
//!
//! A spec names a source either plainly (`cifar10`) or with an argument after a colon (`folder:<path>`),
//! where the registered line says the source takes one.

use super::source::{DataSource, Request, Shape};
use super::{cifar, folder, svhn, synthetic, tokens, Dataset};
use crate::registry::{Named, Registry};
use crate::spec::Workload;
use anyhow::{bail, Result};
use std::path::Path;

/// A registered source: its spec name, the argument it takes after `name:` (`None`: none), and the source.
#[derive(Clone, Copy)]
pub struct Registered {
    pub name: &'static str,
    pub arg: Option<&'static str>,
    pub source: &'static dyn DataSource,
}

impl Named for Registered {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every built-in dataset. One line per source.
pub const BUILT_IN: &[Registered] = &[
    Registered { name: "shapes", arg: None, source: &synthetic::Shapes },
    Registered { name: "cifar10", arg: None, source: &cifar::CIFAR10 },
    Registered { name: "cifar100", arg: None, source: &cifar::CIFAR100 },
    Registered { name: "svhn", arg: None, source: &svhn::SVHN },
    Registered { name: "folder", arg: Some("path"), source: &folder::Folder },
    Registered { name: "tokens", arg: Some("dir"), source: &tokens::TokenShards },
];

/// The built-in datasets, then those registered while the program runs ([`register`]).
pub static REGISTRY: Registry<Registered> = Registry::new("dataset", BUILT_IN);

/// Registers a source defined outside this crate (a downstream crate, a test) under `name`, after which
/// specs may name it like a built-in one. A name already taken is an error.
pub fn register(name: &'static str, arg: Option<&'static str>, source: &'static dyn DataSource) -> Result<()> {
    REGISTRY.register(Registered { name, arg, source })
}

/// How each registered dataset is written in a spec (`cifar10`, `folder:<path>` …).
pub fn names() -> Vec<String> {
    REGISTRY
        .all()
        .iter()
        .map(|r| match r.arg {
            Some(a) => format!("{}:<{a}>", r.name),
            None => r.name.to_string(),
        })
        .collect()
}

/// A dataset as a spec names it: the registered source and its argument.
#[derive(Clone)]
pub struct DataRef {
    pub entry: Registered,
    pub arg: Option<String>,
}

impl std::fmt::Debug for DataRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataRef({self})")
    }
}

impl std::fmt::Display for DataRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.arg {
            Some(a) => write!(f, "{}:{a}", self.entry.name),
            None => f.write_str(self.entry.name),
        }
    }
}

impl DataRef {
    /// Resolves `workload.dataset`; the error lists what is registered.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let expected = || format!("expected one of {}", names().join(", "));
        let Some(entry) = REGISTRY.find(name) else {
            bail!("unknown dataset `{s}`, {}", expected());
        };
        match (entry.arg, arg) {
            (Some(_), Some(a)) if !a.is_empty() => Ok(Self { entry, arg: Some(a.to_string()) }),
            (None, None) => Ok(Self { entry, arg: None }),
            (Some(a), _) => bail!("dataset `{s}` needs its {a}: `{name}:<{a}>`"),
            (None, Some(_)) => bail!("dataset `{name}` takes no argument after `:`, got `{s}`"),
        }
    }

    /// The request a workload makes of this dataset.
    pub fn request<'a>(&'a self, w: &Workload, data_dir: &'a Path) -> Request<'a> {
        Request {
            data_dir,
            arg: self.arg.as_deref(),
            train: w.train_samples,
            test: w.test_samples,
            seed: w.data_seed,
            context: w.context,
        }
    }

    pub fn source(&self) -> &'static dyn DataSource {
        self.entry.source
    }

    /// The whole splits' shape (a generated source: at the workload's sizes), without decoding images.
    pub fn shape(&self, w: &Workload, data_dir: &Path) -> Result<Shape> {
        self.source().shape(&self.request(w, data_dir))
    }

    /// Loads the dataset, truncated to `train_samples` / `test_samples` by a class-stratified subset
    /// drawn from the data seed (a generated source generates exactly those sizes).
    pub fn load(&self, w: &Workload, data_dir: &Path) -> Result<Dataset> {
        let mut ds = self.source().load(&self.request(w, data_dir))?;
        if !self.source().generated() {
            if let Some(n) = w.train_samples.filter(|&n| n < ds.train.len()) {
                ds.train = ds.train.subset(n, w.data_seed);
            }
            if let Some(n) = w.test_samples.filter(|&n| n < ds.test.len()) {
                ds.test = ds.test.subset(n, w.data_seed);
            }
        }
        Ok(ds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_and_without_arguments() -> Result<()> {
        assert_eq!(DataRef::parse("cifar100")?.to_string(), "cifar100");
        let f = DataRef::parse("folder:imgs/a")?;
        assert_eq!((f.entry.name, f.arg.as_deref()), ("folder", Some("imgs/a")));
        for (bad, says) in [
            ("mnist", "expected one of shapes, cifar10, cifar100, svhn, folder:<path>, tokens:<dir>"),
            ("folder:", "needs its path"),
            ("folder", "needs its path"),
            ("svhn:x", "takes no argument"),
        ] {
            let e = DataRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        Ok(())
    }
}
