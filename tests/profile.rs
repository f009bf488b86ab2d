//! The step profiler (`sdp bench step --profile`) and the GEMM peak (`sdp bench peak`). In a test binary of
//! its own: profiling is process-wide, and another test's ops would land in these totals.

use sdp::bench::{step, BenchCommand};
use sdp::ops::profile::{self, Part};
use std::sync::Mutex;
use std::time::Duration;

/// Profiling is process-wide: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn nested_scopes_count_exclusive_time_and_nothing_while_off() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    profile::enable(true);
    profile::reset();
    {
        let _outer = profile::scope(Part::Forward);
        std::thread::sleep(Duration::from_millis(20));
        let _inner = profile::scope(Part::ConvForward);
        profile::add_flops(Part::ConvForward, 1000);
        std::thread::sleep(Duration::from_millis(30));
    }
    profile::enable(false);
    let get = |p: Part| profile::totals().into_iter().find(|x| x.part == p).expect("every part is listed");
    let (outer, inner) = (get(Part::Forward), get(Part::ConvForward));
    assert_eq!((outer.calls, inner.calls, inner.flops), (1, 1, 1000));
    assert!(inner.seconds >= 0.030 && inner.seconds < 0.045, "inner {}", inner.seconds);
    // The outer scope's own time excludes the 30 ms of the scope inside it.
    assert!(outer.seconds >= 0.020 && outer.seconds < 0.030, "outer {}", outer.seconds);
    {
        let _off = profile::scope(Part::Loss);
        profile::add_flops(Part::Loss, 5);
    }
    assert_eq!((get(Part::Loss).calls, get(Part::Loss).flops), (0, 0));
}

fn bench(line: &str) -> sdp::bench::StepBench {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        bench: BenchCommand,
    }
    let BenchCommand::Step(a) = Cli::parse_from(std::iter::once("bench").chain(line.split_whitespace())).bench else {
        panic!("not a step bench: {line}")
    };
    a.validate().expect("valid flags")
}

#[test]
fn a_profiled_step_counts_the_convolutions_flops_and_every_phase() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Widths 4, 8 at 8×8, batch 2, one basic block per stage: the FLOPs follow from the shapes.
    let b =
        bench("step --model resnet --widths 4,8 --depths 1,1 --batch 2 --steps 2 --warmup 1 --image-size 8 --profile");
    let r = step(&b).expect("the step runs");
    let parts = r.profile.expect("--profile returns the parts");
    let get = |p: Part| parts.iter().find(|x| x.part == p).copied().expect("every part is listed");
    // Forward convs per image (2·Cout·Ho·Wo·Cin·kh·kw): stem 3→4 at 8×8, block 1 two 4→4 3×3 at 8×8,
    // block 2 4→8 3×3 stride 2 (4×4 out), 8→8 3×3 at 4×4, shortcut 4→8 1×1 stride 2.
    let per_image = 2 * (4 * 64 * 27 + 2 * 4 * 64 * 36 + 8 * 16 * 36 + 8 * 16 * 72 + 8 * 16 * 4);
    let fwd = 2 * per_image as u64; // batch 2, per step
    assert_eq!(get(Part::ConvForward).flops, 2 * fwd, "two timed steps");
    assert_eq!(get(Part::ConvBackwardWeight).flops, 2 * fwd);
    // The stem's input (the image batch) needs no gradient.
    let stem = 2 * 2 * (4 * 64 * 27) as u64;
    assert_eq!(get(Part::ConvBackwardData).flops, 2 * (fwd - stem));
    for p in [Part::Forward, Part::Loss, Part::Backward, Part::Optimizer, Part::BnForward, Part::BnBackward] {
        assert!(get(p).calls > 0 && get(p).seconds > 0.0, "{p:?} was not timed: {:?}", get(p));
    }
    // Exclusive times never add up to more than the steps took.
    let timed: f64 = parts.iter().map(|p| p.seconds).sum();
    assert!(timed <= r.times.iter().sum::<f64>() * 1.01, "parts {timed} > steps {:?}", r.times);
    // Without the flag nothing is profiled.
    let plain =
        step(&bench("step --model resnet --widths 4,8 --depths 1,1 --batch 2 --steps 1 --warmup 0 --image-size 8"));
    assert!(plain.expect("runs").profile.is_none());
}

#[test]
fn a_whole_sdp_step_profiles_the_averaging() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let b = bench(
        "step --model resnet --widths 4,8 --depths 1,1 --batch 2 --steps 2 --warmup 1 --image-size 8 \
         --masking block --coverage 0.5 --workers 4 --all-workers --profile",
    );
    let parts = step(&b).expect("the step runs").profile.expect("profiled");
    let avg = parts.iter().find(|p| p.part == Part::Averaging).expect("listed");
    assert_eq!(avg.calls, 2, "one averaging per timed step");
}

#[test]
fn the_gemm_peak_is_a_positive_rate() {
    let p = sdp::ops::peak::measure(1, &[64, 128], 2).expect("measured");
    assert!(p.gflops > 0.1 && p.gflops.is_finite(), "{p:?}");
    assert_eq!(p.threads, 1);
    assert!([64, 128].contains(&p.size));
}
