//! `kind: eval`: the numbers models are compared by, as one table. It owns two measures and
//! the table they fill:
//!
//! - loss: the mean train and val loss over `eval_iters` batches drawn at seeded random offsets
//!   of a tokenize stage's shards, the same batches for every model (nanoGPT's eval_gpt2*.py
//!   configs and the baseline table of its README);
//! - HellaSwag: build-nanogpt's scoring — each ending is scored by the loss of its tokens after
//!   the context; `acc` takes the lowest total, `acc_norm` the lowest mean per token.
//!
//! Results go to `results.parquet` (one row per model), `results.md` (the same as a markdown
//! table) and the stage log. Models come from `model.rs`: Hub GPT-2s by name, stage outputs and
//! exports alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail, ensure};
use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray};
use serde::{Deserialize, Serialize};

use crate::formats::meta::Meta;
use crate::formats::shard::TokenSplit;
use crate::formats::tokenizer::Tokenizer;
use crate::gpt::source::{self, Model};
use crate::gpt::{GptConfig, Rng};
use crate::{Context, Invalid, Progress, Report, Unit, Upstream, at_least_one, ensure};

pub const VERSION: u32 = 1;

pub const NON_SEMANTIC: &[&str] = &[];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[("block_size", "each model's context")];

pub const RESUMABLE: bool = false;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The models, one row each: Hub GPT-2s by name (`gpt2` ... `gpt2-xl`), train/finetune stage
    /// outputs (`${stage}`), exports or other Hugging Face GPT-2 folders. Required.
    pub models: Vec<String>,
    /// A tokenize stage's output whose train and val shards the loss is measured on. Optional:
    /// without it there are no loss columns.
    pub data: String,
    /// Batches per split (nanoGPT's eval_gpt2 configs: 500).
    pub eval_iters: usize,
    /// Sequences per batch (nanoGPT's eval_gpt2 configs: 8).
    pub batch_size: usize,
    /// Tokens per sequence; unset: each model's own context (1024 for GPT-2). Must fit every
    /// model.
    pub block_size: Option<usize>,
    /// Where the batches are drawn: the same seed gives the same batches, for every model.
    pub seed: u64,
    /// HellaSwag's validation set: its jsonl file, or a folder holding one `.jsonl` (a download
    /// stage of `hellaswag_val.jsonl`). Optional: without it there are no HellaSwag columns.
    pub hellaswag: String,
    /// Score only the first `limit` HellaSwag examples; 0: all (10,042 in the validation set).
    pub limit: usize,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            models: Vec::new(),
            data: String::new(),
            eval_iters: 500,
            batch_size: 8,
            block_size: None,
            seed: 1337,
            hellaswag: String::new(),
            limit: 0,
            device: "auto".into(),
        }
    }
}

pub fn local_inputs(config: &Config) -> Vec<String> {
    let mut paths: Vec<String> =
        config.models.iter().filter(|model| !GptConfig::PRESETS.contains(&model.as_str())).cloned().collect();
    paths.extend([config.data.clone(), config.hellaswag.clone()]);
    paths.retain(|path| !path.is_empty());
    paths
}

/// One model's row of the table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub model: String,
    /// Parameters, position embeddings excluded (nanoGPT's count).
    pub params: i64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub hellaswag_acc: Option<f64>,
    pub hellaswag_acc_norm: Option<f64>,
    pub hellaswag_examples: Option<i64>,
}

/// Everything pipeline.yaml decides, before anything runs.
pub fn check(config: &Config, upstream: &Upstream) -> Result<(), Invalid> {
    if config.models.is_empty() {
        return Err(Invalid::required("models", format!("a list of models, each {}", source::FORMS)));
    }
    for (i, model) in config.models.iter().enumerate() {
        source::check(&format!("models[{i}]"), model, upstream)?;
    }
    ensure(!config.data.is_empty() || !config.hellaswag.is_empty(), "", || {
        "nothing to measure: set `data` (a tokenize stage's output) for losses, `hellaswag` for HellaSwag, or both"
            .to_string()
    })?;
    upstream.expect("data", &config.data, &["tokenize", "command"], "a tokenize stage's output")?;
    upstream.expect(
        "hellaswag",
        &config.hellaswag,
        &["download", "command"],
        "HellaSwag's jsonl (a download stage's output)",
    )?;
    at_least_one("eval_iters", config.eval_iters)?;
    at_least_one("batch_size", config.batch_size)?;
    if let Some(block_size) = config.block_size {
        at_least_one("block_size", block_size)?;
    }
    crate::gpt::device::check(&config.device)
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let data = match config.data.is_empty() {
        true => None,
        false => Some(Data::open(&ctx.root.join(&config.data)).context("`data`")?),
    };
    let hellaswag = match config.hellaswag.is_empty() {
        true => None,
        false => Some(hellaswag_examples(&ctx.root.join(&config.hellaswag), config.limit).context("`hellaswag`")?),
    };

    let mut rows = Vec::new();
    for (i, spec) in config.models.iter().enumerate() {
        let model = source::load(spec, &ctx.root, &config.device).with_context(|| format!("`models[{i}]`"))?;
        eprintln!("evaluating {}", model.description);
        let mut row = Row { model: spec_name(spec), params: model.config().num_params(true) as i64, ..Row::default() };
        if let Some(data) = &data {
            let [train, val] = data.losses(&model, config).with_context(|| format!("`models[{i}]` on `data`"))?;
            eprintln!("  train loss {train:.4}, val loss {val:.4}");
            (row.train_loss, row.val_loss) = (Some(train), Some(val));
        }
        if let Some(examples) = &hellaswag {
            let score = score_hellaswag(&model, examples).with_context(|| format!("`models[{i}]` on HellaSwag"))?;
            eprintln!("  hellaswag acc {:.4}, acc_norm {:.4} ({} examples)", score.acc, score.acc_norm, score.examples);
            row.hellaswag_acc = Some(score.acc);
            row.hellaswag_acc_norm = Some(score.acc_norm);
            row.hellaswag_examples = Some(score.examples as i64);
        }
        rows.push(row);
    }

    write_parquet(&ctx.out.join("results.parquet"), &rows)?;
    let table = markdown(&rows);
    fs_err::write(ctx.out.join("results.md"), &table)?;
    eprint!("\n{table}");
    let mut report = Report { summary: summary(&rows), ..Report::default() };
    report.metrics.insert("results".into(), serde_json::to_value(&rows)?);
    Ok(report)
}

/// How a model is named in the table: a stage output's path is long and says little, so
/// `artifacts/NAME/<key>/out` becomes `NAME`.
fn spec_name(spec: &str) -> String {
    let parts: Vec<&str> = spec.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        [.., "artifacts", stage, _, "out"] | [.., "artifacts", stage, "current"] => stage.to_string(),
        _ => spec.to_string(),
    }
}

fn summary(rows: &[Row]) -> String {
    let cells: Vec<String> = rows
        .iter()
        .map(|row| {
            let mut parts = Vec::new();
            if let Some(val) = row.val_loss {
                parts.push(format!("val {val:.4}"));
            }
            if let Some(acc) = row.hellaswag_acc_norm {
                parts.push(format!("hellaswag {acc:.4}"));
            }
            format!("{}: {}", row.model, parts.join(", "))
        })
        .collect();
    cells.join("; ")
}

/// The token shards of `data`, checked once.
struct Data {
    dir: PathBuf,
    tokenizer: Option<Tokenizer>,
    vocab_size: usize,
    train: TokenSplit,
    val: TokenSplit,
}

impl Data {
    fn open(dir: &Path) -> anyhow::Result<Data> {
        let meta = Meta::read(dir)?;
        Ok(Data {
            dir: dir.to_path_buf(),
            tokenizer: Tokenizer::from_meta(&meta).ok(),
            vocab_size: meta.vocab_size,
            train: TokenSplit::open(dir, "train")?,
            val: TokenSplit::open(dir, "val")?,
        })
    }

    /// nanoGPT's estimate_loss for one model: [train, val].
    fn losses(&self, model: &Model, config: &Config) -> anyhow::Result<[f64; 2]> {
        let gpt = model.config();
        if let (Some(ours), Some(theirs)) = (&self.tokenizer, &model.tokenizer)
            && ours.name() != theirs.name()
        {
            bail!("the data is tokenized with `{}`, the model with `{}`", ours.name().as_str(), theirs.name().as_str());
        }
        ensure!(
            self.vocab_size <= gpt.vocab_size,
            "the data's vocabulary ({}) does not fit the model's ({})",
            self.vocab_size,
            gpt.vocab_size
        );
        let block_size = config.block_size.unwrap_or(gpt.block_size);
        ensure!(
            block_size <= gpt.block_size,
            "`block_size: {block_size}` is longer than the model's context ({})",
            gpt.block_size
        );
        let mut out = [0.0; 2];
        for (split, (data, mean)) in [&self.train, &self.val].into_iter().zip(out.iter_mut()).enumerate() {
            let name = ["train", "val"][split];
            ensure!(
                data.len() > block_size as u64,
                "the {name} split of `{}` has {} tokens, fewer than `block_size` + 1",
                self.dir.display(),
                data.len()
            );
            let mut rng = Rng::new(config.seed ^ (split as u64) << 32);
            let mut progress = Progress::new(format!("{name} loss"), Unit::Items, Some(config.eval_iters as u64));
            let iters = config.eval_iters;
            *mean = model.mean_loss(data, &mut rng, iters, config.batch_size, block_size, &mut || progress.inc(1))?;
            progress.finish();
        }
        Ok(out)
    }
}

/// One HellaSwag question: a context and four endings, one right.
#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    pub ctx: String,
    pub endings: Vec<String>,
    pub label: usize,
}

/// The examples of a HellaSwag jsonl (the first `limit`, unless 0).
fn hellaswag_examples(path: &Path, limit: usize) -> anyhow::Result<Vec<Example>> {
    let file = if path.is_dir() {
        let mut jsonl: Vec<PathBuf> = fs_err::read_dir(path)?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
            .collect();
        match jsonl.len() {
            1 => jsonl.remove(0),
            n => bail!("`{}` holds {n} .jsonl files; name the one to use", path.display()),
        }
    } else {
        path.to_path_buf()
    };
    let text = fs_err::read_to_string(&file)?;
    let mut examples = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let example: Example = serde_json::from_str(line).with_context(|| {
            format!("`{}` line {}: not a HellaSwag example (`ctx`, `endings`, `label`)", file.display(), number + 1)
        })?;
        ensure!(
            example.label < example.endings.len(),
            "`{}` line {}: `label` {} but {} endings",
            file.display(),
            number + 1,
            example.label,
            example.endings.len()
        );
        examples.push(example);
        if examples.len() == limit {
            break;
        }
    }
    ensure!(!examples.is_empty(), "`{}` holds no examples", file.display());
    Ok(examples)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub acc: f64,
    pub acc_norm: f64,
    pub examples: usize,
}

fn score_hellaswag(model: &Model, examples: &[Example]) -> anyhow::Result<Score> {
    let tokenizer = model.tokenizer()?;
    let (mut correct, mut correct_norm) = (0, 0);
    let mut progress = Progress::new("hellaswag", Unit::Items, Some(examples.len() as u64));
    for (i, example) in examples.iter().enumerate() {
        let losses = ending_losses(model, tokenizer, example).with_context(|| format!("example {i}"))?;
        let argmin =
            |values: Vec<f64>| (0..values.len()).fold(0, |best, j| if values[j] < values[best] { j } else { best });
        correct += usize::from(argmin(losses.iter().map(|(sum, _)| *sum).collect()) == example.label);
        correct_norm += usize::from(argmin(losses.iter().map(|(_, mean)| *mean).collect()) == example.label);
        progress.inc(1);
    }
    progress.finish();
    let n = examples.len() as f64;
    Ok(Score { acc: correct as f64 / n, acc_norm: correct_norm as f64 / n, examples: examples.len() })
}

/// (total, mean) cross-entropy of each ending's tokens after the context, as build-nanogpt's
/// hellaswag.py: the ending is encoded with a leading space (see `Model::ending_losses`).
pub fn ending_losses(model: &Model, tokenizer: &Tokenizer, example: &Example) -> anyhow::Result<Vec<(f64, f64)>> {
    let context = tokenizer.encode(&example.ctx)?;
    let endings = example
        .endings
        .iter()
        .map(|ending| tokenizer.encode(&format!(" {ending}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    model.ending_losses(&context, &endings)
}

fn write_parquet(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let float = |get: fn(&Row) -> Option<f64>| -> ArrayRef { Arc::new(rows.iter().map(get).collect::<Float64Array>()) };
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("model", Arc::new(rows.iter().map(|row| Some(row.model.as_str())).collect::<StringArray>()), false),
        ("params", Arc::new(rows.iter().map(|row| Some(row.params)).collect::<Int64Array>()), false),
        ("train_loss", float(|row| row.train_loss), true),
        ("val_loss", float(|row| row.val_loss), true),
        ("hellaswag_acc", float(|row| row.hellaswag_acc), true),
        ("hellaswag_acc_norm", float(|row| row.hellaswag_acc_norm), true),
        ("hellaswag_examples", Arc::new(rows.iter().map(|row| row.hellaswag_examples).collect::<Int64Array>()), true),
    ];
    crate::formats::table::write(path, columns)
}

/// The table of nanoGPT's README (model, params, train loss, val loss), plus HellaSwag columns
/// when measured. Columns no row has are left out.
pub fn markdown(rows: &[Row]) -> String {
    let has = |get: fn(&Row) -> Option<f64>| rows.iter().any(|row| get(row).is_some());
    let mut header = vec!["model".to_string(), "params".to_string()];
    let mut columns: Vec<fn(&Row) -> Option<f64>> = Vec::new();
    for (name, get) in [
        ("train loss", (|row: &Row| row.train_loss) as fn(&Row) -> Option<f64>),
        ("val loss", |row: &Row| row.val_loss),
        ("hellaswag acc", |row: &Row| row.hellaswag_acc),
        ("hellaswag acc_norm", |row: &Row| row.hellaswag_acc_norm),
    ] {
        if has(get) {
            header.push(name.to_string());
            columns.push(get);
        }
    }
    let mut lines = vec![header.clone()];
    for row in rows {
        let mut cells = vec![row.model.clone(), format_params(row.params)];
        cells.extend(columns.iter().map(|get| get(row).map_or("-".into(), |v| format!("{v:.4}"))));
        lines.push(cells);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| lines.iter().map(|cells| cells[c].chars().count()).max().unwrap_or(0)).collect();
    let format_line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, &w)| format!("{cell:<w$}")).collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = format_line(&lines[0]);
    out.push_str(&format!("|{}|\n", widths.iter().map(|&w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|")));
    for cells in &lines[1..] {
        out.push_str(&format_line(cells));
    }
    out
}

/// 124337664 -> `124M`, 15232 -> `15.2K`, as nanoGPT's README writes sizes.
fn format_params(params: i64) -> String {
    let p = params as f64;
    if p >= 1e9 {
        format!("{:.2}B", p / 1e9)
    } else if p >= 1e6 {
        format!("{:.0}M", p / 1e6)
    } else if p >= 1e3 {
        format!("{:.1}K", p / 1e3)
    } else {
        params.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests as test_support;
    use candle_core::{D, Device, IndexOp, Tensor};

    #[test]
    fn spec_names_are_stage_names() {
        assert_eq!(spec_name("/x/artifacts/ci-model/0123456789abcdef/out"), "ci-model");
        assert_eq!(spec_name("artifacts/ci-model/current/"), "ci-model");
        assert_eq!(spec_name("gpt2"), "gpt2");
        assert_eq!(format_params(123_653_376), "124M");
        assert_eq!(format_params(1_557_611_200), "1.56B");
    }

    /// Two models on the same batches, a table with both, and HellaSwag endings scored as a direct
    /// computation of each ending's loss scores them.
    #[test]
    fn losses_and_hellaswag_fill_the_table() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = test_support::char_data(dir.path());
        let trained = test_support::context(dir.path(), "trained");
        crate::train::run(&crate::train::Config { max_iters: 20, ..test_support::tiny(data.clone()) }, &trained)?;
        let untrained = test_support::context(dir.path(), "untrained");
        crate::train::run(&crate::train::Config { max_iters: 0, ..test_support::tiny(data.clone()) }, &untrained)?;

        let corpus = fs_err::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ci/hellaswag.jsonl"))?;
        let hellaswag = dir.path().join("hs.jsonl");
        fs_err::write(&hellaswag, &corpus)?;
        let ctx = Context::for_test(&dir.path().join("eval"), "eval");
        let config = Config {
            models: vec![untrained.out.display().to_string(), trained.out.display().to_string()],
            data: data.clone(),
            eval_iters: 4,
            batch_size: 4,
            hellaswag: hellaswag.display().to_string(),
            limit: 6,
            device: "cpu".into(),
            ..Config::default()
        };
        run(&config, &ctx)?;
        let table = fs_err::read_to_string(ctx.out.join("results.md"))?;
        assert!(table.starts_with("| model"), "{table}");
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.contains("hellaswag acc_norm"), "{table}");
        assert!(ctx.out.join("results.parquet").exists());
        // The trained model's val loss is lower; the untrained one is near ln(vocab).
        let losses: Vec<f64> =
            table.lines().skip(2).map(|line| line.split('|').nth(4).unwrap().trim().parse().unwrap()).collect();
        assert!(losses[1] < losses[0] - 0.3, "{table}");

        // HellaSwag scores, checked against the losses of each ending computed one at a time.
        let model = source::load(&trained.out.display().to_string(), dir.path(), "cpu")?;
        let tokenizer = model.tokenizer()?;
        let example = &hellaswag_examples(&hellaswag, 1)?[0];
        let batched = ending_losses(&model, tokenizer, example)?;
        for (ending, (sum, mean)) in example.endings.iter().zip(&batched) {
            let tokens = tokenizer.encode(&format!("{} {ending}", example.ctx))?;
            // Rows longer than the context keep their last block_size + 1 tokens.
            let dropped = tokens.len().saturating_sub(model.config().block_size + 1);
            let tokens = &tokens[dropped..];
            let context = &tokenizer.encode(&example.ctx)?[dropped..];
            let x = Tensor::new(&tokens[..tokens.len() - 1], &Device::Cpu)?.unsqueeze(0)?;
            let log_probs = candle_nn::ops::log_softmax(&model.gpt.forward(&x, false)?, D::Minus1)?.squeeze(0)?;
            let mut expected = 0.0;
            for (position, &token) in tokens.iter().enumerate().skip(context.len()) {
                expected -= log_probs.i((position - 1, token as usize))?.to_scalar::<f32>()? as f64;
            }
            assert!((sum - expected).abs() < 1e-3, "{sum} vs {expected}");
            assert!((mean - expected / (tokens.len() - context.len()) as f64).abs() < 1e-4);
        }

        let bad = Config { hellaswag: data, ..config };
        let error = run(&bad, &ctx).unwrap_err();
        assert!(format!("{error:#}").contains("`hellaswag`"), "{error:#}");
        Ok(())
    }
}
