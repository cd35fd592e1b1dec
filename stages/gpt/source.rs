//! Where a trained model comes from, for every kind that reads one (`train`/`finetune`'s
//! `init_from`, `sample`, `eval`, `export`) and for `nanoflow sample`: one name, three forms.
//!
//! - a GPT-2 of the Hub by name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`
//!   (`openai-community/NAME`, fetched through hf-hub into the Hub cache, `HF_ENDPOINT` honoured);
//! - the output of a `train` or `finetune` stage: its best checkpoint (`ckpt.json`);
//! - a folder in the Hugging Face GPT-2 layout (`config.json` + `model.safetensors`): an
//!   `export` stage's output or a `download` stage's.
//!
//! The tokenizer comes along where the folder records one (see `tokenizer.rs`); the Hub's GPT-2s
//! and Hugging Face folders with GPT-2's vocabulary size use GPT-2 BPE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::fetch::hub::{self, Hub};
use crate::formats::shard::TokenSplit;
use crate::formats::tokenizer::Tokenizer;
use crate::gpt::checkpoint;
use crate::gpt::sampling::OnTokens;
use crate::gpt::{Gpt, GptConfig, Rng, Sampling, batches};
use crate::{Invalid, Upstream};

/// A model's shape and weights, not yet built: what `init_from` crops and checks before use.
pub struct Source {
    pub config: GptConfig,
    /// By nanoflow's names (`wte.weight`, `h.0.attn.c_attn.weight`, ...), nanoflow's orientation.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Option<Tokenizer>,
    /// For messages: `gpt2 (Hub)`, `the best checkpoint of DIR (iter N)`, ...
    pub description: String,
    /// The folder the weights were read from.
    pub dir: PathBuf,
}

/// The shape a train stage asks of weights it starts from: unset keys take the checkpoint's;
/// set ones must match it, except a smaller `block_size`, which crops (nanoGPT's
/// `crop_block_size`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AskedShape {
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub vocab_size: Option<usize>,
    pub bias: Option<bool>,
    pub block_size: Option<usize>,
    /// Not a property of the weights: whatever the stage asks.
    pub dropout: f64,
}

impl AskedShape {
    /// The model to build from a checkpoint of shape `found` (read from `dir`, for messages).
    pub fn resolve(&self, found: &GptConfig, dir: &Path) -> anyhow::Result<GptConfig> {
        for (key, asked, found) in [
            ("n_layer", self.n_layer, found.n_layer),
            ("n_head", self.n_head, found.n_head),
            ("n_embd", self.n_embd, found.n_embd),
            ("vocab_size", self.vocab_size, found.vocab_size),
        ] {
            if let Some(asked) = asked.filter(|&asked| asked != found) {
                bail!("`{key}: {asked}` does not match the checkpoint's {found} in `{}`", dir.display());
            }
        }
        if let Some(bias) = self.bias.filter(|&bias| bias != found.bias) {
            bail!("`bias: {bias}` does not match the checkpoint's {} in `{}`", found.bias, dir.display());
        }
        let block_size = self.block_size.unwrap_or(found.block_size);
        anyhow::ensure!(
            block_size <= found.block_size,
            "`block_size: {block_size}` is larger than the checkpoint's {}; it can only shrink",
            found.block_size
        );
        Ok(GptConfig { block_size, dropout: self.dropout, ..found.clone() })
    }
}

/// A model ready to run.
pub struct Model {
    pub gpt: Gpt,
    pub varmap: VarMap,
    pub tokenizer: Option<Tokenizer>,
    pub description: String,
    pub dir: PathBuf,
    pub device: Device,
}

/// What `spec` may be, for error messages.
pub const FORMS: &str = "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a train stage's output (ckpt.json) or a Hugging Face GPT-2 folder (config.json)";

/// The kinds of stage whose output is a model: a train or finetune stage (its best checkpoint),
/// an export or a download (a Hugging Face GPT-2 folder), or a command that writes one.
pub const KINDS: &[&str] = &["train", "finetune", "export", "download", "command"];

/// A param naming a model (`key` is e.g. `model` or `models[1]`): required, and a stage output
/// only of a kind that makes one.
pub fn check(key: &str, spec: &str, upstream: &Upstream) -> Result<(), Invalid> {
    crate::required(key, spec, || FORMS.to_string())?;
    upstream.expect(key, spec, KINDS, "a model (the output of a train, finetune, export or download stage)")
}

/// Reads the model `spec` names (see the module docs); relative paths resolve against `root`.
pub fn source(spec: &str, root: &Path, device: &Device) -> anyhow::Result<Source> {
    if GptConfig::PRESETS.contains(&spec) {
        let dir = fetch_gpt2(spec)?;
        let mut source = hugging_face(&dir, device)?;
        source.description = format!("{spec} (openai-community/{spec} on the Hub)");
        return Ok(source);
    }
    let dir = root.join(spec);
    if checkpoint::state_path(&dir, "ckpt").exists() {
        let state = checkpoint::load_state(&dir, "ckpt")?
            .with_context(|| format!("the checkpoint in `{}` is incomplete", dir.display()))?;
        let path = checkpoint::model_path(&dir, "ckpt");
        let tensors = candle_core::safetensors::load(&path, device)
            .with_context(|| format!("could not read model `{}`", path.display()))?;
        Ok(Source {
            config: state.model,
            tensors,
            tokenizer: Tokenizer::from_dir(&dir)?,
            description: format!(
                "the best checkpoint of `{}` (iter {}, val loss {:.4})",
                dir.display(),
                state.iter,
                state.val_loss
            ),
            dir,
        })
    } else if dir.join("config.json").exists() {
        hugging_face(&dir, device)
    } else if dir.exists() {
        bail!("`{}` holds no model: expected {FORMS}", dir.display())
    } else {
        bail!("`{spec}` is not a model: expected {FORMS}")
    }
}

/// Builds the model `spec` names, with dropout off.
pub fn load(spec: &str, root: &Path, device: &str) -> anyhow::Result<Model> {
    let device = &crate::gpt::device::by_name(device)?;
    let Source { config, tensors, tokenizer, description, dir } = source(spec, root, device)?;
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().expect("varmap lock");
        for (name, tensor) in tensors {
            vars.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
        }
    }
    let gpt = Gpt::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, device))
        .with_context(|| format!("{description} does not hold the GPT its config describes"))?;
    Ok(Model { gpt, varmap, tokenizer, description, dir, device: device.clone() })
}

impl Model {
    pub fn config(&self) -> &GptConfig {
        &self.gpt.config
    }

    /// Writes the model in the Hugging Face GPT-2 layout (see `Gpt::save_hf`).
    pub fn save_hf(&self, dir: &Path) -> anyhow::Result<()> {
        self.gpt.save_hf(&self.varmap, dir)
    }

    /// `prompt` continued once per generator in `rngs`, side by side (see `Gpt::generate_with`):
    /// each the prompt and its new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
        on_tokens: &mut OnTokens,
    ) -> anyhow::Result<Vec<Vec<u32>>> {
        let rows: Vec<u32> = rngs.iter().flat_map(|_| prompt).copied().collect();
        let idx = Tensor::from_vec(rows, (rngs.len(), prompt.len()), &self.device)?; // (B, T)
        Ok(self.gpt.generate_with(&idx, sampling, rngs, on_tokens)?.to_vec2::<u32>()?)
    }

    /// The mean loss over `iters` batches of `data` drawn from `rng` (see `batches::mean_loss`).
    pub fn mean_loss(
        &self,
        data: &TokenSplit,
        rng: &mut Rng,
        iters: usize,
        batch_size: usize,
        block_size: usize,
        on_batch: &mut dyn FnMut(),
    ) -> anyhow::Result<f64> {
        batches::mean_loss(&self.gpt, data, rng, iters, batch_size, block_size, &self.device, on_batch)
    }

    /// (total, mean) cross-entropy of each ending's tokens after `context`, in one batch (as
    /// build-nanogpt's hellaswag.py scores them): rows padded to the longest, only ending tokens
    /// counted, and a row longer than the model's context keeping its last tokens.
    pub fn ending_losses(&self, context: &[u32], endings: &[Vec<u32>]) -> anyhow::Result<Vec<(f64, f64)>> {
        let mut rows = Vec::new();
        for ending in endings {
            anyhow::ensure!(!ending.is_empty(), "an ending encodes to no tokens");
            let mut tokens = context.to_vec();
            tokens.extend(ending);
            let mut mask = vec![0u8; context.len()];
            mask.extend(std::iter::repeat_n(1, ending.len()));
            let keep = self.gpt.config.block_size + 1;
            if tokens.len() > keep {
                tokens.drain(..tokens.len() - keep);
                mask.drain(..mask.len() - keep);
            }
            rows.push((tokens, mask));
        }
        let t = rows.iter().map(|(tokens, _)| tokens.len()).max().unwrap_or(0);
        let n = rows.len();
        let (mut x, mut y, mut m): (Vec<u32>, Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new(), Vec::new());
        for (tokens, mask) in &rows {
            let pad = t - tokens.len();
            let padded: Vec<u32> = tokens.iter().copied().chain(std::iter::repeat_n(0, pad)).collect();
            x.extend(&padded[..t - 1]);
            y.extend(&padded[1..]);
            m.extend(mask[1..].iter().map(|&v| v as f32).chain(std::iter::repeat_n(0.0, pad)));
        }
        let device = &self.device;
        let x = Tensor::from_vec(x, (n, t - 1), device)?;
        let y = Tensor::from_vec(y, (n, t - 1, 1), device)?;
        let logits = self.gpt.forward(&x, false)?; // (N, T-1, V)
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let losses = log_probs.gather(&y, 2)?.squeeze(2)?.neg()?; // (N, T-1)
        let mask = Tensor::from_vec(m, (n, t - 1), device)?;
        let sums = (losses * &mask)?.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let counts = mask.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(sums.into_iter().zip(counts).map(|(sum, count)| (sum, sum / count)).collect())
    }

    /// The tokenizer, or an error saying why a model without one cannot be used here.
    pub fn tokenizer(&self) -> anyhow::Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "{} records no tokenizer (no meta.json, char_vocab.json or vocab.json), so text cannot be turned into its tokens",
                self.description
            )
        })
    }
}

fn hugging_face(dir: &Path, device: &Device) -> anyhow::Result<Source> {
    let varmap = VarMap::new();
    let model = Gpt::load_hf(dir, &varmap, device)?;
    let tensors =
        varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let tokenizer = match Tokenizer::from_dir(dir)? {
        Some(tokenizer) => Some(tokenizer),
        // GPT-2's own vocabulary, or nanoGPT's padding of it.
        None => [50257, 50304].contains(&model.config.vocab_size).then_some(Tokenizer::Gpt2),
    };
    Ok(Source {
        config: model.config.clone(),
        tensors,
        tokenizer,
        description: format!("the Hugging Face GPT-2 in `{}`", dir.display()),
        dir: dir.to_path_buf(),
    })
}

/// Reads the model `spec` names once on the CPU, so that a Hub model is fetched (and a broken
/// one reported) by one process rather than by every rank at the same time.
pub fn prefetch(spec: &str, root: &Path) -> anyhow::Result<()> {
    source(spec, root, &Device::Cpu).map(|_| ())
}

/// `openai-community/NAME`'s config.json and model.safetensors in the Hub cache: their folder.
fn fetch_gpt2(name: &str) -> anyhow::Result<PathBuf> {
    let hub = Hub {
        repo: format!("openai-community/{name}"),
        files: vec!["config.json".into(), "model.safetensors".into()],
        ..Hub::default()
    };
    let retry = crate::fetch::http::Retry { retries: 5, backoff: Duration::from_secs(1) };
    let paths = hub::fetch(&hub, retry).with_context(|| format!("could not fetch `{name}` from the Hub"))?;
    let dir = paths[1].parent().context("a cached file has a folder")?;
    Ok(dir.to_path_buf())
}
