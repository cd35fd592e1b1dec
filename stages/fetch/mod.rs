//! Getting bytes from elsewhere: HTTP(S) with retries and resume, the Hugging Face Hub through
//! `hf-hub`, and the blake3 digests that pin what arrived.

pub mod digest;
pub(crate) mod http;
pub(crate) mod hub;

pub use http::Unreachable;

/// A repo path that stays inside `$OUT` when a file is placed there.
pub(crate) fn check_relative(path: &str) -> Result<(), String> {
    match crate::is_inside(path) {
        true => Ok(()),
        false => Err(format!("`{path}` must be a relative path inside the repo")),
    }
}
