//! Training checkpoints: what `train` and `finetune` leave in their output directory, and what a
//! re-run of an interrupted stage resumes from. It owns the file layout and writing a checkpoint
//! so that it counts only once it is complete; it does not know the training loop.
//!
//! A checkpoint named `NAME` (`ckpt`: the best by val loss, nanoGPT's `ckpt.pt`; `last`: the
//! latest, which at the end is the final model) is three files:
//!
//! - `NAME.safetensors`: the model's parameters under their GPT-2 names (`wte.weight`, ...);
//! - `NAME.optim.safetensors`: AdamW's `exp_avg.PARAM`, `exp_avg_sq.PARAM` and `step`;
//! - `NAME.json`: the `State` below (iteration, losses, the model and training configs, the
//!   batch sampler's RNG state) with the size and blake3 digest of the two files.
//!
//! Each file is written under a temporary name, fsynced and renamed; the JSON goes last and is
//! the mark. A reader checks the two digests, so a crash between renames (new weights, old JSON)
//! reads as an incomplete checkpoint rather than a wrong one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::gpt::GptConfig;
use crate::gpt::optim::AdamW;

/// `format` in every checkpoint's JSON.
pub const FORMAT: &str = "nanoflow-checkpoint";
/// Bumped when the layout changes; a reader refuses other versions.
pub const FORMAT_VERSION: u32 = 1;

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub version: u32,
    /// The iteration to run next: the evaluation at `iter` is done, its training step is not.
    pub iter: usize,
    /// The best val loss seen so far (nanoGPT's `best_val_loss`).
    pub best_val_loss: f64,
    /// The val loss measured at `iter` (the one this checkpoint was saved for).
    pub val_loss: f64,
    /// The model's shape: what `Gpt::new` needs to read `NAME.safetensors` back.
    pub model: GptConfig,
    /// The stage's resolved config, for people and for checking that a resume continues the
    /// same run.
    pub config: serde_json::Value,
    /// The state of the training-batch sampler, so a resumed run draws the same batches.
    pub rng: u64,
    /// Size and blake3 of each companion file, by file name.
    pub files: BTreeMap<String, FileDigest>,
    /// float16 training's loss scale (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::gpt::optim::LossScale>,
    /// The iteration whose state the best checkpoint (`ckpt`) holds as of this one: this one's
    /// own when it is saved as `ckpt` too. A resume checks `ckpt` against it and repairs what an
    /// interruption between writing `last` and `ckpt` left behind. (Absent in older checkpoints.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ckpt_iter: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub blake3: String,
}

pub fn model_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.safetensors"))
}

pub fn optimizer_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.optim.safetensors"))
}

pub fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes checkpoint `name` into `dir`: the parameters in `varmap`, the optimizer's state, and
/// `state` (whose `files` are filled in here).
pub fn save(dir: &Path, name: &str, varmap: &VarMap, optimizer: &AdamW, mut state: State) -> anyhow::Result<()> {
    state.files.clear();
    let model = model_path(dir, name);
    let digest = write_atomically(&model, |path| {
        varmap.save(path).with_context(|| format!("could not write model `{}`", path.display()))
    })?;
    state.files.insert(file_name(&model), digest);
    let optim = optimizer_path(dir, name);
    let digest = write_atomically(&optim, |path| optimizer.save(path))?;
    state.files.insert(file_name(&optim), digest);
    let json = serde_json::to_string_pretty(&state)? + "\n";
    write_atomically(&state_path(dir, name), |path| Ok(fs_err::write(path, &json)?))?;
    Ok(())
}

/// Removes what interrupted checkpoint writes leave behind: `.NAME.tmp` files of
/// `write_atomically` and safetensors' own `.tmpXXXXXX` siblings. Neither is ever an output.
pub fn remove_temporaries(dir: &Path) -> anyhow::Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let temporary = name.starts_with(".tmp") || (name.starts_with('.') && name.ends_with(".tmp"));
        if temporary && entry.file_type()?.is_file() {
            fs_err::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Reads the JSON of checkpoint `name` in `dir` if it is complete: `None` when there is none, or
/// when its files do not match their digests (an interrupted write; a note says so).
pub fn load_state(dir: &Path, name: &str) -> anyhow::Result<Option<State>> {
    let path = state_path(dir, name);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs_err::read_to_string(&path)?;
    let Ok(state) = serde_json::from_str::<State>(&text) else {
        // Damaged like a half-written checkpoint (the JSON is renamed into place whole, so only
        // outside hands make this): not resumed from.
        eprintln!("checkpoint `{}` does not parse, ignoring it", path.display());
        return Ok(None);
    };
    if state.format != FORMAT || state.version != FORMAT_VERSION {
        bail!(
            "`{}` is a `{}` version {} checkpoint, this nanoflow reads `{FORMAT}` version {FORMAT_VERSION}\nhint: re-run the stage that wrote it",
            path.display(),
            state.format,
            state.version
        );
    }
    for (file, expected) in &state.files {
        let found = digest(&dir.join(file)).ok();
        if found.as_ref() != Some(expected) {
            eprintln!("checkpoint `{}` is incomplete (`{file}` does not match), ignoring it", path.display());
            return Ok(None);
        }
    }
    Ok(Some(state))
}

/// Loads checkpoint `name`'s parameters into `varmap` (which must hold every parameter, with
/// the same shapes) and, when given, its optimizer state.
pub fn load_weights(dir: &Path, name: &str, varmap: &mut VarMap, optimizer: Option<&mut AdamW>) -> anyhow::Result<()> {
    let model = model_path(dir, name);
    varmap.load(&model).with_context(|| format!("could not load model `{}`", model.display()))?;
    if let Some(optimizer) = optimizer {
        optimizer.load(&optimizer_path(dir, name))?;
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Writes `path` through `formats::replace`; returns the size and digest of what was written.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<FileDigest> {
    crate::formats::replace(path, write)?;
    digest(path)
}

fn digest(path: &Path) -> anyhow::Result<FileDigest> {
    let bytes = fs_err::metadata(path)?.len();
    let blake3 =
        crate::fetch::digest::blake3_file(path).with_context(|| format!("could not read `{}`", path.display()))?;
    Ok(FileDigest { bytes, blake3 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::optim::AdamWParams;
    use candle_core::{DType, Device, Tensor};

    fn varmap() -> anyhow::Result<VarMap> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints((2, 3), "h.0.weight", candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 })?;
        vb.get_with_hints(3, "h.0.bias", candle_nn::Init::Const(0.5))?;
        Ok(varmap)
    }

    fn state(iter: usize) -> State {
        State {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            iter,
            best_val_loss: 1.5,
            val_loss: 1.75,
            model: GptConfig {
                block_size: 8,
                vocab_size: 10,
                n_layer: 1,
                n_head: 1,
                n_embd: 4,
                dropout: 0.0,
                bias: false,
            },
            config: serde_json::json!({"max_iters": 10}),
            rng: u64::MAX - 7,
            files: BTreeMap::new(),
            loss_scale: None,
            ckpt_iter: None,
        }
    }

    fn values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        let mut values: Vec<(String, Vec<f32>)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    }

    #[test]
    fn round_trips_and_ignores_a_torn_write() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let params = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let saved = varmap()?;
        let mut optimizer = AdamW::new(saved.data().lock().unwrap().clone(), params)?;
        let grads: Vec<Tensor> = optimizer.vars().map(|var| var.ones_like()).collect::<candle_core::Result<_>>()?;
        optimizer.step(&grads, 0.1)?;
        save(dir.path(), "last", &saved, &optimizer, state(7))?;

        let found = load_state(dir.path(), "last")?.expect("complete");
        assert_eq!(found.iter, 7);
        assert_eq!(found.rng, u64::MAX - 7);
        assert_eq!(found.files.len(), 2);
        assert_eq!(State { files: BTreeMap::new(), ..found }, state(7));
        let mut loaded = varmap()?;
        let mut restored = AdamW::new(loaded.data().lock().unwrap().clone(), params)?;
        load_weights(dir.path(), "last", &mut loaded, Some(&mut restored))?;
        assert_eq!(values(&loaded), values(&saved));
        assert_eq!(restored.steps(), 1);

        // Weights replaced without their JSON (a crash between renames): not a checkpoint.
        fs_err::write(model_path(dir.path(), "last"), b"torn")?;
        assert!(load_state(dir.path(), "last")?.is_none());
        assert!(load_state(dir.path(), "ckpt")?.is_none());
        // A checkpoint of another format names the stage to re-run.
        let other = State { version: 9, ..state(3) };
        fs_err::write(state_path(dir.path(), "ckpt"), serde_json::to_string(&other)?)?;
        let error = load_state(dir.path(), "ckpt").unwrap_err().to_string();
        assert!(error.contains("version 9") && error.contains("hint: re-run"), "{error}");
        Ok(())
    }
}
