//! The content key of a stage: blake3 over a canonical, versioned serialization of everything
//! that can change its outputs, and nothing else (no timestamps, no paths of the store, no
//! `Debug` output, no `std::hash`). Keys sort and format their own JSON, so no serde_json
//! feature flag elsewhere in the build can change a key.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped when the key's recipe changes, so that old store entries stop matching.
const KEY_SCHEMA: &str = "nanoflow-key-v1";

/// What a key is made of; kept in the manifest so `status` can say which part changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyMaterial {
    pub kind: String,
    pub kind_version: u32,
    /// The resolved config, less non-semantic keys, `${stage}` references unresolved (the
    /// inputs enter by content below, so a path in the store never does).
    pub params: Value,
    /// Upstream stage name -> its output digest (early cutoff: same bytes, same key).
    pub inputs: BTreeMap<String, String>,
    /// Local path as written -> content digest.
    pub deps: BTreeMap<String, String>,
}

impl KeyMaterial {
    /// The key: 64 hex digits.
    pub fn key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_SCHEMA.as_bytes());
        hasher.update(b"\0");
        let material = serde_json::to_value(self).expect("key material is plain JSON");
        hasher.update(canonical_json(&material).as_bytes());
        hasher.finalize().to_hex().to_string()
    }
}

/// JSON with object keys sorted at every level and no whitespace: two values that are equal as
/// data give the same text, whatever order they were written in.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Strings, numbers, booleans and null: serde_json's own rendering is already unique
        // (floats print as the shortest text that round-trips).
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn material(params: Value) -> KeyMaterial {
        KeyMaterial {
            kind: "command".into(),
            kind_version: 1,
            params,
            inputs: BTreeMap::from([("a".into(), "00ff".into())]),
            deps: BTreeMap::new(),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"y": [1, 2.5, "x"], "x": null}});
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,2.5,"x"]},"b":1}"#);
    }

    #[test]
    fn key_ignores_order_but_not_values() {
        let one = material(json!({"lr": 0.0006, "n_layer": 12}));
        let same = material(serde_json::from_str(r#"{"n_layer": 12, "lr": 6e-4}"#).unwrap());
        let other = material(json!({"lr": 0.0003, "n_layer": 12}));
        assert_eq!(one.key(), same.key());
        assert_ne!(one.key(), other.key());
    }

    #[test]
    fn key_covers_every_part() {
        let base = material(json!({}));
        let mut changed = base.clone();
        changed.kind_version = 2;
        assert_ne!(base.key(), changed.key());
        let mut changed = base.clone();
        changed.inputs.insert("a".into(), "0100".into());
        assert_ne!(base.key(), changed.key());
        let mut changed = base.clone();
        changed.deps.insert("x.sh".into(), "00".into());
        assert_ne!(base.key(), changed.key());
    }

    #[test]
    fn key_is_stable_across_releases() {
        // A pinned value: if this changes, every store entry in the world goes stale, so it must
        // only change together with KEY_SCHEMA.
        let key = material(json!({"run": "echo hi"})).key();
        assert_eq!(key.len(), 64);
        assert_eq!(key, material(json!({"run": "echo hi"})).key());
        assert_eq!(&key[..16], PINNED_KEY_PREFIX);
    }

    const PINNED_KEY_PREFIX: &str = "c725e37c4b449569";
}
