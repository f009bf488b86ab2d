//! Token shards and the `tokens:<dir>` dataset source: the text a language-model workload trains on
//! (docs/design.md §6).
//!
//! A shard is a file in the llm.c / modded-nanogpt `.bin` format: a header of 256 little-endian int32
//! (`[0]` the magic 20240520, `[1]` the version 1, `[2]` the token count), then that many little-endian
//! uint16 token ids. Shards are never loaded whole: an example is read with one `pread` (two where it
//! crosses from one shard into the next).
//!
//! A token directory holds `*train*.bin` and `*val*.bin` shards (a split is its shards in name order, read
//! as one stream of tokens) and, where `sdp data tokenize` wrote them, `tokens.json` ([`Sidecar`]: the
//! tokenizer, the vocabulary size, where the text came from, each shard's token count and sha256). Without
//! one, the vocabulary is GPT-2's 50,257 tokens. The vocabulary size is the dataset's class count, from which
//! a model's vocabulary is built as a classifier's head is from the class count.
//!
//! An example ([`TokenWindows`]) is a window of `context + 1` tokens: its first `context` are the input, its
//! last `context` the targets (the token after each input position). The train split holds
//! floor(tokens / (context + 1)) examples, and a training batch reads example i at an offset drawn from the
//! epoch's key and i ([`Stream::Windows`]), so an epoch sees windows at every alignment while any worker
//! building the batch reads the same tokens. Evaluation (and the val split always) reads the consecutive,
//! non-overlapping windows: example i starts at token i·(context + 1).

use super::augment::AugmentCfg;
use super::examples::{Batch, Examples, Input};
use super::source::{DataSource, Request, Shape};
use super::Dataset;
use crate::seed::{rng, Stream};
use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first header int of a shard.
pub const MAGIC: i32 = 20240520;
/// The format version (uint16 tokens).
pub const VERSION: i32 = 1;
/// 256 int32.
pub const HEADER_BYTES: u64 = 256 * 4;
/// GPT-2's vocabulary: 50,256 BPE tokens and `<|endoftext|>`; a directory without `tokens.json` has it.
pub const GPT2_VOCAB: usize = 50257;
/// Tokens per training sequence where `workload.context` is not given.
pub const DEFAULT_CONTEXT: usize = 128;
/// The sidecar's file name in a token directory.
pub const SIDECAR: &str = "tokens.json";

/// The little-endian int32 number `i` of a header.
fn header_int(head: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([head[4 * i], head[4 * i + 1], head[4 * i + 2], head[4 * i + 3]])
}

/// One shard file, its header and length checked.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    file: File,
    tokens: usize,
}

impl Shard {
    /// Opens `path`, checking the header's magic, version and token count, and that the file holds exactly
    /// those tokens. Errors name the file and the byte offset where it goes wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("opening {p}"))?;
        let bytes = file.metadata().with_context(|| format!("reading the size of {p}"))?.len();
        if bytes < HEADER_BYTES {
            bail!("{p}: byte {bytes}: the file ends inside the {HEADER_BYTES}-byte header");
        }
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0).with_context(|| format!("reading the header of {p}"))?;
        let (magic, version, count) = (header_int(&head, 0), header_int(&head, 1), header_int(&head, 2));
        ensure!(magic == MAGIC, "{p}: byte 0: magic {magic}, expected {MAGIC}");
        ensure!(version == VERSION, "{p}: byte 4: version {version}, expected {VERSION}");
        ensure!(count >= 0, "{p}: byte 8: token count {count} is negative");
        let end = HEADER_BYTES + 2 * count as u64;
        if bytes < end {
            bail!("{p}: byte {bytes}: the file ends there, but the header's {count} tokens end at byte {end} (truncated?)");
        }
        if bytes > end {
            bail!("{p}: byte {end}: {} more bytes after the header's {count} tokens", bytes - end);
        }
        Ok(Self { path: path.to_path_buf(), file, tokens: count as usize })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the shard.
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Tokens `start..start + out.len()` into `out`, in one read; a token not below `vocab` is an error
    /// naming the shard and its byte offset.
    pub fn read(&self, start: usize, out: &mut [u16], vocab: usize) -> Result<()> {
        let p = self.path.display();
        ensure!(
            start + out.len() <= self.tokens,
            "{p}: tokens {start}..{} asked of a shard of {} tokens",
            start + out.len(),
            self.tokens
        );
        let at = HEADER_BYTES + 2 * start as u64;
        let mut bytes = vec![0u8; 2 * out.len()];
        self.file.read_exact_at(&mut bytes, at).with_context(|| format!("reading {p} at byte {at}"))?;
        for (i, (t, b)) in out.iter_mut().zip(bytes.chunks_exact(2)).enumerate() {
            *t = u16::from_le_bytes([b[0], b[1]]);
            check_token(*t, vocab, &self.path, at + 2 * i as u64)?;
        }
        Ok(())
    }

    /// Reads the whole file in 1 MiB pieces: its sha256 (lowercase hex, as `sha256sum` prints it), and
    /// whether every token is below `vocab` (the error names the first that is not).
    fn scan(&self, vocab: usize) -> Result<(String, Result<()>)> {
        let p = self.path.display();
        let total = HEADER_BYTES + 2 * self.tokens as u64;
        let mut hash = Sha256::new();
        let mut range = Ok(());
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < total {
            let n = (total - at).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], at).with_context(|| format!("reading {p} at byte {at}"))?;
            hash.update(&buf[..n]);
            if range.is_ok() {
                // Pieces are even-sized and start at even offsets, so each holds whole tokens.
                let first = HEADER_BYTES.saturating_sub(at).min(n as u64) as usize;
                for (i, b) in buf[first..n].chunks_exact(2).enumerate() {
                    let off = at + (first + 2 * i) as u64;
                    range = check_token(u16::from_le_bytes([b[0], b[1]]), vocab, &self.path, off);
                    if range.is_err() {
                        break;
                    }
                }
            }
            at += n as u64;
        }
        Ok((hex(&hash.finalize()), range))
    }
}

fn check_token(t: u16, vocab: usize, path: &Path, byte: u64) -> Result<()> {
    if t as usize >= vocab {
        bail!("{}: byte {byte}: token {t} is not below the vocabulary size {vocab}", path.display());
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `tokens` as a shard at `path`: into a temporary file beside it, then renamed into place, so that
/// no half-written shard is ever left under a shard's name. Returns the file's sha256 (lowercase hex).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<String> {
    let count = i32::try_from(tokens.len())
        .with_context(|| format!("{}: {} tokens do not fit a shard header's int32", path.display(), tokens.len()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut hash = Sha256::new();
    let write = |hash: &mut Sha256| -> std::io::Result<()> {
        let mut head = [0u8; HEADER_BYTES as usize];
        for (i, v) in [MAGIC, VERSION, count].into_iter().enumerate() {
            head[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        let mut f = BufWriter::new(File::create(&tmp)?);
        f.write_all(&head)?;
        hash.update(head);
        for chunk in tokens.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
            f.write_all(&bytes)?;
            hash.update(&bytes);
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    if let Err(e) = write(&mut hash) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(hex(&hash.finalize()))
}

/// `tokens.json`: what a token directory holds (written by `sdp data tokenize`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sidecar {
    /// The tokenizer (`gpt2`, `gpt2-prefix-<V>`).
    pub tokenizer: String,
    /// Every token id is below it: the model's vocabulary.
    pub vocab_size: usize,
    /// The id of `<|endoftext|>`, which starts every document.
    #[serde(default)]
    pub eot: Option<u32>,
    /// Where the text came from and how it was split.
    #[serde(default)]
    pub source: String,
    /// Tokens in all shards of each split.
    #[serde(default)]
    pub train_tokens: u64,
    #[serde(default)]
    pub val_tokens: u64,
    /// UTF-8 bytes of the text each split was made from (`<|endoftext|>` separators not counted; 0: not
    /// recorded): bits per byte = nats per token / (ln 2 · bytes per token).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub train_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub val_bytes: u64,
    /// Every shard of the directory (none: a sidecar that only gives the vocabulary).
    #[serde(default)]
    pub shards: Vec<ShardEntry>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One shard as the sidecar records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// File name in the directory.
    pub file: String,
    pub tokens: u64,
    /// sha256 of the whole file, lowercase hex.
    pub sha256: String,
}

impl Sidecar {
    /// The sidecar of token directory `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(SIDECAR);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let s: Sidecar = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            (2..=1 << 16).contains(&s.vocab_size),
            "{}: vocab_size {} is not in 2..=65536 (shards hold uint16 ids)",
            path.display(),
            s.vocab_size
        );
        Ok(Some(s))
    }

    /// Bytes of text per token of the validation split, where the sidecar records its bytes.
    pub fn val_bytes_per_token(&self) -> Option<f64> {
        (self.val_bytes > 0 && self.val_tokens > 0).then(|| self.val_bytes as f64 / self.val_tokens as f64)
    }

    /// Writes `<dir>/tokens.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        crate::io::write_atomic(&dir.join(SIDECAR), text.as_bytes())
    }
}

/// The two splits of a token directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// What a shard's file name contains.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// A token directory: its shards opened (headers and lengths checked), its sidecar read and matched
/// against them.
#[derive(Debug)]
pub struct TokenDir {
    pub dir: PathBuf,
    pub train: Vec<Shard>,
    pub val: Vec<Shard>,
    pub sidecar: Option<Sidecar>,
    /// The sidecar's vocabulary size, or GPT-2's.
    pub vocab: usize,
}

impl TokenDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let d = dir.display();
        ensure!(dir.is_dir(), "{d}: not a directory (a token directory holds *train*.bin and *val*.bin shards)");
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {d}"))? {
            let name = entry.with_context(|| format!("reading {d}"))?.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".bin") {
                continue;
            }
            match (name.contains("train"), name.contains("val")) {
                (true, true) => bail!("{d}: shard {name} names both splits (train and val)"),
                (true, false) => train.push(name),
                (false, true) => val.push(name),
                (false, false) => {}
            }
        }
        for (split, names) in [(Split::Train, &mut train), (Split::Val, &mut val)] {
            ensure!(!names.is_empty(), "{d}: no *{}*.bin shards", split.name());
            names.sort();
        }
        let open = |names: &[String]| names.iter().map(|n| Shard::open(&dir.join(n))).collect::<Result<Vec<_>>>();
        let (train, val) = (open(&train)?, open(&val)?);
        let sidecar = Sidecar::read(dir)?;
        if let Some(s) = sidecar.as_ref().filter(|s| !s.shards.is_empty()) {
            let path = dir.join(SIDECAR);
            for shard in train.iter().chain(&val) {
                let name = shard.path.file_name().unwrap_or_default().to_string_lossy();
                let Some(e) = s.shards.iter().find(|e| e.file == name) else {
                    bail!("{}: not listed in {}", shard.path.display(), path.display());
                };
                ensure!(
                    e.tokens == shard.len() as u64,
                    "{}: {} tokens, but {} says {}",
                    shard.path.display(),
                    shard.len(),
                    path.display(),
                    e.tokens
                );
            }
            for e in &s.shards {
                ensure!(dir.join(&e.file).is_file(), "{}: lists shard {}, which is not in {d}", path.display(), e.file);
            }
        }
        let vocab = sidecar.as_ref().map_or(GPT2_VOCAB, |s| s.vocab_size);
        Ok(Self { dir: dir.to_path_buf(), train, val, sidecar, vocab })
    }

    pub fn shards(&self, split: Split) -> &[Shard] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Tokens in all shards of `split`.
    pub fn tokens(&self, split: Split) -> usize {
        self.shards(split).iter().map(Shard::len).sum()
    }

    /// Examples of `split` at `context` tokens: floor(tokens / (context + 1)); none is an error.
    pub fn windows(&self, split: Split, context: usize) -> Result<usize> {
        let n = self.tokens(split);
        ensure!(
            n > context,
            "{}: the {} split holds {n} tokens, fewer than one sequence of context + 1 = {} tokens",
            self.dir.display(),
            split.name(),
            context + 1
        );
        Ok(n / (context + 1))
    }

    /// Reads every shard through once: its sha256 against the sidecar's (where it lists shards), and every
    /// token against the vocabulary. Errors name the shard (and the token's byte offset).
    pub fn verify(&self) -> Result<()> {
        let shards: Vec<&Shard> = self.train.iter().chain(&self.val).collect();
        // Every shard is read (in parallel), and the first error in shard order is the one reported.
        let checked: Vec<Result<()>> = shards
            .par_iter()
            .map(|shard| -> Result<()> {
                let (sum, range) = shard.scan(self.vocab)?;
                let name = shard.path.file_name().unwrap_or_default().to_string_lossy();
                let listed = self.sidecar.as_ref().and_then(|s| s.shards.iter().find(|e| e.file == name));
                if let Some(e) = listed {
                    ensure!(
                        e.sha256.eq_ignore_ascii_case(&sum),
                        "{}: sha256 {sum}, but {} says {}",
                        shard.path.display(),
                        self.dir.join(SIDECAR).display(),
                        e.sha256
                    );
                }
                range
            })
            .collect();
        checked.into_iter().collect()
    }

    /// The examples of `split` at `context` tokens per sequence (the directory's files are read from then on,
    /// not loaded).
    pub fn into_windows(self, context: usize) -> Result<(TokenWindows, TokenWindows)> {
        let (nt, nv) = (self.windows(Split::Train, context)?, self.windows(Split::Val, context)?);
        let vocab = self.vocab;
        let make = |shards: Vec<Shard>, n: usize, random: bool| TokenWindows {
            stream: Arc::new(TokenStream::new(shards, vocab)),
            context,
            random,
            windows: n,
            keep: None,
        };
        Ok((make(self.train, nt, true), make(self.val, nv, false)))
    }
}

/// A split's shards, in name order, read as one stream of tokens.
#[derive(Debug)]
struct TokenStream {
    shards: Vec<Shard>,
    /// Where each shard starts in the stream.
    starts: Vec<usize>,
    tokens: usize,
    vocab: usize,
}

impl TokenStream {
    fn new(shards: Vec<Shard>, vocab: usize) -> Self {
        let mut starts = Vec::with_capacity(shards.len());
        let mut tokens = 0;
        for s in &shards {
            starts.push(tokens);
            tokens += s.len();
        }
        Self { shards, starts, tokens, vocab }
    }

    /// Tokens `start..start + out.len()` of the stream: one read per shard the range touches.
    fn read(&self, start: usize, out: &mut [u16]) -> Result<()> {
        ensure!(
            start + out.len() <= self.tokens,
            "tokens {start}..{} asked of a split of {} tokens",
            start + out.len(),
            self.tokens
        );
        let mut k = self.starts.partition_point(|&s| s <= start).saturating_sub(1);
        let (mut at, mut done) = (start, 0);
        while done < out.len() {
            let shard = &self.shards[k]; // in range: the check above, and the shards' lengths sum to `tokens`
            let from = at - self.starts[k];
            let n = (shard.len() - from).min(out.len() - done);
            shard.read(from, &mut out[done..done + n], self.vocab)?;
            (at, done, k) = (at + n, done + n, k + 1);
        }
        Ok(())
    }
}

/// One split of a token directory as training reads it: windows of `context + 1` tokens (module docs).
#[derive(Clone, Debug)]
pub struct TokenWindows {
    stream: Arc<TokenStream>,
    context: usize,
    /// The train split: a training batch draws each window's offset from the epoch key.
    random: bool,
    /// Windows in the whole split: floor(tokens / (context + 1)).
    windows: usize,
    /// The windows this split's examples are (a subset, ascending); `None`: all of them.
    keep: Option<Arc<[usize]>>,
}

impl TokenWindows {
    /// Tokens per sequence.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Tokens in the split's shards.
    pub fn tokens(&self) -> usize {
        self.stream.tokens
    }

    /// The vocabulary the tokens were checked against.
    pub fn vocab(&self) -> usize {
        self.stream.vocab
    }

    /// Which of the split's windows example `i` is.
    fn window_index(&self, i: usize) -> usize {
        self.keep.as_ref().map_or(i, |k| k[i])
    }

    /// Where example `i` starts in the split's token stream: a training batch's (`epoch_key` given, train
    /// split) drawn from the key and the window, otherwise window i's consecutive place i·(context + 1).
    pub fn start(&self, i: usize, epoch_key: Option<u64>) -> usize {
        let w = self.window_index(i);
        match epoch_key {
            Some(key) if self.random => {
                let last = self.stream.tokens - (self.context + 1);
                rng(key, Stream::Windows, w as u64, 0).random_range(0..=last)
            }
            _ => w * (self.context + 1),
        }
    }

    /// The `context + 1` tokens of example `i`.
    pub fn window(&self, i: usize, epoch_key: Option<u64>) -> Result<Vec<u16>> {
        let mut out = vec![0u16; self.context + 1];
        self.stream.read(self.start(i, epoch_key), &mut out)?;
        Ok(out)
    }
}

impl Examples for TokenWindows {
    fn len(&self) -> usize {
        self.keep.as_ref().map_or(self.windows, |k| k.len())
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.context]
    }

    /// Inputs and targets (batch, context) of u32 ids; nothing to augment.
    fn batch(&self, indices: &[usize], _cfg: &AugmentCfg, epoch_key: Option<u64>) -> Batch {
        let (n, c) = (indices.len(), self.context);
        let (mut x, mut y) = (Vec::with_capacity(n * c), Vec::with_capacity(n * c));
        let mut w = vec![0u16; c + 1];
        for &i in indices {
            // Every file's length and every token were checked when the split was loaded, so what can fail
            // here is the disk itself, and `Examples::batch` has no error to return it through.
            if let Err(e) = self.stream.read(self.start(i, epoch_key), &mut w) {
                panic!("reading example {i} of a token split: {e:#}");
            }
            x.extend(w[..c].iter().map(|&t| t as u32));
            y.extend(w[1..].iter().map(|&t| t as u32));
        }
        Batch { x: Input::U32(x), x_dims: vec![n, c], y, y_dims: vec![n, c] }
    }

    /// `n` of the split's windows drawn from `seed`'s data stream, kept in order: the val split then
    /// evaluates those consecutive windows, the train split draws `n` windows per epoch.
    fn subset(&self, n: usize, seed: u64) -> Arc<dyn Examples> {
        if n >= self.len() {
            return Arc::new(self.clone());
        }
        let mut r = rng(seed, Stream::Data, u64::MAX, 0);
        let mut picked = rand::seq::index::sample(&mut r, self.len(), n).into_vec();
        picked.sort_unstable();
        let keep: Arc<[usize]> = picked.into_iter().map(|i| self.window_index(i)).collect();
        Arc::new(Self { keep: Some(keep), ..self.clone() })
    }
}

/// The registered `tokens:<dir>` source (a relative path is looked up under the data directory).
pub struct TokenShards;

/// `workload.context`, or the default.
fn context(req: &Request) -> Result<usize> {
    let c = req.context.unwrap_or(DEFAULT_CONTEXT);
    ensure!(c > 0, "workload.context must be at least 1");
    Ok(c)
}

impl DataSource for TokenShards {
    /// Reads the shards' headers and the sidecar (no token).
    fn shape(&self, req: &Request) -> Result<Shape> {
        let dir = TokenDir::open(&req.path())?;
        let c = context(req)?;
        Ok(Shape {
            train: dir.windows(Split::Train, c)?,
            test: dir.windows(Split::Val, c)?,
            classes: dir.vocab,
            hw: (1, c),
        })
    }

    /// Checks every shard (sha256 against the sidecar, every token below the vocabulary), then serves windows
    /// from the files.
    fn load(&self, req: &Request) -> Result<Dataset> {
        let dir = TokenDir::open(&req.path())?;
        dir.verify()?;
        let vocab = dir.vocab;
        let (train, test) = dir.into_windows(context(req)?)?;
        Ok(Dataset {
            name: format!("tokens:{}", req.arg.unwrap_or_default()),
            train: Arc::new(train),
            test: Arc::new(test),
            classes: (0..vocab).map(|t| t.to_string()).collect(),
            mean: [0.0; 3],
            std: [1.0; 3],
        })
    }

    fn task(&self) -> &'static str {
        "next_token"
    }

    /// The sidecar's tokenizer, source, tokens and bytes per split, and the factor that turns a validation
    /// loss in nats per token into bits per byte.
    fn notes(&self, req: &Request) -> Vec<String> {
        let dir = req.path();
        let s = match Sidecar::read(&dir) {
            Ok(Some(s)) => s,
            Ok(None) => return vec![format!("no {SIDECAR}: GPT-2's vocabulary of {GPT2_VOCAB} assumed")],
            Err(e) => return vec![format!("{e:#}")],
        };
        let mut out = vec![format!("tokenizer {} (vocabulary {}), from: {}", s.tokenizer, s.vocab_size, s.source)];
        for (split, tokens, bytes) in [("train", s.train_tokens, s.train_bytes), ("val", s.val_tokens, s.val_bytes)] {
            out.push(match bytes {
                0 => format!("{split}: {tokens} tokens (bytes of text not recorded)"),
                b => format!(
                    "{split}: {tokens} tokens from {b} bytes of text, {:.4} bytes per token",
                    b as f64 / tokens as f64
                ),
            });
        }
        if let Some(bpt) = s.val_bytes_per_token() {
            let f = 1.0 / (std::f64::consts::LN_2 * bpt);
            out.push(format!("validation bits per byte = validation nats per token x {f:.5}"));
        }
        out
    }

    /// Random tokens below the vocabulary, inputs and targets of (n, context).
    fn random_batch(&self, shape: &Shape, n: usize, r: &mut ChaCha8Rng) -> Batch {
        let c = shape.hw.1;
        let mut ids = |k: usize| -> Vec<u32> { (0..k).map(|_| r.random_range(0..shape.classes as u32)).collect() };
        let x = ids(n * c);
        let y = ids(n * c);
        Batch { x: Input::U32(x), x_dims: vec![n, c], y, y_dims: vec![n, c] }
    }
}
