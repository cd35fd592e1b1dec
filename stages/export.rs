//! `kind: export`: a model in the Hugging Face GPT-2 layout, for everything outside nanoflow
//! (`GPT2LMHeadModel.from_pretrained(dir)`), and as a model for `finetune`, `sample` and `eval`.
//! It owns choosing the files; the tensor names and orientation are `gpt/hf.rs`'s `save_hf`, the
//! tokenizer files `tokenizer.rs`'s.
//!
//! Output: `model.safetensors` (`transformer.`-prefixed keys, Conv1D weights (in, out), the tied
//! `lm_head` left out, zero biases for a model trained without), `config.json`, and the
//! tokenizer: `vocab.json` + `merges.txt` (+ `tokenizer_config.json`, `special_tokens_map.json`)
//! for GPT-2 BPE, `char_vocab.json` for a character vocabulary.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::gpt::GptConfig;
use crate::gpt::source;
use crate::{Context, Invalid, Report, Upstream};

pub const VERSION: u32 = 1;

pub const NON_SEMANTIC: &[&str] = &[];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[];

pub const RESUMABLE: bool = false;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The model: a train/finetune stage's output (`${stage}`, its best checkpoint), another
    /// Hugging Face GPT-2 folder, or a Hub GPT-2 by name. Required.
    pub model: String,
}

pub fn local_inputs(config: &Config) -> Vec<String> {
    match config.model.is_empty() || GptConfig::PRESETS.contains(&config.model.as_str()) {
        true => Vec::new(),
        false => vec![config.model.clone()],
    }
}

/// Everything pipeline.yaml decides, before anything runs.
pub fn check(config: &Config, upstream: &Upstream) -> Result<(), Invalid> {
    source::check("model", &config.model, upstream)
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let model = source::load(&config.model, &ctx.root, "cpu").context("`model`")?;
    model.save_hf(&ctx.out)?;
    let mut files = vec!["model.safetensors", "config.json"];
    match &model.tokenizer {
        Some(tokenizer) => files.extend(tokenizer.write_export(&ctx.out)?),
        None => eprintln!("{} records no tokenizer: the export has none", model.description),
    }
    eprintln!("exported {} as {}", model.description, files.join(", "));
    let config = model.config();
    let tokenizer = model.tokenizer.as_ref().map_or("no", |tokenizer| tokenizer.name().as_str());
    let mut report = Report {
        summary: format!(
            "Hugging Face GPT-2, {:.2}M parameters, {} layers x {} wide, {tokenizer} tokenizer",
            config.num_params(true) as f64 / 1e6,
            config.n_layer,
            config.n_embd
        ),
        ..Report::default()
    };
    report.metrics.insert("params".into(), config.num_params(true).into());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests as test_support;
    use candle_core::{D, Device, Tensor};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(D::Minus1).unwrap().to_scalar().unwrap()
    }

    /// A biasless char model trained by nanoflow -> export -> loaded as a Hugging Face folder:
    /// the same logits, the same tokenizer; and an export of the export is the same files.
    #[test]
    fn export_round_trips_logits_and_tokenizer() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = test_support::char_data(dir.path());
        let trained = test_support::context(dir.path(), "trained");
        crate::train::run(&crate::train::Config { max_iters: 4, ..test_support::tiny(data) }, &trained)?;
        let ctx = Context::for_test(&dir.path().join("export"), "export");
        run(&Config { model: trained.out.display().to_string() }, &ctx)?;
        for file in ["model.safetensors", "config.json", crate::formats::tokenizer::CHAR_VOCAB] {
            assert!(ctx.out.join(file).exists(), "{file}");
        }

        let original = source::load(&trained.out.display().to_string(), dir.path(), "cpu")?;
        let exported = source::load(&ctx.out.display().to_string(), dir.path(), "cpu")?;
        assert!(!original.gpt.config.bias && exported.gpt.config.bias, "zero biases were added");
        let idx = Tensor::new(&[[1u32, 5, 9, 13, 2, 7], [0, 3, 3, 8, 20, 31]], &Device::Cpu)?;
        let diff = max_abs_diff(&original.gpt.forward(&idx, false)?, &exported.gpt.forward(&idx, false)?);
        assert!(diff < 1e-6, "logits differ by {diff}");
        let text = "To be, or not";
        assert_eq!(exported.tokenizer()?.encode(text)?, original.tokenizer()?.encode(text)?);

        let again = Context::for_test(&dir.path().join("again"), "export");
        run(&Config { model: ctx.out.display().to_string() }, &again)?;
        for file in ["config.json", crate::formats::tokenizer::CHAR_VOCAB] {
            assert_eq!(fs_err::read(ctx.out.join(file))?, fs_err::read(again.out.join(file))?, "{file}");
        }
        Ok(())
    }

    /// `tests/fixtures/tiny-export` is an export nanoflow wrote; `transformers` loaded it and
    /// wrote its logits (make_export_fixture.py). nanoflow reads the folder to the same logits,
    /// and exporting it again writes the committed files.
    #[test]
    fn transformers_reads_an_export_as_nanoflow_does() -> anyhow::Result<()> {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let export = fixtures.join("tiny-export");
        let reference =
            candle_core::safetensors::load(fixtures.join("tiny-export-reference.safetensors"), &Device::Cpu)?;
        let idx = reference["idx"].to_dtype(candle_core::DType::U32)?;
        let model = source::load(&export.display().to_string(), &fixtures, "cpu")?;
        let logits = model.gpt.forward(&idx, false)?;
        assert_eq!(logits.dims(), reference["logits"].dims());
        let diff = max_abs_diff(&logits, &reference["logits"]);
        assert!(diff < 1e-4, "logits differ from transformers' by {diff}");

        let dir = tempfile::tempdir()?;
        let ctx = Context::for_test(dir.path(), "export");
        run(&Config { model: export.display().to_string() }, &ctx)?;
        for file in ["config.json", crate::formats::tokenizer::CHAR_VOCAB] {
            assert_eq!(
                fs_err::read_to_string(export.join(file))?,
                fs_err::read_to_string(ctx.out.join(file))?,
                "{file}"
            );
        }
        let committed = candle_core::safetensors::load(export.join("model.safetensors"), &Device::Cpu)?;
        let written = candle_core::safetensors::load(ctx.out.join("model.safetensors"), &Device::Cpu)?;
        let mut names: Vec<_> = committed.keys().collect();
        names.sort();
        assert_eq!(names, {
            let mut w: Vec<_> = written.keys().collect();
            w.sort();
            w
        });
        for name in names {
            assert_eq!(max_abs_diff(&committed[name], &written[name]), 0.0, "{name}");
        }
        Ok(())
    }
}
