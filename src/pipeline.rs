//! pipeline.yaml as written: finding it, parsing it, and splitting each stage into the keys the
//! engine owns (`kind`, `deps`, `config`, `resources`) and the params its kind owns. Nothing here knows what a
//! kind accepts or how stages connect; `plan.rs` turns this into the validated DAG (ripgrep's
//! lowargs -> hiargs).

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use crate::error::{Error, suggest};
use crate::source_map::{Location, Origin, SourceMap};

/// Keys every stage may have whatever its kind.
pub const ENGINE_KEYS: &[&str] = &["kind", "deps", "config", "resources"];
const TOP_LEVEL_KEYS: &[&str] = &["stages", "targets", "executor", "resources"];

#[derive(Debug)]
pub struct PipelineFile {
    /// The absolute directory holding the file: relative paths resolve here, `artifacts/` lives here.
    pub root: PathBuf,
    pub stages: Vec<RawStage>,
    pub targets: Vec<RawTarget>,
    /// `executor:` where stages run by default (`local`, `slurm`).
    pub executor: Option<(Value, Origin)>,
    /// `resources:` at the top: every stage's job's defaults under an executor like Slurm.
    pub resources: Option<(Value, Origin)>,
}

#[derive(Debug)]
pub struct RawStage {
    pub name: String,
    pub location: Location,
    pub kind: String,
    pub kind_origin: Origin,
    pub deps: Vec<(String, Origin)>,
    pub configs: Vec<(String, Origin)>,
    /// The kind's params as written in the stage, in order.
    pub params: Vec<Param>,
    /// `resources:` what its job asks a cluster for; never in the key.
    pub resources: Option<(Value, Origin)>,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub key: String,
    pub value: Value,
    /// Where the key is written.
    pub origin: Origin,
    /// Where the value is written (a wrong type points here); the argument for a `--set`.
    pub value_origin: Origin,
}

#[derive(Debug)]
pub struct RawTarget {
    pub name: String,
    pub stages: Vec<(String, Location)>,
}

/// `explicit` (from `-f`), else `pipeline.yaml` in `cwd` or its nearest parent that has one.
pub fn find(explicit: Option<&Path>, cwd: &Path) -> Result<PathBuf, Error> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    cwd.ancestors()
        .map(|dir| dir.join("pipeline.yaml"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::NoPipeline { dir: cwd.to_path_buf() })
}

/// Reads a YAML file into its value and source map, with syntax errors located.
pub fn read_yaml(path: &Path) -> Result<(Value, SourceMap), Error> {
    let text = fs_err::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let label = crate::printer::show_path(path);
    let map = SourceMap::parse(&label, &text)
        .map_err(|error| Error::Syntax { location: error.location, message: error.message })?;
    if let Some(duplicate) = map.duplicates.first() {
        let (what, name) = match duplicate.path.as_slice() {
            [stages, name] if stages == "stages" => ("stage", name.clone()),
            [targets, name] if targets == "targets" => ("target", name.clone()),
            path => ("key", path.join(".")),
        };
        return Err(Error::Duplicate { what, name, first: duplicate.first.clone(), second: duplicate.second.clone() });
    }
    let value: Value = serde_yaml::from_str(&text).map_err(|error| Error::Syntax {
        location: match error.location() {
            Some(at) => Location { file: label.clone(), line: at.line(), column: at.column() },
            None => map.nearest(&[]),
        },
        message: crate::error::plain_message(&error.to_string()),
    })?;
    Ok((value, map))
}

impl PipelineFile {
    pub fn load(path: &Path) -> Result<PipelineFile, Error> {
        let (value, map) = read_yaml(path)?;
        let absolute = std::path::absolute(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let root = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
        let top = as_mapping(&value, "`pipeline.yaml`", "a mapping with `stages:`", &map, &[])?;
        let file_name = crate::printer::show_path(path).display().to_string();
        for key in top.keys() {
            let key = key_str(key, &map, &[])?;
            if !TOP_LEVEL_KEYS.contains(&key) {
                return Err(Error::UnknownKey {
                    place: format!("at the top level of `{file_name}`"),
                    key: key.to_string(),
                    origin: Origin::File(map.nearest(&[key])),
                    suggestion: suggest(key, TOP_LEVEL_KEYS.iter().copied()),
                });
            }
        }
        let stages = match top.get("stages") {
            Some(stages) => as_mapping(stages, "`stages`", "a mapping of stage names to stages", &map, &["stages"])?
                .iter()
                .map(|(name, body)| parse_stage(key_str(name, &map, &["stages"])?, body, &map))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        if stages.is_empty() {
            return Err(Error::EmptyPipeline { file: file_name });
        }
        let targets = match top.get("targets") {
            Some(targets) => {
                as_mapping(targets, "`targets`", "a mapping of target names to stage lists", &map, &["targets"])?
                    .iter()
                    .map(|(name, list)| parse_target(key_str(name, &map, &["targets"])?, list, &map))
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => Vec::new(),
        };
        let setting = |key: &str| top.get(key).map(|value| (value.clone(), Origin::File(map.nearest(&[key]))));
        Ok(PipelineFile { root, stages, targets, executor: setting("executor"), resources: setting("resources") })
    }
}

fn parse_stage(name: &str, body: &Value, map: &SourceMap) -> Result<RawStage, Error> {
    let location = map.nearest(&["stages", name]);
    check_name(name, &location)?;
    let what = format!("stage `{name}`");
    let body = as_mapping(body, &what, "a mapping with `kind:`", map, &["stages", name])?;
    let mut stage = RawStage {
        name: name.to_string(),
        location: location.clone(),
        kind: String::new(),
        kind_origin: Origin::File(location.clone()),
        deps: Vec::new(),
        configs: Vec::new(),
        params: Vec::new(),
        resources: None,
    };
    for (key, value) in body {
        let key = key_str(key, map, &["stages", name])?;
        let path = ["stages", name, key];
        let origin = Origin::File(map.value(&path).unwrap_or_else(|| map.nearest(&path)));
        let key_origin = Origin::File(map.nearest(&path));
        match key {
            "kind" => {
                stage.kind = value
                    .as_str()
                    .ok_or_else(|| shape(format!("`kind` of {what}"), "a string", origin.clone()))?
                    .to_string();
                stage.kind_origin = origin;
            }
            "deps" => stage.deps = string_list(value, &format!("`deps` of {what}"), map, &path)?,
            "config" => stage.configs = string_list(value, &format!("`config` of {what}"), map, &path)?,
            "resources" => stage.resources = Some((value.clone(), key_origin)),
            _ => stage.params.push(Param {
                key: key.to_string(),
                value: value.clone(),
                // An empty value has no place of its own (the parser marks the next token).
                value_origin: if value.is_null() { key_origin.clone() } else { origin },
                origin: key_origin,
            }),
        }
    }
    if stage.kind.is_empty() {
        return Err(Error::MissingKind { stage: stage.name, location });
    }
    Ok(stage)
}

fn parse_target(name: &str, list: &Value, map: &SourceMap) -> Result<RawTarget, Error> {
    let location = map.nearest(&["targets", name]);
    check_name(name, &location)?;
    let stages = string_list(list, &format!("target `{name}`"), map, &["targets", name])?
        .into_iter()
        .map(|(stage, origin)| match origin {
            Origin::File(location) => (stage, location),
            Origin::CommandLine(_) => unreachable!("targets come from the file"),
        })
        .collect();
    Ok(RawTarget { name: name.to_string(), stages })
}

/// Stage and target names become directory names and `${name}` references.
fn check_name(name: &str, location: &Location) -> Result<(), Error> {
    let valid = !name.is_empty()
        && !name.starts_with(['.', '-'])
        && name != "OUT"
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid { Ok(()) } else { Err(Error::InvalidName { name: name.to_string(), location: location.clone() }) }
}

/// A string or a list of strings, each with where it is written.
fn string_list(value: &Value, what: &str, map: &SourceMap, path: &[&str]) -> Result<Vec<(String, Origin)>, Error> {
    let at = |path: &[&str]| Origin::File(map.value(path).unwrap_or_else(|| map.nearest(path)));
    match value {
        Value::String(text) => Ok(vec![(text.clone(), at(path))]),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let index = index.to_string();
                let mut item_path = path.to_vec();
                item_path.push(&index);
                match item {
                    Value::String(text) => Ok((text.clone(), at(&item_path))),
                    _ => Err(shape(what.to_string(), "a list of strings", at(&item_path))),
                }
            })
            .collect(),
        _ => Err(shape(what.to_string(), "a string or a list of strings", at(path))),
    }
}

fn as_mapping<'a>(
    value: &'a Value,
    what: &str,
    expected: &'static str,
    map: &SourceMap,
    path: &[&str],
) -> Result<&'a serde_yaml::Mapping, Error> {
    static EMPTY: std::sync::OnceLock<serde_yaml::Mapping> = std::sync::OnceLock::new();
    match value {
        Value::Mapping(mapping) => Ok(mapping),
        Value::Null => Ok(EMPTY.get_or_init(serde_yaml::Mapping::new)),
        _ => Err(shape(what.to_string(), expected, Origin::File(map.value(path).unwrap_or_else(|| map.nearest(path))))),
    }
}

fn key_str<'a>(key: &'a Value, map: &SourceMap, path: &[&str]) -> Result<&'a str, Error> {
    key.as_str().ok_or_else(|| shape("a key".to_string(), "a string", Origin::File(map.nearest(path))))
}

fn shape(what: String, expected: &'static str, origin: Origin) -> Error {
    Error::Shape { what, expected, origin }
}
