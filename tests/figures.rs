//! `sdp figures` on a results tree written by real tiny runs (DP and SDP at C ∈ {0.5, 1}, two seeds, with
//! measured memory): which files appear, what the SVGs name, that table.md holds the numbers of summary.csv
//! and workers.csv (with Welch's interval, and none for a single seed), that a DP-only experiment draws no
//! coverage figure, that rendering twice gives the same bytes, that unfinished runs are skipped, and that
//! malformed results files are errors naming the file and line. Also that
//! every spec of the paper grid (`experiments/paper/`, what `make reproduce` runs) still loads.

mod common;

use anyhow::{Context, Result};
use common::{run_options, tiny_with};
use sdp::plan;
use sdp::results::{Manifest, Status, SummaryRow};
use sdp::runner::{run_all, RunOptions};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, OnceLock};

/// The tiny experiment as a grid: DP and SDP at two coverages, two seeds each.
static SPEC: LazyLock<String> = LazyLock::new(|| {
    tiny_with(&[
        ("# tiny\nname = \"tiny\"\nseeds = [0]\n", "# figures fixture\nname = \"tiny-fig\"\nseeds = [0, 1]\n"),
        ("workers = 2\n", "kind = [\"dp\", \"sdp\"]\nworkers = 2\nmasking = \"block\"\ncoverage = [0.5, 1.0]\n"),
    ])
});

const EXP: &str = "tiny-fig";

/// The results tree, built once per test binary (under cargo's per-target temp dir, replaced each run).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_fixture().expect("building the results fixture"))
}

fn build_fixture() -> Result<PathBuf> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Fixtures of earlier test processes (statics are never dropped): remove those older than ten minutes.
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with("figures-fixture-") && old.is_some_and(|a| a.as_secs() > 600) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = tmp.join(format!("figures-fixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exp = plan::parse(&SPEC, Path::new("tiny-fig.toml"), &[])?;
    assert_eq!(exp.runs.len(), 6, "DP + SDP at two coverages, two seeds each");
    let opts = RunOptions {
        // Measure each worker's peak memory as `sdp run` does, so the memory figure has measured data.
        memprobe: Some(PathBuf::from(env!("CARGO_BIN_EXE_sdp"))),
        ..run_options(&dir)
    };
    let out = run_all(std::slice::from_ref(&exp), &opts)?;
    assert_eq!(out.done, 6);
    // A run that is still running (a copy of a finished one): figures must leave it out.
    let first = dir.join(EXP).join(&exp.runs[0].id);
    let mut m = Manifest::read(&first.join("manifest.json"))?;
    m.run_id = "00running0".into();
    m.status = Status::Running;
    m.final_metrics = None;
    m.write(&dir.join(EXP).join("00running0").join("manifest.json"))?;
    Ok(dir)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}
/// The run directory of the fixture's run with this kind, coverage and seed.
fn run_dir(results: &Path, kind: &str, coverage: f64, seed: u64) -> Result<PathBuf> {
    let exp = plan::parse(&SPEC, Path::new("tiny-fig.toml"), &[])?;
    let run = exp
        .runs
        .iter()
        .find(|r| {
            let s = &r.spec;
            s.method.kind.as_str() == kind && (s.method.coverage - coverage).abs() < 1e-9 && s.seed == seed
        })
        .with_context(|| format!("no {kind} run at C = {coverage}, seed {seed}"))?;
    Ok(results.join(EXP).join(&run.id))
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

#[test]
fn figures_and_table_from_a_real_results_tree() -> Result<()> {
    let results = fixture();
    let out = tempfile::tempdir()?;
    let written = sdp::figures::render(results, out.path(), &[])?;
    assert_eq!(written.len(), 1);
    let w = &written[0];
    assert_eq!(w.experiment, EXP);
    assert_eq!(w.skipped, [("00running0".to_string(), "running".to_string())]);

    let dir = out.path().join(EXP);
    let mut names: Vec<String> =
        w.files.iter().map(|f| f.strip_prefix(&dir).unwrap_or(f).display().to_string()).collect();
    names.sort();
    let expected = [
        "accuracy_vs_coverage.png",
        "accuracy_vs_coverage.svg",
        "accuracy_vs_epoch_sdp_block_forward.png",
        "accuracy_vs_epoch_sdp_block_forward.svg",
        "accuracy_vs_memory.png",
        "accuracy_vs_memory.svg",
        "comm_vs_coverage.png",
        "comm_vs_coverage.svg",
        "memory_vs_coverage.png",
        "memory_vs_coverage.svg",
        "table.md",
    ];
    assert_eq!(names, expected);
    assert_eq!(file_names(&dir)?, expected, "no temp files left behind");

    // PNGs decode, at twice the SVG's size (1100 wide; taller only where the legend goes below the plot).
    for f in names.iter().filter(|n| n.ends_with(".png")) {
        let img = image::open(dir.join(f)).with_context(|| f.clone())?;
        let svg = std::fs::read_to_string(dir.join(f.replace(".png", ".svg")))?;
        let height: u32 = svg
            .split_once("height=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .and_then(|(h, _)| h.parse().ok())
            .with_context(|| format!("{f}: no SVG height"))?;
        assert_eq!((img.width(), img.height()), (2200, 2 * height), "{f}");
        assert!(height >= 620, "{f}: {height}");
    }

    // SVGs name their series, axes (with units) and experiment, as whole text elements.
    let svg = |n: &str| -> Result<Vec<String>> { Ok(svg_texts(&std::fs::read_to_string(dir.join(n))?)) };
    let expected: [(&str, &[&str]); 5] = [
        (
            "accuracy_vs_coverage.svg",
            &[
                "tiny-fig: final test accuracy vs coverage",
                "shapes, resnet widths [4, 8] depths [1, 1], K = 2",
                "coverage C (fraction of maskable units per worker)",
                "final test accuracy (%), mean ± std over seeds",
                "SDP block forward",
                "DP, mean ± std (n = 2)",
                // Ticks at the coverages that were run, with the decimals they need.
                "0.5",
                "1.0",
            ],
        ),
        (
            "memory_vs_coverage.svg",
            &[
                "per-worker memory / DP (peak measured)",
                "shapes, resnet widths [4, 8] depths [1, 1], K = 2; marker: mean over workers, whisker: largest worker",
                "SDP block forward: peak memory",
                "SDP block forward: parameters",
                "DP (= 1)",
            ],
        ),
        (
            "accuracy_vs_memory.svg",
            &[
                "tiny-fig: final test accuracy vs per-worker memory",
                "per-worker peak memory / DP (measured)",
                "DP (= 1), mean ± std",
                "SDP block forward",
                "C=0.5",
                "C=1",
            ],
        ),
        ("comm_vs_coverage.svg", &["communication bytes per step per worker / DP", "SDP block forward"]),
        (
            "accuracy_vs_epoch_sdp_block_forward.svg",
            &["epoch", "test accuracy (%), mean over seeds", "C = 0.5", "C = 1", "DP"],
        ),
    ];
    for (figure, texts) in expected {
        let found = svg(figure)?;
        for s in texts {
            assert!(found.iter().any(|t| t == s), "{figure} lacks `{s}`: {found:?}");
        }
    }
    // Every tick label is a clean number: no float noise such as 0.6000000000000001.
    for n in names.iter().filter(|n| n.ends_with(".svg")) {
        for t in svg(n)? {
            if t.parse::<f64>().is_ok() {
                let decimals = t.split_once('.').map_or(0, |(_, d)| d.len());
                assert!(decimals <= 3, "{n}: tick label `{t}`");
            }
        }
    }

    check_table_against_summary(results, &std::fs::read_to_string(dir.join("table.md"))?)?;

    // Rendering again gives byte-identical files (no timestamps, no paths, stable order).
    let again = tempfile::tempdir()?;
    sdp::figures::render(results, again.path(), &[EXP.to_string()])?;
    for n in &names {
        assert_eq!(std::fs::read(dir.join(n))?, std::fs::read(again.path().join(EXP).join(n))?, "{n} differs");
    }
    Ok(())
}

/// The contents of an SVG's `<text>` elements.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
        .collect()
}

/// A temporary copy of the results fixture: (the folder holding it, the results folder).
fn fixture_copy() -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let results = tmp.path().join("results");
    copy_tree(fixture(), &results)?;
    Ok((tmp, results))
}

/// The rows of table.md's comparison table: (variant, C) → the remaining cells.
fn table_rows(table: &str) -> BTreeMap<(String, String), Vec<String>> {
    table
        .lines()
        .skip_while(|l| !l.starts_with("| variant | C | n | final test acc"))
        .skip(2) // header and separator
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<String> = l.split('|').map(|c| c.trim().to_string()).collect();
            ((cells[1].clone(), cells[2].clone()), cells[3..cells.len() - 1].to_vec())
        })
        .collect()
}

/// Each worker's measured peak bytes in a run's workers.csv.
fn worker_peaks(run_dir: &Path) -> Result<Vec<f64>> {
    let mut rdr = csv::Reader::from_path(run_dir.join("workers.csv"))?;
    let col = rdr.headers()?.iter().position(|h| h == "peak_bytes_measured").context("no peak column")?;
    rdr.records().map(|r| Ok(r?.get(col).context("short row")?.parse::<f64>()?)).collect()
}

/// Recomputes each table row from summary.csv and workers.csv (grouped by the runs' manifests) and compares.
fn check_table_against_summary(results: &Path, table: &str) -> Result<()> {
    let (metric, rows) = sdp::results::read_summary(&results.join(EXP).join("summary.csv"))?;
    assert_eq!(metric, "acc");
    assert_eq!(rows.len(), 6);
    // (variant, coverage) → summary rows, grouped by each run's resolved spec.
    let mut groups: BTreeMap<(String, String), Vec<&SummaryRow>> = BTreeMap::new();
    for r in &rows {
        let spec = Manifest::read(&results.join(EXP).join(&r.run_id).join("manifest.json"))?.spec;
        let label = if r.method == "dp" { "DP".to_string() } else { "SDP block forward".to_string() };
        groups.entry((label, format!("{:.2}", spec.method.coverage))).or_default().push(r);
    }
    assert_eq!(groups.len(), 3);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let dp_key = ("DP".to_string(), "1.00".to_string());
    let dp = &groups[&dp_key];
    let dp_peak = mean(&dp.iter().map(|r| r.mean_peak_bytes.unwrap_or(f64::NAN)).collect::<Vec<_>>());
    let dp_comm = mean(&dp.iter().map(|r| r.comm_bytes_per_step.unwrap_or(f64::NAN)).collect::<Vec<_>>());
    assert!(dp_peak > 0.0 && dp_comm > 0.0, "the fixture measured memory and counted bytes");
    let dp_accs: Vec<f64> = dp.iter().map(|r| r.final_test_metric * 100.0).collect();

    let parsed = table_rows(table);
    assert_eq!(parsed.len(), 3, "{table}");
    for (key, runs) in &groups {
        let cells = parsed.get(key).with_context(|| format!("no table row for {key:?}:\n{table}"))?;
        // n, acc, Δ, param fraction, memory mean, memory largest, comm, spectral gap
        assert_eq!(cells.len(), 8, "{key:?}: {cells:?}");
        assert_eq!(cells[0], runs.len().to_string(), "{key:?}: seeds");
        let accs: Vec<f64> = runs.iter().map(|r| r.final_test_metric * 100.0).collect();
        let m = mean(&accs);
        let sd = (accs.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (accs.len() - 1) as f64).sqrt();
        let (tm, tsd) = cells[1].split_once(" ± ").with_context(|| format!("acc cell `{}`", cells[1]))?;
        assert!((tm.parse::<f64>()? - m).abs() < 0.0051, "{key:?}: acc {tm} vs {m}");
        assert!((tsd.parse::<f64>()? - sd).abs() < 0.0051, "{key:?}: std {tsd} vs {sd}");
        // The difference to DP with Welch's interval (two seeds each: df from Welch–Satterthwaite).
        if *key == dp_key {
            assert_eq!(cells[2], "(reference)");
        } else {
            let w = sdp::figures::stats::welch_interval(&accs, &dp_accs, 0.95).context("two seeds each")?;
            assert!(w.df >= 1.0 && w.df <= 2.0, "n = 2 + 2: 1 ≤ df ≤ 2, got {}", w.df);
            let want =
                format!("{:+.2} [{:+.2}, {:+.2}]", m - mean(&dp_accs), w.diff - w.half_width, w.diff + w.half_width);
            assert_eq!(cells[2], want, "{key:?}");
        }
        let ratio = |f: &dyn Fn(&SummaryRow) -> Option<f64>, reference: f64| {
            mean(&runs.iter().map(|r| f(r).unwrap_or(f64::NAN) / reference).collect::<Vec<_>>())
        };
        let frac = ratio(&|r| r.mean_param_fraction, 1.0);
        let mem = ratio(&|r| r.mean_peak_bytes, dp_peak);
        let mut largest = vec![];
        for r in runs {
            let peaks = worker_peaks(&results.join(EXP).join(&r.run_id))?;
            largest.push(peaks.iter().cloned().fold(0.0, f64::max) / dp_peak);
        }
        let comm = ratio(&|r| r.comm_bytes_per_step, dp_comm);
        for (name, cell, want) in [
            ("param fraction", &cells[3], frac),
            ("memory", &cells[4], mem),
            ("largest worker", &cells[5], mean(&largest)),
            ("comm", &cells[6], comm),
        ] {
            let got: f64 = cell.parse().with_context(|| format!("{key:?} {name}: `{cell}`"))?;
            assert!((got - want).abs() < 0.00051, "{key:?} {name}: table {got}, results files {want}");
        }
        let gaps: Option<Vec<f64>> = runs.iter().map(|r| r.spectral_gap).collect();
        match gaps {
            Some(g) => assert_eq!(cells[7], format!("{:.3}", mean(&g)), "{key:?}"),
            None => assert_eq!(cells[7], "–", "{key:?}"),
        }
    }
    // SDP at C = 0.5 holds about half the parameters and sends less than DP; at C = 1 it matches DP.
    let half = &parsed[&("SDP block forward".to_string(), "0.50".to_string())];
    assert!(half[3].parse::<f64>()? < 0.8 && half[6].parse::<f64>()? < 1.0, "{half:?}");
    let largest: f64 = half[5].parse()?;
    assert!(largest >= half[4].parse::<f64>()?, "the largest worker holds at least the mean: {half:?}");
    let full = &parsed[&("SDP block forward".to_string(), "1.00".to_string())];
    assert_eq!((full[3].as_str(), full[6].as_str()), ("1.000", "1.000"));
    assert!(table.contains("1 not done and left out"), "{table}");
    assert!(table.contains("## Final test accuracy by evaluation mode"), "{table}");
    assert!(!table.contains(&results.display().to_string()), "no paths in table.md (it is committed):\n{table}");
    Ok(())
}

#[test]
fn one_seed_gives_no_interval_and_dp_alone_draws_no_coverage_figure() -> Result<()> {
    let (tmp, results) = fixture_copy()?;
    let out = tmp.path().join("figs");

    // One seed left at C = 0.5: its value with `n = 1`, the difference to DP without an interval.
    std::fs::remove_dir_all(run_dir(&results, "sdp", 0.5, 1)?)?;
    sdp::figures::render(&results, &out, &[])?;
    let table = std::fs::read_to_string(out.join(EXP).join("table.md"))?;
    let rows = table_rows(&table);
    let half = &rows[&("SDP block forward".to_string(), "0.50".to_string())];
    assert_eq!(half[0], "1", "{table}");
    assert!(half[1].ends_with(" (n = 1)") && !half[1].contains('±'), "{table}");
    assert!(half[2].ends_with(" (CI n/a: n = 1)"), "{table}");
    let full = &rows[&("SDP block forward".to_string(), "1.00".to_string())];
    assert!(full[1].contains(" ± ") && full[2].contains(" ["), "{table}");
    assert!(out.join(EXP).join("accuracy_vs_coverage.svg").is_file());

    // DP alone: a curve and the table; no coverage, memory or communication figure, and the ones the
    // previous rendering left in the same directory are removed (a file sdp does not name is left alone).
    for (kind, c, seed) in [("sdp", 0.5, 0), ("sdp", 1.0, 0), ("sdp", 1.0, 1)] {
        std::fs::remove_dir_all(run_dir(&results, kind, c, seed)?)?;
    }
    std::fs::write(out.join(EXP).join("notes.png"), b"not a figure of sdp's")?;
    let written = sdp::figures::render(&results, &out, &[])?;
    let want = ["accuracy_vs_epoch_dp.png", "accuracy_vs_epoch_dp.svg", "notes.png", "table.md"];
    assert_eq!(file_names(&out.join(EXP))?, want);
    assert_eq!(written[0].files.len(), 3, "{:?}", written[0].files);
    let curve = svg_texts(&std::fs::read_to_string(out.join(EXP).join("accuracy_vs_epoch_dp.svg"))?);
    assert!(curve.iter().any(|t| t == "DP"), "{curve:?}");
    let table = std::fs::read_to_string(out.join(EXP).join("table.md"))?;
    assert_eq!(table_rows(&table).len(), 1, "{table}");
    Ok(())
}

#[test]
fn malformed_results_files_are_errors_naming_the_file_and_line() -> Result<()> {
    let (tmp, results) = fixture_copy()?;
    let exp = plan::parse(&SPEC, Path::new("tiny-fig.toml"), &[])?;
    let metrics = results.join(EXP).join(&exp.runs[1].id).join("metrics.csv");
    let text = std::fs::read_to_string(&metrics)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "header + two epochs");
    let out = tmp.path().join("figs");
    let render_err = |what: &str| -> String {
        format!("{:#}", sdp::figures::render(&results, &out, &[]).err().unwrap_or_else(|| panic!("{what}: no error")))
    };

    // A value that is not a number.
    let mut cells: Vec<String> = lines[2].split(',').map(String::from).collect();
    cells[5] = "oops".into();
    std::fs::write(&metrics, format!("{}\n{}\n{}\n", lines[0], lines[1], cells.join(",")))?;
    let err = render_err("malformed metrics.csv");
    assert!(
        err.contains(&format!("{}: line 3: column `test_acc`: `oops` is not a number", metrics.display())),
        "{err}"
    );

    // A row with a missing field.
    std::fs::write(&metrics, format!("{}\n{}\n1,2\n", lines[0], lines[1]))?;
    let err = render_err("short row");
    assert!(err.contains(&metrics.display().to_string()) && err.contains("line 3"), "{err}");
    std::fs::write(&metrics, &text)?;

    // workers.csv: a peak that is not a number, and a peak measured for some workers only.
    let sdp_run = run_dir(&results, "sdp", 0.5, 0)?;
    let workers = sdp_run.join("workers.csv");
    let workers_text = std::fs::read_to_string(&workers)?;
    let header: Vec<&str> = workers_text.lines().next().context("empty workers.csv")?.split(',').collect();
    let peak_col = header.iter().position(|h| *h == "peak_bytes_measured").context("no peak column")?;
    let edit_row = |row: usize, value: &str| -> Result<()> {
        let edited: Vec<String> = workers_text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut cells: Vec<String> = l.split(',').map(String::from).collect();
                if i == row {
                    cells[peak_col] = value.to_string();
                }
                cells.join(",")
            })
            .collect();
        std::fs::write(&workers, edited.join("\n") + "\n")?;
        Ok(())
    };
    edit_row(2, "lots")?;
    let err = render_err("peak that is not a number");
    assert!(err.contains(&format!("{}: line 3:", workers.display())), "{err}");
    edit_row(2, "")?;
    let err = render_err("peak of one worker only");
    assert!(
        err.contains(&format!(
            "{}: column `peak_bytes_measured`: 1 of 2 workers measured (all or none expected)",
            workers.display()
        )),
        "{err}"
    );
    std::fs::write(&workers, &workers_text)?;

    // The manifest: a spectral gap that is not a number, then a truncated file.
    let manifest = sdp_run.join("manifest.json");
    let manifest_text = std::fs::read_to_string(&manifest)?;
    let mut m: serde_json::Value = serde_json::from_str(&manifest_text)?;
    m["extra"]["spectral_gap"] = serde_json::json!("large");
    std::fs::write(&manifest, serde_json::to_string(&m)?)?;
    let err = render_err("spectral gap that is not a number");
    assert!(err.contains(&format!("{}: extra.spectral_gap: `\"large\"` is not a number", manifest.display())), "{err}");
    std::fs::write(&manifest, &manifest_text[..manifest_text.len() / 2])?;
    let err = render_err("truncated manifest");
    assert!(err.contains(&format!("parsing {}", manifest.display())), "{err}");
    std::fs::write(&manifest, &manifest_text)?;
    std::fs::write(&metrics, format!("{}\n{}\n1,2\n", lines[0], lines[1]))?;

    // The command line: a failure exits 1 naming the file; nothing was written for the experiment.
    let sdp = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_sdp")).args(args).output();
    let (r, o) = (results.to_str().unwrap_or_default(), out.to_str().unwrap_or_default());
    let bad = sdp(&["figures", "--results", r, "--out", o])?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains(&metrics.display().to_string()));
    assert!(!out.join(EXP).exists());

    // Repaired, it succeeds and lists what it wrote; an unknown experiment is a usage error.
    std::fs::write(&metrics, &text)?;
    let good = sdp(&["figures", "--results", r, "--out", o, EXP])?;
    assert_eq!(good.status.code(), Some(0), "{}", String::from_utf8_lossy(&good.stderr));
    let listed = String::from_utf8_lossy(&good.stdout);
    assert_eq!(listed.lines().count(), 11, "{listed}");
    assert!(listed.lines().all(|l| Path::new(l).is_file()), "{listed}");
    assert!(String::from_utf8_lossy(&good.stderr).contains("00running0: status `running`, not done: skipped"));
    let unknown = sdp(&["figures", "--results", r, "--out", o, "no-such-experiment"])?;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no experiment `no-such-experiment`"));
    Ok(())
}

/// `make reproduce` runs every file in experiments/paper/: each must load (what `sdp check` does) and together
/// they must cover the paper grid.
#[test]
fn every_paper_spec_loads_and_the_grid_is_complete() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    // The language-model row is checked on its own below.
    let llm = dir.join("fineweb_llama134m.toml");
    paths.retain(|p| *p != llm);
    let mut cells = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    for p in &paths {
        let exp = plan::load(p, &[]).with_context(|| format!("{}", p.display()))?;
        let text = std::fs::read_to_string(p)?;
        assert!(text.starts_with("# Paper grid row:"), "{}: starts with its claim, expectation and cost", p.display());
        assert!(text.contains("# Cost:") && text.contains("# Expected:"), "{}", p.display());
        assert!(names.insert(exp.name.clone()), "{}: experiment name {} used twice", p.display(), exp.name);
        // DP once + SDP {block, neuron} x {forward, backward} x C {0.5, 0.75, 0.875}, and one SDP run at C = 1
        // (full coverage: every masking and regime is the same run) = 14 runs per seed.
        assert_eq!(exp.runs.len(), 14 * 3, "{}", p.display());
        // The paper's 87.5 % overlap: m = 7 of K = 8 for block and neuron masking in the forward regime.
        for masking in ["block", "neuron"] {
            let at = |r: &&sdp::spec::Run| {
                let m = &r.spec.method;
                m.coverage == 0.875 && m.masking == masking && m.regime == sdp::spec::Regime::Forward
            };
            assert_eq!(exp.runs.iter().filter(at).count(), 3, "{}: {masking} forward C = 0.875", p.display());
        }
        let w = &exp.runs[0].spec.workload;
        assert_eq!(w.epochs, 200, "{}", p.display());
        assert!(exp.runs.iter().all(|r| r.spec.method.workers == 8), "{}", p.display());
        let model = w.model.as_str().to_string();
        cells.insert((w.dataset.clone(), model));
    }
    let mut want = std::collections::BTreeSet::new();
    for d in ["cifar10", "cifar100", "svhn"] {
        for m in ["resnet18", "wrn18", "swin_t"] {
            want.insert((d.to_string(), m.to_string()));
        }
    }
    assert_eq!(cells, want);
    let exp = plan::load(&llm, &[])?;
    let text = std::fs::read_to_string(&llm)?;
    assert!(text.starts_with("# Paper LLM row:") && text.contains("# Cost:") && text.contains("# Expected:"));
    assert_eq!(exp.runs.len(), 5, "DP + SDP block/neuron x C 0.5, 0.875");
    for r in &exp.runs {
        let (w, m) = (&r.spec.workload, &r.spec.method);
        assert_eq!((w.model.as_str(), w.context, w.batch_size, m.workers), ("llama_134m", Some(256), 64, 8));
    }
    Ok(())
}
