//! The results schema the README documents is the one the code writes: the column lists of `summary.csv`,
//! `metrics.csv`, `workers.csv` and `alignment.csv` in README.md are compared with the headers that
//! `sdp::results` writes, so that neither can change without the other.

use anyhow::{ensure, Context, Result};
use sdp::results::{self, AlignRow, MetricsRow, WorkerRow};
use sdp::spec::EvalMode;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn readme() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The text of the README bullet that starts with `head` (its first line and the indented lines that
/// continue it), from just after `head`.
fn bullet(text: &str, head: &str) -> Result<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(head));
    let first = lines.next().with_context(|| format!("README.md has no bullet starting with {head:?}"))?;
    let mut out = first[head.len()..].to_string();
    for l in lines.take_while(|l| l.starts_with("  ")) {
        out.push(' ');
        out.push_str(l.trim());
    }
    Ok(out)
}

/// The columns of the first backticked list in the README bullet that starts with `head`.
fn documented(text: &str, head: &str) -> Result<Vec<String>> {
    let b = bullet(text, head)?;
    let span = b.split('`').nth(1).with_context(|| format!("the README bullet {head:?} has no `column list`"))?;
    Ok(span.split(',').map(|c| c.trim().to_string()).collect())
}

/// The header line of a CSV file written by the code.
fn header(path: &Path) -> Result<Vec<String>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(r.headers()?.iter().map(String::from).collect())
}

fn check_same(file: &str, documented: &[String], written: &[String]) -> Result<()> {
    ensure!(
        documented == written,
        "README.md documents the columns of {file} as\n  {}\nbut the code writes\n  {}",
        documented.join(","),
        written.join(",")
    );
    Ok(())
}

/// The headline metric of the built-in datasets, whose columns the README documents.
const CLASSIFY_METRIC: &str = "acc";

fn metrics_row(modes: BTreeMap<String, f64>) -> MetricsRow {
    MetricsRow { run_id: "r".into(), modes, ..Default::default() }
}

#[test]
fn summary_columns_are_the_documented_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("e"))?;
    let path = results::write_summary(dir.path(), "e")?;
    check_same("summary.csv", &documented(&readme()?, "- `summary.csv` — ")?, &header(&path)?)
}

#[test]
fn metrics_columns_are_the_documented_ones() -> Result<()> {
    let text = readme()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metrics.csv");
    // A DP run: the fixed columns only.
    results::write_metrics(&path, CLASSIFY_METRIC, &[metrics_row(BTreeMap::new())])?;
    check_same("metrics.csv", &documented(&text, "- `metrics.csv` — ")?, &header(&path)?)?;
    // An SDP run adds one column per evaluation mode.
    let modes = EvalMode::ALL.iter().map(|m| (m.name().to_string(), 0.5)).collect();
    results::write_metrics(&path, CLASSIFY_METRIC, &[metrics_row(modes)])?;
    let fixed = documented(&text, "- `metrics.csv` — ")?;
    let written: BTreeSet<String> = header(&path)?.into_iter().filter(|c| !fixed.contains(c)).collect();
    let listed: BTreeSet<String> = documented(&text, "- `metrics.csv` columns ")?.into_iter().collect();
    ensure!(listed == written, "README.md lists the SDP metrics columns {listed:?}, the code writes {written:?}");
    Ok(())
}

#[test]
fn workers_and_alignment_columns_are_the_documented_ones() -> Result<()> {
    let text = readme()?;
    let dir = tempfile::tempdir()?;
    let workers = dir.path().join("workers.csv");
    let row = WorkerRow { run_id: "r".into(), ..Default::default() };
    results::write_csv(&workers, &[row])?;
    check_same("workers.csv", &documented(&text, "- `workers.csv` — ")?, &header(&workers)?)?;
    let alignment = dir.path().join("alignment.csv");
    let row = AlignRow { run_id: "r".into(), ..Default::default() };
    results::write_csv(&alignment, &[row])?;
    check_same("alignment.csv", &documented(&text, "- `alignment.csv` — ")?, &header(&alignment)?)
}

#[test]
fn a_wrong_column_list_is_reported_with_both_lists() {
    let text = "- `x.csv` — `a,b,\n  c`: rows\n";
    let doc = documented(text, "- `x.csv` — ").unwrap_or_default();
    assert_eq!(doc, ["a", "b", "c"]);
    let e = check_same("x.csv", &doc, &["a".to_string(), "c".to_string()]).err().map(|e| e.to_string());
    let e = e.unwrap_or_default();
    assert!(e.contains("x.csv") && e.contains("a,b,c") && e.contains("a,c"), "{e}");
}
