//! A task defined outside the crate: one type implementing `task::Task` (here classification with
//! label smoothing and top-2 accuracy), one `task::register` call, and a dataset source that names it.
//! Training and evaluation then use its loss and metric with no other change.

mod common;

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use sdp::data::registry as source;
use sdp::data::source::{DataSource, Request, Shape};
use sdp::data::synthetic::Shapes;
use sdp::data::Dataset;
use sdp::progress::Quiet;
use sdp::task::{self, Metric, Task};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Once};

/// Cross-entropy against labels smoothed by `EPS`; scored by top-2 accuracy.
struct Smoothed;

const EPS: f64 = 0.2;

impl Task for Smoothed {
    fn metric(&self) -> Metric {
        Metric::fraction("top2", "top-2 accuracy")
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let nll = candle_nn::loss::nll(&logp, labels)?;
        let uniform = logp.mean(D::Minus1)?.mean_all()?.neg()?;
        (nll * (1.0 - EPS))? + (uniform * EPS)?
    }

    fn score(&self, scores: &Tensor, labels: &[u32]) -> Result<f64> {
        let rows: Vec<Vec<f32>> = scores.to_vec2()?;
        let top2 = rows.iter().zip(labels).filter(|(r, &l)| r.iter().filter(|&&v| v > r[l as usize]).count() < 2);
        Ok(top2.count() as f64)
    }

    fn ensemble_member(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::softmax_last_dim(logits)
    }

    fn ensemble_loss(&self, probs: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::loss::nll(&probs.clamp(1e-12f32, 1f32)?.log()?, labels)
    }
}

/// `shapes`, for the task named.
struct ShapesFor(&'static str);

impl DataSource for ShapesFor {
    fn shape(&self, req: &Request) -> Result<Shape> {
        Shapes.shape(req)
    }
    fn load(&self, req: &Request) -> Result<Dataset> {
        Shapes.load(req)
    }
    fn generated(&self) -> bool {
        true
    }
    fn task(&self) -> &'static str {
        self.0
    }
}

static SMOOTH_SHAPES: ShapesFor = ShapesFor("test_smoothed");
/// A source naming a task nobody registered.
static ORPHAN: ShapesFor = ShapesFor("no_such_task");

fn register_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        task::register("test_smoothed", &Smoothed).expect("registering the task");
        source::register("test_smooth_shapes", None, &SMOOTH_SHAPES).expect("registering the source");
        source::register("test_orphan", None, &ORPHAN).expect("registering the source");
    });
}

#[test]
fn a_registered_task_trains_with_its_own_loss_and_metric() -> Result<()> {
    register_once();
    let spec = |dataset: &str| -> Result<sdp::spec::RunSpec> {
        let set = format!("workload.dataset={dataset}");
        Ok(common::parse_with(common::TINY, &[&set, "workload.epochs=1"])?.runs.remove(0).spec)
    };
    let mut finals = Vec::new();
    for dataset in ["shapes", "test_smooth_shapes"] {
        let s = spec(dataset)?;
        let data = sdp::data::load(&s.workload, std::path::Path::new("datasets"))?;
        let mut quiet = Quiet { stop: Arc::new(AtomicBool::new(false)) };
        finals.push(sdp::train::train(&s, &data, &Device::Cpu, &mut quiet)?);
    }
    let (plain, smoothed) = (&finals[0], &finals[1]);
    // Same images, same initial model and batches: only the loss differs, so the trained runs differ.
    assert!(smoothed.train_loss.is_finite() && smoothed.train_loss != plain.train_loss, "{plain:?} {smoothed:?}");
    // The test metric is the task's score (top-2 hits) over the test split: a fraction.
    assert!((0.0..=1.0).contains(&smoothed.test_metric), "{smoothed:?}");
    assert_eq!((plain.metric.as_str(), smoothed.metric.as_str()), ("acc", "top2"));
    assert_eq!(task::task("test_smoothed")?.task.metric().name, "top2");
    Ok(())
}

#[test]
fn results_figures_and_tables_name_the_tasks_metric() -> Result<()> {
    register_once();
    let exp = common::parse_with(common::TINY, &["workload.dataset=test_smooth_shapes", "workload.epochs=2"])?;
    let (results, out) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let done = sdp::runner::run_all(std::slice::from_ref(&exp), &common::run_options(results.path()))?;
    assert_eq!(done.done, 1);
    // The results files name the headline columns after the metric, and read back by it.
    let exp_dir = results.path().join("tiny");
    let run_dir = exp_dir.join(&exp.runs[0].id);
    let header = |p: &std::path::Path| -> Result<String> {
        Ok(std::fs::read_to_string(p)?.lines().next().unwrap_or_default().to_string())
    };
    common::check_contains(&header(&run_dir.join("metrics.csv"))?, &[",test_loss,test_top2,lr,", ",test_top2_full"])?;
    common::check_contains(&header(&exp_dir.join("summary.csv"))?, &[",final_test_top2,final_test_loss,"])?;
    common::check_contains(&std::fs::read_to_string(run_dir.join("manifest.json"))?, &["\"test_top2\": "])?;
    let metrics = sdp::results::read_metrics(&run_dir.join("metrics.csv"))?;
    assert_eq!((metrics.metric.as_str(), metrics.rows.len()), ("top2", 2));
    assert_eq!(sdp::results::read_summary(&exp_dir.join("summary.csv"))?.0, "top2");
    sdp::figures::render(results.path(), out.path(), &[])?;
    let table = std::fs::read_to_string(out.path().join("tiny/table.md"))?;
    common::check_contains(&table, &["final test top2 (%)", "mean top-2 accuracy minus DP's"])?;
    assert!(!table.contains("test acc"), "{table}");
    let curve = std::fs::read_to_string(out.path().join("tiny/accuracy_vs_epoch_dp.svg"))?;
    assert!(curve.contains("test top-2 accuracy vs epoch"), "the curve's title names the metric");
    Ok(())
}

#[test]
fn an_unknown_task_is_a_spec_error_and_names_are_not_taken_twice() -> Result<()> {
    register_once();
    let e = common::err_text(common::parse_with(common::TINY, &["workload.dataset=test_orphan"]));
    common::check_contains(&e, &["key `workload.dataset`", "unknown task `no_such_task`", "classify"])?;
    // One experiment reports one metric: a grid over datasets of two tasks is refused before any run.
    let mixed = common::tiny_with(&[("dataset = \"shapes\"", "dataset = [\"shapes\", \"test_smooth_shapes\"]")]);
    let e = common::err_text(common::parse_with(&mixed, &[]));
    common::check_contains(&e, &["key `workload.dataset`", "reports `acc`", "`top2`", "separate spec files"])?;
    let e = task::register("classify", &Smoothed).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("`classify` is registered already"), "{e}");
    Ok(())
}
