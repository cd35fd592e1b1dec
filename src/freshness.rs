//! Is a stage's current output what its pipeline entry would produce now, and if not, why?
//! `status`, `run -n` and `run` all ask this one question the same way: compute the key from
//! the params, the upstream output digests and the local files, then compare with the store.

use std::collections::BTreeMap;
use std::io;

use crate::cache_key::KeyMaterial;
use crate::manifest::Manifest;
use crate::plan::Plan;
use crate::stat_cache::StatCache;
use crate::store::Store;

#[derive(Debug)]
pub enum Freshness {
    /// `current` holds this key, intact.
    Fresh { manifest: Manifest },
    /// The store holds this key, intact, but `current` points elsewhere: restoring is a rename.
    Restorable { manifest: Manifest, reasons: Vec<String> },
    /// Nothing stored for this key: the stage must run.
    Stale { key: String, material: KeyMaterial, reasons: Vec<String> },
    /// The key depends on outputs that upstream stages have yet to produce.
    Waiting { upstream: Vec<String> },
}

impl Freshness {
    /// The output digest a downstream key would use, when known without running.
    pub fn output_digest(&self) -> Option<&str> {
        match self {
            Freshness::Fresh { manifest } | Freshness::Restorable { manifest, .. } => Some(&manifest.output_digest),
            _ => None,
        }
    }
}

/// Judges stage `index` given the output digests of its upstream stages (`None`: not known yet).
pub fn assess(
    plan: &Plan,
    store: &Store,
    cache: &mut StatCache,
    index: usize,
    upstream: &BTreeMap<String, Option<String>>,
) -> io::Result<Freshness> {
    let stage = &plan.stages[index];
    let waiting: Vec<String> =
        stage.inputs.iter().filter(|input| upstream.get(*input).is_none_or(Option::is_none)).cloned().collect();
    if !waiting.is_empty() {
        return Ok(Freshness::Waiting { upstream: waiting });
    }
    let material = material(plan, cache, index, upstream)?;
    let key = material.key();
    let (current, damaged) = match store.current(&stage.name) {
        Some(dir) => match Manifest::read_checked(&dir)? {
            Ok(manifest) => (manifest.map(|manifest| (dir, manifest)), None),
            Err(why) => (None, Some(format!("output damaged: {why}"))),
        },
        None if store.current_is_not_a_link(&stage.name) => {
            (None, Some("output damaged: `current` is a copy, not a link".to_string()))
        }
        None => (None, None),
    };
    if let Some((dir, manifest)) = &current
        && manifest.key == key
    {
        let damage = manifest.check(dir, cache)?;
        if damage.is_empty() {
            return Ok(Freshness::Fresh { manifest: manifest.clone() });
        }
        let reasons = damage.iter().map(|damage| format!("output {damage}")).collect();
        return Ok(Freshness::Stale { key, material, reasons });
    }
    let reasons = match (&current, damaged) {
        (Some((_, manifest)), _) => differences(&manifest.material, &material),
        (None, Some(damaged)) => vec![damaged],
        (None, None) => vec!["never run".to_string()],
    };
    if let Some(manifest) = store.lookup(&stage.name, &key)? {
        let dir = store.entry_dir(&stage.name, &key);
        if manifest.check(&dir, cache)?.is_empty() {
            return Ok(Freshness::Restorable { manifest, reasons });
        }
    }
    Ok(Freshness::Stale { key, material, reasons })
}

/// What the key of stage `index` is made of, given every upstream digest.
pub fn material(
    plan: &Plan,
    cache: &mut StatCache,
    index: usize,
    upstream: &BTreeMap<String, Option<String>>,
) -> io::Result<KeyMaterial> {
    let stage = &plan.stages[index];
    let inputs = stage
        .inputs
        .iter()
        .map(|input| (input.clone(), upstream.get(input).cloned().flatten().unwrap_or_default()))
        .collect();
    let deps = stage
        .deps
        .iter()
        .map(|path| Ok((path.clone(), cache.digest(&plan.root.join(path))?)))
        .collect::<io::Result<_>>()?;
    Ok(KeyMaterial {
        kind: stage.kind.name().to_string(),
        kind_version: stage.kind.version(),
        params: plan.key_params(index),
        inputs,
        deps,
    })
}

/// Why `new` differs from `old`, one phrase per change, most useful first.
pub fn differences(old: &KeyMaterial, new: &KeyMaterial) -> Vec<String> {
    let mut reasons = Vec::new();
    if old.kind != new.kind || old.kind_version != new.kind_version {
        reasons.push(format!("kind changed: {} v{} -> {} v{}", old.kind, old.kind_version, new.kind, new.kind_version));
    }
    let empty = serde_json::Map::new();
    let old_params = old.params.as_object().unwrap_or(&empty);
    let new_params = new.params.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = old_params.keys().chain(new_params.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        match (old_params.get(key), new_params.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => reasons.push(format!("param `{key}` changed: {} -> {}", show(a), show(b))),
        }
    }
    changes(&mut reasons, "input", &old.inputs, &new.inputs);
    changes(&mut reasons, "file", &old.deps, &new.deps);
    if reasons.is_empty() {
        reasons.push("the key recipe changed (new nanoflow version)".to_string());
    }
    reasons
}

fn changes(reasons: &mut Vec<String>, what: &str, old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) {
    for (name, digest) in new {
        match old.get(name) {
            None => reasons.push(format!("{what} `{name}` added")),
            Some(previous) if previous != digest => reasons.push(format!("{what} `{name}` changed")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        reasons.push(format!("{what} `{name}` removed"));
    }
}

/// A param value in a reason, short.
fn show(value: Option<&serde_json::Value>) -> String {
    let Some(value) = value else { return "(unset)".to_string() };
    let text = value.to_string();
    if text.chars().count() > 40 { format!("{}…", text.chars().take(39).collect::<String>()) } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn material(params: serde_json::Value, input: &str, dep: &str) -> KeyMaterial {
        KeyMaterial {
            kind: "command".into(),
            kind_version: 1,
            params,
            inputs: BTreeMap::from([("data".into(), input.into())]),
            deps: BTreeMap::from([("scripts/x.sh".into(), dep.into())]),
        }
    }

    #[test]
    fn names_each_change() {
        let old = material(json!({"lr": 0.001, "run": "a"}), "1", "1");
        let new = material(json!({"lr": 0.0006, "run": "a", "seed": 2}), "2", "2");
        assert_eq!(
            differences(&old, &new),
            [
                "param `lr` changed: 0.001 -> 0.0006",
                "param `seed` changed: (unset) -> 2",
                "input `data` changed",
                "file `scripts/x.sh` changed",
            ]
        );
    }
}
