//! A dataset defined outside the crate, as a user would add one: one type implementing
//! `data::source::DataSource` and one `register` call. Specs then name it, and the runner, the cost
//! model and `data info` use it with no other change.

mod common;

use anyhow::Result;
use sdp::data::registry::{self as source, DataRef};
use sdp::data::source::{DataSource, Request, Shape};
use sdp::data::{channel_stats, Dataset, ImageData, ImageSet};
use std::path::Path;
use std::sync::Once;

/// Two classes of 16×16 RGB images, fixed splits of 60 and 20: a bright horizontal bar (class 0) or a
/// vertical one (class 1) at a position that varies with the image index.
struct Bars;

const SIDE: usize = 16;

fn split(n: usize, offset: usize) -> Result<ImageSet> {
    let mut images = vec![0u8; n * SIDE * SIDE * 3];
    let labels: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    for (i, img) in images.chunks_mut(SIDE * SIDE * 3).enumerate() {
        let at = (i + offset) % SIDE;
        for y in 0..SIDE {
            for x in 0..SIDE {
                let on = if labels[i] == 0 { y == at } else { x == at };
                img[(y * SIDE + x) * 3..][..3].fill(if on { 250 } else { 20 + ((x + y) % 7) as u8 });
            }
        }
    }
    ImageSet::new(images, labels, SIDE, SIDE, 3)
}

impl DataSource for Bars {
    fn shape(&self, _: &Request) -> Result<Shape> {
        Ok(Shape { train: 60, test: 20, classes: 2, hw: (SIDE, SIDE) })
    }

    fn load(&self, _: &Request) -> Result<Dataset> {
        let (train, test) = (split(60, 0)?, split(20, 7)?);
        let (mean, std) = channel_stats(&train);
        let classes = vec!["h".into(), "v".into()];
        Ok(ImageData { name: "test_bars".into(), train, test, classes, mean, std }.into())
    }
}

fn register_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| source::register("test_bars", None, &Bars).expect("registering test_bars"));
}

fn bars_spec(sets: &[&str]) -> Result<sdp::spec::Experiment> {
    let text = common::tiny_with(&[
        ("dataset = \"shapes\"\ntrain_samples = 64\ntest_samples = 40", "dataset = \"test_bars\"\ntrain_samples = 32"),
        ("[method]\nworkers = 2\n", "[method]\nkind = [\"dp\", \"sdp\"]\nworkers = 2\ncoverage = 0.5\n"),
    ]);
    common::parse_with(&text, sets)
}

#[test]
fn a_registered_dataset_trains_and_is_priced_and_reported() -> Result<()> {
    register_once();
    assert!(source::names().contains(&"test_bars".to_string()));
    let exp = bars_spec(&[])?;
    assert_eq!(exp.runs.len(), 2, "DP and SDP");
    let w = &exp.runs[0].spec.workload;

    // A fixed source is subset to `train_samples`, class-balanced; the test split is whole.
    let data = DataRef::parse(&w.dataset)?.load(w, Path::new("unused"))?;
    assert_eq!((data.train.len(), data.test.len(), data.train.input_shape()), (32, 20, vec![3, SIDE, SIDE]));
    assert_eq!(data.train.images().map(|t| t.class_counts(2)), Some(vec![16, 16]));

    // The cost model reads the shape without loading: the capped sizes, the source's classes and size.
    let sizes = sdp::cost::data_sizes(w, Path::new("unused"))?;
    assert_eq!((sizes.train, sizes.test, sizes.classes, sizes.hw), (32, 20, 2, (SIDE, SIDE)));
    assert!(sizes.assumption.as_deref().is_some_and(|a| a.contains("test_samples absent")), "{sizes:?}");

    // `sdp data info` reports it.
    let info = sdp::data::fetch::info("test_bars", Path::new("unused"))?;
    assert!(info.loadable, "{}", info.text);
    common::check_contains(&info.text, &["train: 60 images, test: 20 images, 16x16x3", "2 classes"])?;

    // The runner trains both methods on it and writes their results.
    let dir = tempfile::tempdir()?;
    let out = sdp::runner::run_all(std::slice::from_ref(&exp), &common::run_options(dir.path()))?;
    assert_eq!((out.done, out.failed), (2, 0));
    let summary = std::fs::read_to_string(dir.path().join("tiny/summary.csv"))?;
    assert!(exp.runs.iter().all(|r| summary.contains(&r.id)), "{summary}");
    Ok(())
}

#[test]
fn names_are_checked_against_the_registry() -> Result<()> {
    register_once();
    let e = common::err_text(bars_spec(&["workload.dataset=test_barz"]));
    common::check_contains(&e, &["key `workload.dataset`", "unknown dataset `test_barz`", "test_bars"])?;
    let e = common::err_text(bars_spec(&["workload.dataset=test_bars:x"]));
    common::check_contains(&e, &["takes no argument"])?;
    for name in ["cifar10", "test_bars"] {
        let e = source::register(name, None, &Bars).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("`{name}` is registered already")), "{e}");
    }
    Ok(())
}
