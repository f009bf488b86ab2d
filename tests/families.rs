//! What SDP relies on from every registered model family (`sdp::models::names`), checked on a small
//! configuration of each: a new family registered in `src/models/mod.rs` is tested here without a new test.
//!
//! The full plan builds the full model; a subnetwork built from a plan holds exactly the tensors its index
//! maps name, at their local shapes; the parameters a plan drops are those its dropped units own.

mod common;

use anyhow::Result;
use common::family::{check_family, small};
use sdp::models;

#[test]
fn every_family_builds_subnetworks_that_match_their_maps_and_units() -> Result<()> {
    for name in models::names() {
        check_family(name)?;
    }
    Ok(())
}

#[test]
fn an_unknown_model_names_the_registered_ones() {
    let err = models::family("vgg", &small(3)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(models::names().iter().all(|n| err.contains(n)) && err.contains("`vgg`"), "{err}");
}
