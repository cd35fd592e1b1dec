//! Getting bytes from elsewhere: HTTP(S) with retries and resume, the Hugging Face Hub through
//! `hf-hub`, and the blake3 digests that pin what arrived.

pub mod digest;
pub(crate) mod http;
pub(crate) mod hub;

use std::path::{Component, Path};

/// A relative path that stays inside `$OUT`.
pub(crate) fn check_relative(path: &str) -> Result<(), String> {
    let inside =
        !path.is_empty() && Path::new(path).components().all(|component| matches!(component, Component::Normal(_)));
    if !inside {
        return Err(format!("`{path}` must be a relative path inside the repo"));
    }
    Ok(())
}
