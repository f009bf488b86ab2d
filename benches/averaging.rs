//! One SDP parameter synchronisation (`SdpState::sync_params`: every parameter and BN statistic averaged
//! among its holders into the global model and handed back to the workers), CIFAR ResNet-18, K = 4
//! simulated workers on the CPU, block and neuron masking at C = 0.5 and DP-like C = 1.
//!
//! `cargo bench --bench averaging`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sdp::train::SdpState;
use std::path::Path;
use std::time::Duration;

fn state(masking: &str, coverage: f64) -> SdpState {
    let text = format!(
        "name = \"avg\"\n[workload]\ndataset = \"shapes\"\nmodel = \"resnet18\"\nepochs = 1\nbatch_size = 32\n\
         [method]\nkind = \"sdp\"\nworkers = 4\nmasking = \"{masking}\"\ncoverage = {coverage}\n"
    );
    let exp = sdp::plan::parse(&text, Path::new("avg.toml"), &[]).expect("bench spec");
    SdpState::new(&exp.runs[0].spec, 10, &Device::Cpu).expect("building the SDP state")
}

fn bench_sync(c: &mut Criterion) {
    sdp::runtime::tune_for_training(); // as the `sdp` binary does
    let mut group = c.benchmark_group("sync_params");
    for (masking, coverage) in [("block", 0.5), ("neuron", 0.5), ("block", 1.0)] {
        let mut st = state(masking, coverage);
        group.bench_function(BenchmarkId::new(masking, coverage), |b| b.iter(|| st.sync_params(true).expect("sync")));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_sync
}
criterion_main!(benches);
