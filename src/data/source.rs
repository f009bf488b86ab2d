//! The dataset registry: every dataset a spec can name (`workload.dataset`) is a [`DataSource`] registered
//! under that name. A new dataset is one file implementing the trait and one line in [`BUILT_IN`] (or a
//! [`register`] call from outside the crate).
//!
//! A spec names a source either plainly (`cifar10`) or with an argument after a colon (`folder:<path>`),
//! where the registered line says the source takes one.

use super::examples::{Batch, Input};
use super::fetch::RemoteFile;
use super::{cifar, folder, svhn, synthetic, tokens, Dataset, ImageData};
use crate::registry::{Named, Registry};
use crate::spec::Workload;
use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// What a dataset is without decoding its images.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// Images in the whole train and test splits (a generated source: as many as the request asks for).
    pub train: usize,
    pub test: usize,
    pub classes: usize,
    /// Image height and width.
    pub hw: (usize, usize),
}

/// What a run asks of a source.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The data directory: official files live below it, and a relative argument path is looked up in it.
    pub data_dir: &'a Path,
    /// The text after `name:` in the spec, for sources that take one.
    pub arg: Option<&'a str>,
    /// `workload.train_samples` / `test_samples`.
    pub train: Option<usize>,
    pub test: Option<usize>,
    /// `workload.data_seed`.
    pub seed: u64,
    /// `workload.context`: tokens per sequence, for sources of token sequences (`None`: the source's default).
    pub context: Option<usize>,
}

impl Request<'_> {
    /// The argument as a path under the data directory (an absolute path stays as it is).
    pub fn path(&self) -> PathBuf {
        self.data_dir.join(self.arg.unwrap_or_default())
    }
}

/// A dataset a spec can name.
pub trait DataSource: Send + Sync {
    /// Split sizes, class count and image size, without decoding images (counting files is fine).
    fn shape(&self, req: &Request) -> Result<Shape>;
    /// Both splits, decoded (or generated). A fixed source returns whole splits; the caller takes the
    /// subset a request asks for ([`super::examples::Examples::subset`]: class-stratified for images).
    fn load(&self, req: &Request) -> Result<Dataset>;
    /// Whether the source generates exactly the sizes a request asks for (no subset is then taken).
    fn generated(&self) -> bool {
        false
    }
    /// The official files `sdp data fetch <name>` downloads (none: nothing to fetch).
    fn files(&self) -> Vec<RemoteFile> {
        Vec::new()
    }
    /// The task its examples are for (a [`crate::task::REGISTRY`] name).
    fn task(&self) -> &'static str {
        "classify"
    }
    /// Where the decoded images are cached, if they are (`sdp data info`).
    fn cache(&self, _req: &Request) -> Option<PathBuf> {
        None
    }
    /// `n` examples of random input of this source's kind, with random targets, drawn from `r` (a named
    /// stream of the caller's): what the memory probe, `sdp bench step` and the cost estimate train on
    /// (memory and time do not depend on the values). Images by default: three channels of `shape.hw`
    /// uniform in [-2, 2), labels below `shape.classes`.
    fn random_batch(&self, shape: &Shape, n: usize, r: &mut ChaCha8Rng) -> Batch {
        let (h, w) = shape.hw;
        let x: Vec<f32> = (0..n * 3 * h * w).map(|_| r.random_range(-2.0..2.0)).collect();
        let y: Vec<u32> = (0..n).map(|_| r.random_range(0..shape.classes as u32)).collect();
        Batch { x: Input::F32(x), x_dims: vec![n, 3, h, w], y, y_dims: vec![n] }
    }
}

/// A dataset of fixed, published splits read from official files below the data directory (`cifar10`,
/// `cifar100`, `svhn`): its shape is known without reading them.
pub struct Official {
    pub shape: Shape,
    /// The files `sdp data fetch` downloads.
    pub files: fn() -> Vec<RemoteFile>,
    /// Reads both splits from the data directory.
    pub load: fn(&Path) -> Result<ImageData>,
    /// Where a decoded cache lives, given the data directory.
    pub cache: Option<fn(&Path) -> PathBuf>,
}

impl DataSource for Official {
    fn shape(&self, _: &Request) -> Result<Shape> {
        Ok(self.shape.clone())
    }

    fn load(&self, req: &Request) -> Result<Dataset> {
        Ok((self.load)(req.data_dir)?.into())
    }

    fn files(&self) -> Vec<RemoteFile> {
        (self.files)()
    }

    fn cache(&self, req: &Request) -> Option<PathBuf> {
        self.cache.map(|c| c(req.data_dir))
    }
}

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
