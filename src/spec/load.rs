//! Loading a spec file: TOML → `--set` overrides → grid expansion → validated runs with stable ids; errors name
//! the file, the key and its line.

use super::*;

/// One run of an experiment.
#[derive(Clone, Debug)]
pub struct Run {
    pub id: String,
    /// The grid values that distinguish this run from its siblings (`method.coverage=0.5 seed=1`).
    pub label: String,
    pub spec: RunSpec,
}

/// A loaded spec file: its runs, in grid order.
#[derive(Clone, Debug)]
pub struct Experiment {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub runs: Vec<Run>,
}

/// Parses, overrides, expands and validates spec text (`path` is used in messages and recorded in the
/// experiment); `check` then judges each run's names (`crate::plan::parse` passes the resolver, which this
/// module does not know), its error naming the key.
pub fn parse_checked(text: &str, path: &Path, overrides: &[String], check: &Check<'_>) -> Result<Experiment> {
    let file = path.display().to_string();
    let doc =
        toml_edit::ImDocument::parse(text.to_string()).map_err(|e| SpecError(format!("{file}: invalid TOML: {e}")))?;
    let mut table: toml::Table = toml::from_str(text).map_err(|e| SpecError(format!("{file}: invalid TOML: {e}")))?;
    let locate = |key: &str| -> String {
        match key_line(&doc, key) {
            Some(line) => format!("{file}:{line}: key `{key}`"),
            None => format!("{file}: key `{key}`"),
        }
    };

    let mut overridden = Vec::new();
    for o in overrides {
        let key = apply_override(&mut table, o).map_err(|e| SpecError(format!("--set {o}: {e}")))?;
        overridden.push(key);
    }
    // Where a key's value came from, for error messages.
    let origin = |key: &str| -> String {
        match overridden.iter().rev().find(|k| key == k.as_str() || key.starts_with(&format!("{k}."))) {
            Some(k) => format!("{} (set by --set {k}=…)", locate(key)),
            None => locate(key),
        }
    };

    let name = match table.remove("name") {
        Some(toml::Value::String(s)) if valid_name(&s) => s,
        Some(v) => {
            return Err(SpecError(format!(
                "{}: must be a non-empty string of letters, digits, `-`, `_` or `.`, got {v}",
                origin("name")
            ))
            .into())
        }
        None => return Err(SpecError(format!("{file}: missing key `name`")).into()),
    };
    let description = match table.remove("description") {
        None => String::new(),
        Some(toml::Value::String(s)) => s,
        Some(v) => return Err(SpecError(format!("{}: must be a string, got {v}", origin("description"))).into()),
    };
    let seeds: Vec<u64> = match table.remove("seeds").or_else(|| table.remove("seed")) {
        None => vec![0],
        Some(v) => {
            let list = match v {
                toml::Value::Array(a) => a,
                other => vec![other],
            };
            let mut seeds = Vec::new();
            for s in list {
                match s.as_integer() {
                    Some(i) if i >= 0 => seeds.push(i as u64),
                    _ => {
                        return Err(SpecError(format!(
                            "{}: seeds must be non-negative integers, got {s}",
                            origin("seeds")
                        ))
                        .into())
                    }
                }
            }
            if seeds.is_empty() {
                return Err(SpecError(format!("{}: must list at least one seed", origin("seeds"))).into());
            }
            seeds
        }
    };

    let mut axes = Vec::new();
    collect_axes(&table, "", &mut axes);
    let mut runs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for combo in cartesian(&axes) {
        let mut t = table.clone();
        let mut label = Vec::new();
        for (axis, &i) in axes.iter().zip(&combo) {
            set_path(&mut t, &axis.0, axis.1[i].clone());
            label.push(format!("{}={}", axis.0, short_value(&axis.1[i])));
        }
        for &seed in &seeds {
            let mut t = t.clone();
            t.insert("name".into(), toml::Value::String(name.clone()));
            t.insert("seed".into(), toml::Value::Integer(seed as i64));
            let spec: RunSpec = serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner().to_string();
                // For unknown fields the path names the table; add the offending key.
                let key = match unknown_field(&inner) {
                    Some(k) if key == "." => k,
                    Some(k) if !key.ends_with(&k) => format!("{key}.{k}"),
                    _ => key,
                };
                let inner = inner.lines().next().unwrap_or_default().to_string();
                SpecError(format!("{}: {inner}", origin(&key)))
            })?;
            spec.validate()
                .and_then(|_| check(&spec))
                .map_err(|(k, msg)| SpecError(format!("{}: {msg}", origin(&k))))?;
            let spec = spec.canonical();
            let id = spec.id();
            if !ids.insert(id.clone()) {
                continue; // a grid may name the same run twice (e.g. coverage 1.0 under two maskings)
            }
            // DP and the baselines ignore the SDP-only fields: leave them out of their labels.
            let mut l: Vec<String> = label
                .iter()
                .filter(|a| match a.strip_prefix("method.").and_then(|f| f.split('=').next()) {
                    Some(field) => spec.method_field_matters(field),
                    None => true,
                })
                .cloned()
                .collect();
            if seeds.len() > 1 || label.is_empty() {
                l.push(format!("seed={seed}"));
            }
            runs.push(Run { id, label: l.join(" "), spec });
        }
    }
    Ok(Experiment { name, description, path: path.to_path_buf(), runs })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.')
}

/// Extracts the key from serde's "unknown field `x`, expected …" message.
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

/// 1-based line of `key` (dotted path) in the parsed document, if it is there.
pub(super) fn key_line(doc: &toml_edit::ImDocument<String>, key: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
    let mut span = None;
    for (i, part) in parts.iter().enumerate() {
        let (k, item) = table.get_key_value(part)?;
        span = k.span().or(span);
        if i + 1 < parts.len() {
            table = item.as_table_like()?;
        }
    }
    let offset = span?.start;
    Some(doc.raw()[..offset].matches('\n').count() + 1)
}

/// Applies `a.b.c=value`; the value is TOML (`0.5`, `[1, 2]`, `"x"`), or a bare string. Returns the key.
fn apply_override(table: &mut toml::Table, o: &str) -> Result<String> {
    let (key, raw) = o.split_once('=').ok_or_else(|| anyhow!("expected key.path=value"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("invalid key path `{key}`");
    }
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry.as_table_mut().ok_or_else(|| anyhow!("`{p}` is not a table"))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(key.to_string())
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        match t.get_mut(*p).and_then(|v| v.as_table_mut()) {
            Some(inner) => t = inner,
            None => return, // axes are collected from this very table, so the path exists
        }
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
}

/// Grid axes: (dotted key, values) for every list at a scalar key, or list of lists at a list key.
fn collect_axes(table: &toml::Table, prefix: &str, out: &mut Vec<(String, Vec<toml::Value>)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => collect_axes(t, &key, out),
            toml::Value::Array(a) => {
                let is_axis = if LIST_KEYS.contains(&key.as_str()) {
                    !a.is_empty() && a.iter().all(|x| x.is_array())
                } else {
                    true
                };
                if is_axis && !a.is_empty() {
                    out.push((key, a.clone()));
                }
            }
            _ => {}
        }
    }
}

fn cartesian(axes: &[(String, Vec<toml::Value>)]) -> Vec<Vec<usize>> {
    let mut combos = vec![vec![]];
    for (_, values) in axes {
        let mut next = Vec::new();
        for c in &combos {
            for i in 0..values.len() {
                let mut c = c.clone();
                c.push(i);
                next.push(c);
            }
        }
        combos = next;
    }
    combos
}

fn short_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
