//! A model family defined outside the crate, as a user would add one: one type implementing
//! `models::Family` (here the residual MLP of `tests/common/mlp.rs`, ~120 lines) and one
//! `models::register` call. Specs then name it, and DP and SDP (block and neuron masking) train it with no
//! other change.

mod common;

use anyhow::Result;
use candle_core::Device;
use common::mlp::Stem;
use sdp::models::{self, Family, ModelArgs};
use sdp::progress::Quiet;
use sdp::train;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Once};

/// The residual MLP of `tests/common/mlp.rs` on flattened 3×32×32 images, four blocks by default.
fn mlp(a: &ModelArgs) -> Result<Box<dyn Family>> {
    common::mlp::family(a, Stem::Flat(3 * 32 * 32), 4)
}

fn register_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| models::register("test_mlp", mlp).expect("registering test_mlp"));
}

#[test]
fn a_registered_family_trains_under_dp_and_sdp() -> Result<()> {
    register_once();
    assert!(models::names().contains(&"test_mlp"));
    // The invariants every built-in family is held to (tests/families.rs).
    common::family::check_family("test_mlp")?;
    let text = common::tiny_with(&[
        ("model = \"resnet\"\nwidths = [4, 8]\ndepths = [1, 1]", "model = \"test_mlp\"\nwidths = [16]\ndepths = [4]"),
        (
            "[method]\nworkers = 2\n",
            "[method]\nkind = [\"dp\", \"sdp\"]\nworkers = 2\nmasking = [\"block\", \"neuron\"]\ncoverage = 0.5\n",
        ),
    ]);
    let exp = common::parse_with(&text, &[])?;
    assert_eq!(exp.runs.len(), 3, "DP, SDP block, SDP neuron");
    let data = sdp::data::load(&exp.runs[0].spec.workload, std::path::Path::new("datasets"))?;
    for run in &exp.runs {
        let mut quiet = Quiet { stop: Arc::new(AtomicBool::new(false)) };
        let fin = train::train(&run.spec, &data, &Device::Cpu, &mut quiet)?;
        assert!(fin.train_loss.is_finite() && fin.test_metric >= 0.0, "{}: {fin:?}", run.label);
    }
    Ok(())
}

#[test]
fn a_taken_name_cannot_be_registered_again() {
    register_once();
    for name in ["resnet18", "test_mlp"] {
        let e = models::register(name, mlp).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("`{name}` is registered already")), "{e}");
    }
}
