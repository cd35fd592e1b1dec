//! `kind: sample`: nanoGPT's sample.py. It owns the prompt (`start`, or `FILE:path`), drawing
//! `num_samples` continuations, side by side, each from its own seeded stream, and the files
//! they go to; the model comes from `model.rs`, the sampling loop (KV cache, top-k, temperature) is
//! `gpt/model.rs`'s `generate_with`. `nanoflow sample` runs the same code and prints as it goes.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};

use crate::formats::tokenizer::Utf8Stream;
use crate::gpt::source;
use crate::gpt::{GptConfig, Rng, Sampling};
use crate::{Context, Invalid, Report, Upstream, at_least_one, ensure};

/// 3: samples decoded side by side, each from its own stream of the seed. 4: a small model's
/// windows multiplied by `tiles`, the last layer's attention for the last query alone (the
/// logits' last bits, and so now and then a token, differ).
pub const VERSION: u32 = 4;

/// The KV cache changes the speed, not the tokens (tested).
pub const NON_SEMANTIC: &[&str] = &["kv_cache"];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[];

pub const RESUMABLE: bool = false;

/// What separates samples in samples.txt, as sample.py prints them.
pub const SEPARATOR: &str = "---------------";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The model: a train/finetune stage's output (`${stage}`), an export or other Hugging Face
    /// GPT-2 folder, or a Hub GPT-2 by name (`gpt2` ... `gpt2-xl`). Required.
    pub model: String,
    /// The prompt, or `FILE:path` to read it from a file (sample.py's `start`). Default "\n".
    pub start: String,
    /// Samples to draw (sample.py: 10).
    pub num_samples: usize,
    /// Tokens generated per sample (sample.py: 500).
    pub max_new_tokens: usize,
    /// 1.0 keeps the model's distribution, lower is more conservative, 0 greedy (sample.py: 0.8).
    pub temperature: f64,
    /// Keep only the k most likely tokens at each step; 0 keeps all (sample.py: 200).
    pub top_k: usize,
    /// One seed for all samples: the same seed gives the same text (sample.py: 1337).
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Reuse the keys and values of the context instead of recomputing it for every token
    /// (sample.py recomputes). Same text either way.
    pub kv_cache: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            model: String::new(),
            start: "\n".into(),
            num_samples: 10,
            max_new_tokens: 500,
            temperature: 0.8,
            top_k: 200,
            seed: 1337,
            device: "auto".into(),
            kv_cache: true,
        }
    }
}

/// The model folder and a `FILE:` prompt, when they are local paths.
pub fn local_inputs(config: &Config) -> Vec<String> {
    let mut paths = Vec::new();
    if !config.model.is_empty() && !GptConfig::PRESETS.contains(&config.model.as_str()) {
        paths.push(config.model.clone());
    }
    if let Some(path) = config.start.strip_prefix("FILE:") {
        paths.push(path.to_string());
    }
    paths
}

/// What a run of samples produced.
#[derive(Debug, Clone, Serialize)]
pub struct Samples {
    pub model: String,
    pub prompt: String,
    /// Each sample's text, prompt included (as sample.py prints it).
    pub samples: Vec<String>,
    pub tokens_generated: usize,
    /// How long it took: in the report (the manifest), not in samples.json, which a
    /// deterministic run writes the same each time.
    #[serde(skip)]
    pub seconds: f64,
}

/// Everything pipeline.yaml decides, before anything runs.
pub fn check(config: &Config, upstream: &Upstream) -> Result<(), Invalid> {
    crate::gpt::source::check("model", &config.model, upstream)?;
    ensure(!config.start.is_empty(), "start", || "is empty: the model needs at least one token to continue".into())?;
    at_least_one("num_samples", config.num_samples)?;
    at_least_one("max_new_tokens", config.max_new_tokens)?;
    ensure(config.temperature.is_finite() && config.temperature >= 0.0, "temperature", || {
        format!("must be 0 (greedy) or more, not {}", config.temperature)
    })?;
    crate::gpt::device::check(&config.device)
}

/// Something to show while sampling: a piece of a sample's text, or the end of one.
pub enum Event<'a> {
    Text(&'a str),
    EndOfSample,
}

/// How many samples to decode side by side: a step reads the weights once for all of them (0.5
/// GB for GPT-2 124M) and a window's matmuls have more rows, up to 16 samples and to 1 GiB of
/// keys and values. Sample k draws from `Rng::stream(seed, k)` and no sample's
/// tokens depend on the others', so the text is the same however many go together.
fn side_by_side(model: &GptConfig, samples: usize) -> usize {
    let cache = 2 * 4 * model.n_layer * model.block_size * model.n_embd;
    ((1usize << 30) / cache).clamp(1, 16).min(samples)
}

/// Draws the samples, calling `on_event` as text comes (from a thread of the decoding pool).
/// Relative paths resolve against `root`.
pub fn generate(config: &Config, root: &Path, on_event: &mut (dyn FnMut(Event) + Send)) -> anyhow::Result<Samples> {
    check(config, &Upstream::none())?;
    let model = source::load(&config.model, root, &config.device).context("`model`")?;
    let tokenizer = model.tokenizer()?;
    let prompt = match config.start.strip_prefix("FILE:") {
        Some(path) => fs_err::read_to_string(root.join(path)).context("`start`")?,
        None => config.start.clone(),
    };
    let ids = tokenizer.encode(&prompt).context("`start`: the prompt cannot be encoded")?;
    ensure!(!ids.is_empty(), "`start` is empty: the model needs at least one token to continue");
    eprintln!("sampling from {} ({:.2}M parameters)", model.description, model.config().num_params(true) as f64 / 1e6);

    let sampling = Sampling {
        max_new_tokens: config.max_new_tokens,
        temperature: config.temperature,
        top_k: (config.top_k > 0).then_some(config.top_k),
        kv_cache: config.kv_cache,
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    let group = side_by_side(model.config(), config.num_samples);
    for first in (0..config.num_samples).step_by(group) {
        let mut rngs: Vec<Rng> =
            (first..config.num_samples.min(first + group)).map(|k| Rng::stream(config.seed, k as u64)).collect();
        // The group's first sample shows as it is drawn, the others when the group is done.
        on_event(Event::Text(&prompt));
        let mut stream = Utf8Stream::default();
        let out = model.generate(&ids, &sampling, &mut rngs, &mut |next| {
            let text = stream.push(&tokenizer.decode_bytes(&next[..1]));
            if !text.is_empty() {
                on_event(Event::Text(&text));
            }
            Ok(())
        })?;
        on_event(Event::Text(&stream.finish()));
        on_event(Event::EndOfSample);
        for (k, tokens) in out.iter().enumerate() {
            let text = tokenizer.decode(tokens);
            if k > 0 {
                on_event(Event::Text(&text));
                on_event(Event::EndOfSample);
            }
            samples.push(text);
        }
    }
    Ok(Samples {
        model: model.description.clone(),
        prompt,
        samples,
        tokens_generated: config.num_samples * config.max_new_tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// samples.txt (the samples between sample.py's separators) and samples.json (settings and
/// samples).
pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let samples = generate(config, &ctx.root, &mut |event| match event {
        Event::Text(text) => eprint!("{text}"),
        Event::EndOfSample => eprintln!("\n{SEPARATOR}"),
    })?;
    let mut text = String::new();
    for sample in &samples.samples {
        text.push_str(sample);
        text.push('\n');
        text.push_str(SEPARATOR);
        text.push('\n');
    }
    fs_err::write(ctx.out.join("samples.txt"), text)?;
    let json = serde_json::json!({
        "settings": ctx.portable(serde_json::to_value(config)?),
        "result": ctx.portable(serde_json::to_value(&samples)?),
    });
    fs_err::write(ctx.out.join("samples.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    let rate = samples.tokens_generated as f64 / samples.seconds.max(1e-9);
    let mut report = Report {
        summary: format!("{} samples of {} tokens, {rate:.0} tokens/s", config.num_samples, config.max_new_tokens),
        ..Report::default()
    };
    report.metrics.insert("tokens_per_second".into(), serde_json::json!(rate));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests as test_support;

    #[test]
    fn samples_repeat_with_the_seed_and_stream_what_they_write() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = test_support::char_data(dir.path());
        let train = test_support::context(dir.path(), "model");
        crate::train::run(&test_support::tiny(data), &train)?;

        let ctx = Context::for_test(&dir.path().join("s"), "sample");
        let config = Config {
            model: train.out.to_string_lossy().into_owned(),
            start: "ab".into(),
            num_samples: 3,
            max_new_tokens: 40,
            device: "cpu".into(),
            ..Config::default()
        };
        run(&config, &ctx)?;
        let text = fs_err::read_to_string(ctx.out.join("samples.txt"))?;
        assert_eq!(text.matches(SEPARATOR).count(), 3);
        assert!(text.starts_with("ab"), "{text}");

        let mut streamed = String::new();
        let again = generate(&config, &ctx.root, &mut |event| match event {
            Event::Text(text) => streamed.push_str(text),
            Event::EndOfSample => streamed.push('|'),
        })?;
        let joined: String = again.samples.iter().map(|s| format!("{s}|")).collect();
        assert_eq!(streamed, joined);
        let from_file: Vec<&str> = text.split(&format!("\n{SEPARATOR}\n")).filter(|s| !s.is_empty()).collect();
        assert_eq!(from_file, again.samples);
        // Drawn alone, the first sample is the same text as beside the others.
        let alone = generate(&Config { num_samples: 1, ..config.clone() }, &ctx.root, &mut |_| {})?;
        assert_eq!(alone.samples[..], again.samples[..1]);
        // Without the cache: the same text.
        let uncached = generate(&Config { kv_cache: false, ..config.clone() }, &ctx.root, &mut |_| {})?;
        assert_eq!(uncached.samples, again.samples);
        // Another seed: other text.
        let other = generate(&Config { seed: 7, ..config.clone() }, &ctx.root, &mut |_| {})?;
        assert_ne!(other.samples, again.samples);

        let bad = generate(&Config { start: "a~".into(), ..config.clone() }, &ctx.root, &mut |_| {}).unwrap_err();
        assert!(format!("{bad:#}").contains("'~' is not in the vocabulary"), "{bad:#}");
        let missing = generate(&Config { model: "nowhere".into(), ..config }, &ctx.root, &mut |_| {}).unwrap_err();
        assert!(format!("{missing:#}").contains("`nowhere` is not a model"), "{missing:#}");
        Ok(())
    }
}
