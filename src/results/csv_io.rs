//! CSV files of the results: written atomically with a header taken from a row type, read back by
//! column name, errors naming the file, the line and the column.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

pub use crate::io::write_atomic;

/// Writes `rows` as CSV, atomically: a header naming `T`'s fields (also when there is no row), then one
/// record per row.
pub fn write_csv<T: Serialize + Default>(path: &Path, rows: &[T]) -> Result<()> {
    write_rows(path, &columns::<T>()?, rows)
}

/// Writes `header`, then `rows` without theirs, atomically.
pub(super) fn write_rows<T: Serialize>(path: &Path, header: &[String], rows: &[T]) -> Result<()> {
    let mut w = csv_writer(path, header)?;
    for r in rows {
        w.serialize(r).with_context(|| format!("serialising a row of {}", path.display()))?;
    }
    finish_csv(path, w)
}

/// The columns of a row type: the names of its serialised fields, in order.
pub(super) fn columns<T: Serialize + Default>() -> Result<Vec<String>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.serialize(T::default())?;
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(csv::Reader::from_reader(bytes.as_slice()).headers()?.iter().map(String::from).collect())
}

/// A CSV writer into memory that has written `header` and serialises each record without one.
pub(super) fn csv_writer(path: &Path, header: &[String]) -> Result<csv::Writer<Vec<u8>>> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    w.write_record(header).with_context(|| format!("writing the header of {}", path.display()))?;
    Ok(w)
}

pub(super) fn finish_csv(path: &Path, w: csv::Writer<Vec<u8>>) -> Result<()> {
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomic(path, &bytes)
}

/// Reads a CSV file with a header into rows of `T`, columns matched by name (others are ignored); errors
/// name the file, the line and the column.
pub fn read_csv<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let (mut r, headers) = open_csv(path)?;
    records(path, &mut r, |rec, line| {
        rec.deserialize(Some(&headers)).map_err(|e| deserialize_error(path, line, &headers, rec, e))
    })
}

/// A CSV reader of `path` and the file's header.
pub(super) fn open_csv(path: &Path) -> Result<(csv::Reader<std::fs::File>, csv::StringRecord)> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers().map_err(|e| csv_error(path, e))?.clone();
    Ok((r, headers))
}

/// Every remaining record of `r` (reading `path`) through `row(record, line)`.
pub(super) fn records<T>(
    path: &Path,
    r: &mut csv::Reader<std::fs::File>,
    mut row: impl FnMut(&csv::StringRecord, u64) -> Result<T>,
) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        rows.push(row(&rec, rec.position().map_or(0, |p| p.line()))?);
    }
    Ok(rows)
}

fn csv_error(path: &Path, e: csv::Error) -> anyhow::Error {
    match e.position() {
        Some(p) => anyhow::anyhow!("{}: line {}: {e}", path.display(), p.line()),
        None => anyhow::anyhow!("{}: {e}", path.display()),
    }
}

/// A record that does not fit its row type, naming the column and its text where csv says which.
pub(super) fn deserialize_error(
    path: &Path,
    line: u64,
    headers: &csv::StringRecord,
    rec: &csv::StringRecord,
    e: csv::Error,
) -> anyhow::Error {
    let csv::ErrorKind::Deserialize { err, .. } = e.kind() else { return csv_error(path, e) };
    let column = err.field().and_then(|i| Some((headers.get(i as usize)?, rec.get(i as usize)?)));
    match (column, err.kind()) {
        (Some((name, text)), csv::DeserializeErrorKind::ParseInt(_) | csv::DeserializeErrorKind::ParseFloat(_)) => {
            not_a_number(path, line, name, text)
        }
        (Some((name, _)), kind) => anyhow::anyhow!("{}: line {line}: column `{name}`: {kind}", path.display()),
        (None, kind) => anyhow::anyhow!("{}: line {line}: {kind}", path.display()),
    }
}

pub(super) fn not_a_number(path: &Path, line: u64, column: &str, text: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: line {line}: column `{column}`: `{text}` is not a number", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("a/b.txt");
        write_atomic(&p, b"one")?;
        write_atomic(&p, b"two")?;
        assert_eq!(std::fs::read_to_string(&p)?, "two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))?.map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }
}
