//! The mechanism behind every registry of named extensions (model families, datasets, tasks, masking
//! strategies): the
//! built-in entries, one line each in a const slice, then the entries registered while the program runs
//! (a downstream crate, a test), after them. A name can be taken once.

use anyhow::{bail, Result};
use std::sync::RwLock;

/// An entry's name, as specs write it.
pub trait Named {
    fn name(&self) -> &'static str;
}

/// Built-in entries and those registered at run time.
pub struct Registry<T: 'static> {
    /// What an entry is, for messages (`a dataset named …`).
    what: &'static str,
    builtin: &'static [T],
    extra: RwLock<Vec<T>>,
}

impl<T: Named + Copy + 'static> Registry<T> {
    pub const fn new(what: &'static str, builtin: &'static [T]) -> Self {
        Self { what, builtin, extra: RwLock::new(Vec::new()) }
    }

    /// Adds `entry` after the others; a name already taken is an error.
    pub fn register(&self, entry: T) -> Result<()> {
        let mut extra = self.extra.write().unwrap_or_else(|p| p.into_inner());
        let name = entry.name();
        if self.builtin.iter().chain(extra.iter()).any(|e| e.name() == name) {
            bail!("a {} named `{name}` is registered already", self.what);
        }
        extra.push(entry);
        Ok(())
    }

    /// Every entry: the built-in ones, then the registered ones in registration order.
    pub fn all(&self) -> Vec<T> {
        let extra = self.extra.read().unwrap_or_else(|p| p.into_inner());
        self.builtin.iter().chain(extra.iter()).copied().collect()
    }

    /// The entry called `name`.
    pub fn find(&self, name: &str) -> Option<T> {
        self.all().into_iter().find(|e| e.name() == name)
    }

    /// Every entry's name.
    pub fn names(&self) -> Vec<&'static str> {
        self.all().iter().map(Named::name).collect()
    }
}
