//! What a dataset is to the suite: the [`DataSource`] trait every dataset a spec can name implements, the
//! [`Shape`] of its splits and the [`Request`] a run makes of it. The sources are listed by name in
//! `registry.rs`: a new dataset is one file implementing the trait and one line there (or a
//! `data::registry::register` call from outside the crate).

use super::examples::{Batch, Input};
use super::remote::RemoteFile;
use super::{Dataset, ImageData};
use anyhow::Result;
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
    /// Further facts `sdp data info` prints, a line each (none by default).
    fn notes(&self, _req: &Request) -> Vec<String> {
        Vec::new()
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
