//! The Hugging Face GPT-2 layout (model.safetensors + config.json), read and written: how a
//! nanoflow GPT becomes `GPT2LMHeadModel.from_pretrained(dir)` and back. Variable names are the
//! GPT-2 keys without the `transformer.` prefix; the files store the linear weights as Conv1D,
//! (in, out), and `is_conv1d` is the one place that knows which.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;

use crate::gpt::config::{INIT_STD, LAYER_NORM_EPS};
use crate::gpt::model::lock;
use crate::gpt::{Gpt, GptConfig};

/// `save_pretrained` writes GPT2LMHeadModel's keys under its base model, `transformer.`.
pub(crate) const HF_PREFIX: &str = "transformer.";

impl Gpt {
    /// Loads a Hugging Face GPT-2 (a folder with model.safetensors and config.json, or the
    /// .safetensors file with config.json beside it) into `varmap`. Keys may carry the
    /// `transformer.` prefix (`save_pretrained`) or not (the Hub's openai-community/gpt2);
    /// `lm_head.weight`, if present, must equal `wte.weight`, and the attention mask buffers are
    /// skipped. Dropout starts at 0; set `config.dropout` to train with it.
    pub fn load_hf(dir_or_file: &Path, varmap: &VarMap, device: &Device) -> anyhow::Result<Gpt> {
        let (weights, config_path) = if dir_or_file.is_dir() {
            (dir_or_file.join("model.safetensors"), dir_or_file.join("config.json"))
        } else {
            (dir_or_file.to_path_buf(), dir_or_file.with_file_name("config.json"))
        };
        let config = read_hf_config(&config_path)?;
        let tensors = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("could not read `{}`", weights.display()))?;
        let mut vars = HashMap::new();
        let mut lm_head = None;
        for (key, tensor) in tensors {
            let name = key.strip_prefix(HF_PREFIX).unwrap_or(&key);
            let tensor = tensor.to_dtype(DType::F32)?;
            if name == "lm_head.weight" {
                lm_head = Some(tensor);
            } else if !(name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")) {
                let tensor = if is_conv1d(name) { tensor.t()?.contiguous()? } else { tensor };
                vars.insert(name.to_string(), Var::from_tensor(&tensor)?);
            }
        }
        let tensors = vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        let gpt = Gpt::new(&config, VarBuilder::from_tensors(tensors, DType::F32, device))
            .with_context(|| format!("`{}` does not hold the GPT-2 its config.json describes", weights.display()))?;
        let count: usize = vars.values().map(|var| var.elem_count()).sum();
        ensure!(
            count == config.num_params(false),
            "`{}` holds {count} parameters, its config.json describes {}",
            weights.display(),
            config.num_params(false)
        );
        if let Some(lm_head) = lm_head {
            let tied = lm_head.shape() == gpt.wte.embeddings().shape()
                && lm_head.sub(gpt.wte.embeddings())?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
            ensure!(tied, "`{}` has an `lm_head.weight` that differs from `wte.weight`", weights.display());
        }
        lock(varmap.data()).extend(vars);
        Ok(gpt)
    }

    /// Writes `varmap` as a Hugging Face GPT-2 into `dir`: model.safetensors with
    /// `save_pretrained`'s keys (`transformer.` prefix, Conv1D orientation, no `lm_head.weight`)
    /// and config.json, so that `GPT2LMHeadModel.from_pretrained(dir)` loads it. A model without
    /// biases gets zero ones, which computes the same: HF's GPT-2 always has them.
    pub fn save_hf(&self, varmap: &VarMap, dir: &Path) -> anyhow::Result<()> {
        let vars: HashMap<String, Tensor> =
            lock(varmap.data()).iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        let mut tensors = HashMap::new();
        for (name, tensor) in &vars {
            let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let biasless = name
                .strip_suffix(".weight")
                .filter(|layer| !matches!(*layer, "wte" | "wpe") && !vars.contains_key(&format!("{layer}.bias")));
            if let Some(layer) = biasless {
                tensors.insert(
                    format!("{HF_PREFIX}{layer}.bias"),
                    Tensor::zeros(tensor.dim(0)?, DType::F32, &Device::Cpu)?,
                );
            }
            let tensor = if is_conv1d(name) { tensor.t()?.contiguous()? } else { tensor };
            tensors.insert(format!("{HF_PREFIX}{name}"), tensor);
        }
        fs_err::create_dir_all(dir)?;
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights)
            .with_context(|| format!("could not write `{}`", weights.display()))?;
        // safetensors creates the file readable by its owner only; an export is for everyone.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(&weights, std::fs::Permissions::from_mode(0o644))?;
        }
        let config = &self.config;
        let mut hf = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "initializer_range": INIT_STD,
            "tie_word_embeddings": true,
        });
        // GPT-2's `<|endoftext|>` where the vocabulary has it; none otherwise (transformers
        // would assume 50256).
        let end_of_text = if config.vocab_size > 50256 { serde_json::json!(50256) } else { serde_json::Value::Null };
        hf["bos_token_id"] = end_of_text.clone();
        hf["eos_token_id"] = end_of_text;
        fs_err::write(dir.join("config.json"), serde_json::to_string_pretty(&hf)? + "\n")?;
        Ok(())
    }
}

/// Hugging Face's GPT-2 implements its linear layers as Conv1D, whose weight is (in, out).
pub(crate) fn is_conv1d(name: &str) -> bool {
    [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"].iter().any(|suffix| name.ends_with(suffix))
}

/// The config.json fields a GPT-2 needs; the rest (tokenizer ids, task heads) are ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

/// A GPT-2 config.json as a `GptConfig`, refusing variants this model does not compute.
fn read_hf_config(path: &Path) -> anyhow::Result<GptConfig> {
    let text = fs_err::read_to_string(path)?;
    let hf: HfConfig = serde_json::from_str(&text).with_context(|| format!("could not parse `{}`", path.display()))?;
    let unsupported = |what: String| -> anyhow::Result<GptConfig> {
        bail!("`{}` describes a model nanoflow's GPT does not implement: {what}", path.display())
    };
    if let Some(model_type) = hf.model_type.filter(|model_type| model_type != "gpt2") {
        return unsupported(format!("`model_type` is `{model_type}`, not `gpt2`"));
    }
    if let Some(activation) = hf.activation_function.filter(|a| a != "gelu_new" && a != "gelu_pytorch_tanh") {
        return unsupported(format!("`activation_function` is `{activation}`, not `gelu_new`"));
    }
    if let Some(eps) = hf.layer_norm_epsilon.filter(|eps| (eps - LAYER_NORM_EPS).abs() > 1e-12) {
        return unsupported(format!("`layer_norm_epsilon` is {eps}, not {LAYER_NORM_EPS}"));
    }
    if let Some(n_inner) = hf.n_inner.filter(|n_inner| *n_inner != 4 * hf.n_embd) {
        return unsupported(format!("`n_inner` is {n_inner}, not 4 * `n_embd`"));
    }
    if hf.scale_attn_by_inverse_layer_idx {
        return unsupported("`scale_attn_by_inverse_layer_idx` is true".to_string());
    }
    let block_size =
        hf.n_positions.or(hf.n_ctx).with_context(|| format!("`{}` has no `n_positions`", path.display()))?;
    let config = GptConfig {
        block_size,
        vocab_size: hf.vocab_size,
        n_layer: hf.n_layer,
        n_head: hf.n_head,
        n_embd: hf.n_embd,
        dropout: 0.0,
        bias: true,
    };
    config.check().with_context(|| format!("`{}`", path.display()))?;
    Ok(config)
}
