//! The validated DAG: every stage with its kind, its params resolved (code defaults < `config:`
//! files < the stage's own keys < `--set`) and checked against its kind, its upstream stages and
//! its local files; targets checked; cycles rejected. Once a `Plan` exists, nothing about the
//! pipeline can be wrong any more; what remains is deciding what is stale and running it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use nanoflow_stages::{Invalid, Upstream};
use serde_yaml::Value;

use crate::error::{Error, suggest};
use crate::pipeline::{ENGINE_KEYS, Param, PipelineFile, RawStage, read_yaml};
use crate::reference;
use crate::slurm::{ExecutorKind, Resources};
use crate::source_map::{Location, Origin};
use crate::stage_kind::{ParamError, StageKind};

#[derive(Debug)]
pub struct Plan {
    /// The directory holding it: commands run here, relative paths resolve here.
    pub root: PathBuf,
    /// In the order written.
    pub stages: Vec<Stage>,
    pub targets: Vec<Target>,
    /// Where stages run unless `run --executor` says otherwise (`executor:` in pipeline.yaml).
    pub executor: ExecutorKind,
    /// Every stage index, upstream before downstream.
    order: Vec<usize>,
    /// Each stage's index by name: lookups stay O(1) in a pipeline of thousands of stages.
    by_name: HashMap<String, usize>,
    /// The longest stage name, for columns (computed once: `status` prints a row per stage).
    name_width: usize,
}

#[derive(Debug)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
    pub location: Location,
    /// The kind's config with every default filled in, `${stage}` references still unresolved:
    /// what the stage will run with, and (less non-semantic keys) what enters its key.
    pub params: serde_json::Value,
    /// The stages this one reads, by name, sorted.
    pub inputs: Vec<String>,
    /// Local files and folders whose contents enter the key, as written (relative to `root`).
    pub deps: Vec<String>,
    /// What its job asks a cluster for (the kind's defaults, pipeline.yaml's, its own); never in
    /// the key.
    pub resources: Resources,
}

#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub stages: Vec<String>,
}

impl Plan {
    /// Validates `file`, with `sets` (`stage.key=value`) applied on top.
    pub fn build(file: PipelineFile, sets: &[String]) -> Result<Plan, Error> {
        let names: Vec<&str> = file.stages.iter().map(|stage| stage.name.as_str()).collect();
        // The first of a name (the source map has already refused a second).
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (index, name) in names.iter().enumerate() {
            by_name.entry(name).or_insert(index);
        }
        // What a kind's `check` may ask: which kind of stage a `${stage}` param names.
        let kind_of = |value: &str| {
            let name = reference::leading(value)?;
            let raw = &file.stages[*by_name.get(name)?];
            StageKind::parse(&raw.kind).map(StageKind::name)
        };
        let upstream = Upstream::new(&kind_of);
        let mut overrides: Vec<Vec<Param>> = vec![Vec::new(); file.stages.len()];
        for argument in sets {
            let (stage, param) = parse_set(argument, &names)?;
            overrides[stage].push(param);
        }
        let mut stages = file
            .stages
            .iter()
            .zip(overrides)
            .map(|(raw, overrides)| resolve_stage(raw, overrides, &file.root, (&names, &by_name), &upstream))
            .collect::<Result<Vec<_>, _>>()?;
        let executor = match &file.executor {
            None => ExecutorKind::default(),
            Some((value, origin)) => {
                value.as_str().and_then(ExecutorKind::parse).ok_or_else(|| Error::InvalidSetting {
                    key: "executor".to_string(),
                    origin: origin.clone(),
                    message: format!("expected one of {}", ExecutorKind::NAMES.join(", ")),
                })?
            }
        };
        let top = match &file.resources {
            None => Resources::default(),
            Some((value, origin)) => Resources::parse(value).map_err(|(key, message)| Error::InvalidSetting {
                key: key.map_or("resources".to_string(), |key| format!("resources.{key}")),
                origin: origin.clone(),
                message,
            })?,
        };
        for (stage, raw) in stages.iter_mut().zip(&file.stages) {
            let own = match &raw.resources {
                None => Resources::default(),
                Some((value, origin)) => Resources::parse(value).map_err(|(key, message)| Error::InvalidParam {
                    stage: raw.name.clone(),
                    key: key.map_or("resources".to_string(), |key| format!("resources.{key}")),
                    origin: origin.clone(),
                    message,
                })?,
            };
            // Only a train stage runs on several tasks (its ranks); any other would run N times
            // into one output.
            let resumable = stage.kind.resumable();
            if !resumable && (own.nodes.unwrap_or(1) > 1 || own.tasks_per_node.unwrap_or(1) > 1) {
                return Err(Error::InvalidParam {
                    stage: raw.name.clone(),
                    key: "resources".to_string(),
                    origin: raw.resources.as_ref().map(|(_, origin)| origin.clone()).expect("written"),
                    message: format!(
                        "a {} stage runs as one task: `nodes` and `tasks_per_node` are for train and finetune stages",
                        stage.kind.name()
                    ),
                });
            }
            let mut resources = Resources::defaults(&stage.params, resumable).merged(&top).merged(&own);
            if !resumable {
                (resources.nodes, resources.tasks_per_node) = (None, None);
            }
            stage.resources = resources;
        }
        let mut targets = Vec::new();
        for raw in &file.targets {
            for (stage, location) in &raw.stages {
                if !by_name.contains_key(stage.as_str()) {
                    return Err(Error::UnknownTargetStage {
                        target: raw.name.clone(),
                        stage: stage.clone(),
                        location: location.clone(),
                        suggestion: suggest(stage, names.iter().copied()),
                    });
                }
            }
            targets
                .push(Target { name: raw.name.clone(), stages: raw.stages.iter().map(|(s, _)| s.clone()).collect() });
        }
        let by_name: HashMap<String, usize> =
            by_name.into_iter().map(|(name, index)| (name.to_string(), index)).collect();
        let order = topological_order(&stages, &by_name)?;
        let name_width = stages.iter().map(|stage| stage.name.len()).max().unwrap_or(0);
        Ok(Plan { root: file.root, stages, targets, executor, order, by_name, name_width })
    }

    /// The longest stage name.
    pub fn name_width(&self) -> usize {
        self.name_width
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The stage a command names (`show`, `metrics`), or an error with the closest name.
    pub fn stage_named(&self, name: &str) -> Result<usize, Error> {
        self.index(name).ok_or_else(|| Error::UnknownName {
            name: name.to_string(),
            suggestion: suggest(name, self.stages.iter().map(|stage| stage.name.as_str())),
        })
    }

    /// Every stage, upstream before downstream.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The stages `names` (targets first, then stages) need, upstream before downstream.
    pub fn select(&self, names: &[String]) -> Result<Vec<usize>, Error> {
        let mut wanted = HashSet::new();
        for name in names {
            let roots: Vec<usize> = match self.targets.iter().find(|target| &target.name == name) {
                Some(target) => target.stages.iter().filter_map(|stage| self.index(stage)).collect(),
                None => vec![self.index(name).ok_or_else(|| Error::UnknownName {
                    name: name.clone(),
                    suggestion: suggest(
                        name,
                        self.targets.iter().map(|t| t.name.as_str()).chain(self.stages.iter().map(|s| s.name.as_str())),
                    ),
                })?],
            };
            let mut stack = roots;
            while let Some(index) = stack.pop() {
                if wanted.insert(index) {
                    stack.extend(self.stages[index].inputs.iter().filter_map(|input| self.index(input)));
                }
            }
        }
        Ok(self.order.iter().copied().filter(|index| wanted.contains(index)).collect())
    }

    /// The params that enter the key: the resolved config less what the kind keeps out of it.
    pub fn key_params(&self, index: usize) -> serde_json::Value {
        let stage = &self.stages[index];
        stage.kind.key_params(&stage.params)
    }
}

/// `train.max_iters=100` -> (index of `train`, the param).
fn parse_set(argument: &str, names: &[&str]) -> Result<(usize, Param), Error> {
    let invalid = |message: String| Error::InvalidSet { argument: argument.to_string(), message, suggestion: None };
    let (path, value) = argument.split_once('=').ok_or_else(|| invalid("no `=`".to_string()))?;
    let (stage, key) = path.split_once('.').ok_or_else(|| invalid("no `.` between stage and key".to_string()))?;
    let index = names.iter().position(|name| *name == stage).ok_or_else(|| Error::InvalidSet {
        argument: argument.to_string(),
        message: format!("no stage `{stage}`"),
        // The whole argument again, with the stage's name spelled right.
        suggestion: suggest(stage, names.iter().copied()).map(|name| format!("{name}.{key}={value}")),
    })?;
    if ENGINE_KEYS.contains(&key) {
        return Err(invalid(format!("`{key}` can only be set in the pipeline file")));
    }
    let value: Value = serde_yaml::from_str(value).map_err(|error| invalid(format!("value is not YAML: {error}")))?;
    let origin = Origin::CommandLine(argument.to_string());
    Ok((index, Param { key: key.to_string(), value, origin: origin.clone(), value_origin: origin }))
}

fn resolve_stage(
    raw: &RawStage,
    overrides: Vec<Param>,
    root: &Path,
    (names, by_name): (&[&str], &HashMap<&str, usize>),
    upstream: &Upstream,
) -> Result<Stage, Error> {
    let kind = StageKind::parse(&raw.kind).ok_or_else(|| Error::UnknownKind {
        stage: raw.name.clone(),
        kind: raw.kind.clone(),
        origin: raw.kind_origin.clone(),
        suggestion: suggest(&raw.kind, StageKind::ALL.iter().map(|kind| kind.name())),
    })?;

    // Precedence: config files in order < the stage's keys < --set.
    let mut params: Vec<Param> = Vec::new();
    for (path, origin) in &raw.configs {
        params.extend(read_config(raw, path, origin, root)?);
    }
    params.extend(raw.params.iter().cloned());
    params.extend(overrides);
    let mut merged = serde_yaml::Mapping::new();
    let mut origins: Vec<(String, Origin)> = Vec::new();
    let mut value_origins: Vec<(String, Origin)> = Vec::new();
    for param in params {
        // JSON has no NaN or infinity: serde would turn `.nan` into null (the default, silently)
        // or fail later; no param of any kind means either.
        if let Some(number) = non_finite(&param.value) {
            return Err(Error::InvalidParam {
                stage: raw.name.clone(),
                key: param.key,
                origin: param.origin,
                message: format!("must be a finite number, not `{number}`"),
            });
        }
        if !kind.fields().contains(&param.key.as_str()) {
            return Err(Error::UnknownKey {
                place: format!("in stage `{}`", raw.name),
                suggestion: suggest(&param.key, kind.fields().iter().chain(ENGINE_KEYS).copied()),
                key: param.key,
                origin: param.origin,
            });
        }
        origins.retain(|(key, _)| *key != param.key);
        origins.push((param.key.clone(), param.origin));
        value_origins.retain(|(key, _)| *key != param.key);
        value_origins.push((param.key.clone(), param.value_origin));
        merged.insert(Value::String(param.key), param.value);
    }
    let origin_of = |key: &str| {
        origins
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, origin)| origin.clone())
            .unwrap_or_else(|| Origin::File(raw.location.clone()))
    };
    let params = kind.validate(Value::Mapping(merged)).map_err(|error| match error {
        ParamError::Missing { key } => {
            Error::MissingKey { stage: raw.name.clone(), key, location: raw.location.clone(), what: None }
        }
        ParamError::Invalid { key, message } if key.is_empty() => {
            Error::InvalidParams { stage: raw.name.clone(), location: raw.location.clone(), message }
        }
        // A wrong type is the value's: the error points at it.
        ParamError::Invalid { key, message } => {
            let origin = value_origins.iter().find(|(name, _)| *name == key).map(|(_, origin)| origin.clone());
            Error::WrongType {
                stage: raw.name.clone(),
                origin: origin.unwrap_or_else(|| origin_of(&key)),
                key,
                message,
            }
        }
    })?;

    let mut inputs = BTreeSet::new();
    for (key, value) in params.as_object().into_iter().flatten() {
        let mut value = value.clone();
        let mut error = None;
        reference::strings_mut(&mut value, &mut |text| {
            if reference::unclosed(text) && error.is_none() {
                error = Some(Error::InvalidParam {
                    stage: raw.name.clone(),
                    key: key.clone(),
                    origin: origin_of(key),
                    message: "a `${` is not closed: write `${stage}` for a stage's output, `$${` for a literal `${`"
                        .to_string(),
                });
            }
            for name in reference::references(text) {
                if by_name.contains_key(name) {
                    inputs.insert(name.to_string());
                } else if error.is_none() {
                    error = Some(Error::UnknownReference {
                        stage: raw.name.clone(),
                        reference: name.to_string(),
                        origin: origin_of(key),
                        suggestion: suggest(name, names.iter().copied()),
                    });
                }
            }
        });
        if let Some(error) = error {
            return Err(error);
        }
    }

    kind.check(&params, upstream).map_err(|invalid| match invalid {
        Invalid { key, message, required: true } => {
            Error::MissingKey { stage: raw.name.clone(), key, location: raw.location.clone(), what: Some(message) }
        }
        Invalid { key, message, .. } if key.is_empty() => {
            Error::InvalidParams { stage: raw.name.clone(), location: raw.location.clone(), message }
        }
        Invalid { key, message, .. } => {
            // `models[1]` was written as `models`.
            let written = key.split('[').next().unwrap_or(&key).to_string();
            Error::InvalidParam { stage: raw.name.clone(), origin: origin_of(&written), key, message }
        }
    })?;

    let mut deps = Vec::new();
    for (path, origin) in &raw.deps {
        // A dep is part of the project: its content enters the key, so it must travel with it.
        if !nanoflow_stages::is_inside(path) {
            return Err(Error::InvalidParam {
                stage: raw.name.clone(),
                key: "deps".to_string(),
                origin: origin.clone(),
                message: format!("`{path}` is outside the pipeline's folder; deps are files of the project"),
            });
        }
        check_exists(("`deps` path", "deps"), raw, path, origin, root)?;
        check_inside(raw, path, origin, root)?;
        deps.push(path.clone());
    }
    for path in kind.local_inputs(&params) {
        if reference::references(&path).is_empty() {
            let key = params.as_object().into_iter().flatten().find(|(_, value)| value.as_str() == Some(path.as_str()));
            let origin = key.map_or_else(|| Origin::File(raw.location.clone()), |(key, _)| origin_of(key));
            let key = key.map_or("input", |(key, _)| key.as_str());
            check_exists(("local input", key), raw, &path, &origin, root)?;
            deps.push(path);
        }
    }
    deps.sort();
    deps.dedup();
    Ok(Stage {
        name: raw.name.clone(),
        kind,
        location: raw.location.clone(),
        params,
        inputs: inputs.into_iter().collect(),
        deps,
        resources: Resources::default(),
    })
}

/// The first NaN or infinity in `value` (`.nan`, `.inf`, `-.inf`), as YAML writes it.
fn non_finite(value: &Value) -> Option<&'static str> {
    match value {
        Value::Number(number) => match number.as_f64() {
            Some(x) if x.is_nan() => Some(".nan"),
            Some(x) if x.is_infinite() => Some(if x > 0.0 { ".inf" } else { "-.inf" }),
            _ => None,
        },
        Value::Sequence(items) => items.iter().find_map(non_finite),
        Value::Mapping(mapping) => mapping.values().find_map(non_finite),
        Value::Tagged(tagged) => non_finite(&tagged.value),
        _ => None,
    }
}

/// A `config:` file: a mapping of params, each located in that file.
fn read_config(stage: &RawStage, path: &str, origin: &Origin, root: &Path) -> Result<Vec<Param>, Error> {
    check_exists(("`config` file", "config"), stage, path, origin, root)?;
    let (value, map) = read_yaml(&root.join(path))?;
    let mapping = match value {
        Value::Mapping(mapping) => mapping,
        Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(Error::Shape {
                what: format!("config file `{path}`"),
                expected: "a mapping of params",
                origin: origin.clone(),
            });
        }
    };
    mapping
        .into_iter()
        .map(|(key, value)| {
            let key = key.as_str().map(str::to_string).ok_or_else(|| Error::Shape {
                what: format!("a key in config file `{path}`"),
                expected: "a string",
                origin: origin.clone(),
            })?;
            let origin = Origin::File(map.nearest(&[&key]));
            let value_origin = match value.is_null() {
                true => origin.clone(),
                false => Origin::File(map.value(&[&key]).unwrap_or_else(|| map.nearest(&[&key]))),
            };
            Ok(Param { key, value, origin, value_origin })
        })
        .collect()
}

/// What a local path of a stage may be.
#[derive(Clone, Copy, PartialEq)]
enum Local {
    /// A regular file (`config:`).
    File,
    /// A regular file or a folder (`deps:`, a kind's local inputs).
    FileOrFolder,
}

/// `path` exists and is what `allowed` says: a named pipe, a socket or a device would hang or
/// fail the reading that follows, so it is refused here, before anything runs.
fn check_exists(
    (what, key): (&'static str, &str),
    stage: &RawStage,
    path: &str,
    origin: &Origin,
    root: &Path,
) -> Result<(), Error> {
    let allowed = if key == "config" { Local::File } else { Local::FileOrFolder };
    let metadata = match fs_err::metadata(root.join(path)) {
        Ok(metadata) => metadata,
        Err(_) => {
            return Err(Error::MissingFile {
                what,
                stage: stage.name.clone(),
                path: path.to_string(),
                origin: origin.clone(),
            });
        }
    };
    let expected = match allowed {
        Local::File if !metadata.is_file() => "a regular file",
        Local::FileOrFolder if !metadata.is_file() && !metadata.is_dir() => "a regular file or a folder",
        _ => return Ok(()),
    };
    let found = crate::manifest::describe(metadata.file_type());
    Err(Error::InvalidParam {
        stage: stage.name.clone(),
        key: key.to_string(),
        origin: origin.clone(),
        message: format!("`{path}` is {found}, not {expected}"),
    })
}

/// A dep inside the folder as written may still lead out of it through a symbolic link: the
/// path is resolved first, then held to the same rule.
fn check_inside(stage: &RawStage, path: &str, origin: &Origin, root: &Path) -> Result<(), Error> {
    let resolved = fs_err::canonicalize(root.join(path));
    let root = fs_err::canonicalize(root);
    match (resolved, root) {
        (Ok(resolved), Ok(root)) if !resolved.starts_with(&root) => Err(Error::InvalidParam {
            stage: stage.name.clone(),
            key: "deps".to_string(),
            origin: origin.clone(),
            message: format!(
                "`{path}` leads outside the pipeline's folder (to `{}`) through a symbolic link; deps are files of the project",
                resolved.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Depth-first, in the order written, so that the order is stable; a back edge is a cycle,
/// reported as the path around it (`a -> b -> a`).
fn topological_order(stages: &[Stage], by_name: &HashMap<String, usize>) -> Result<Vec<usize>, Error> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        index: usize,
        stages: &[Stage],
        by_name: &HashMap<String, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), Error> {
        match marks[index] {
            Mark::Done => return Ok(()),
            Mark::Open => {
                let start = path.iter().position(|&open| open == index).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|&i| stages[i].name.clone()).collect();
                cycle.push(stages[index].name.clone());
                return Err(Error::Cycle { cycle, location: stages[index].location.clone() });
            }
            Mark::New => {}
        }
        marks[index] = Mark::Open;
        path.push(index);
        for input in &stages[index].inputs {
            let upstream = by_name[input.as_str()];
            visit(upstream, stages, by_name, marks, path, order)?;
        }
        path.pop();
        marks[index] = Mark::Done;
        order.push(index);
        Ok(())
    }
    let mut marks = vec![Mark::New; stages.len()];
    let mut order = Vec::with_capacity(stages.len());
    for index in 0..stages.len() {
        visit(index, stages, by_name, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str, sets: &[&str]) -> Result<Plan, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipeline.yaml");
        fs_err::write(&path, yaml).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Plan::build(PipelineFile::load(&path)?, &sets)
    }

    fn names(plan: &Plan, indices: &[usize]) -> Vec<String> {
        indices.iter().map(|&i| plan.stages[i].name.clone()).collect()
    }

    const DIAMOND: &str = "\
stages:
  d: {kind: command, run: 'cat ${b} ${c}'}
  b: {kind: command, run: 'cat ${a}'}
  c: {kind: command, run: 'cat ${a}'}
  a: {kind: command, run: 'echo'}
  lonely: {kind: command, run: 'true'}
targets:
  all: [d]
";

    #[test]
    fn orders_upstream_first_and_stably() {
        let plan = plan(DIAMOND, &[]).unwrap();
        assert_eq!(names(&plan, plan.order()), ["a", "b", "c", "d", "lonely"]);
        assert_eq!(plan.stages[0].inputs, ["b", "c"]);
    }

    #[test]
    fn selects_the_upstream_closure_of_targets_and_stages() {
        let plan = plan(DIAMOND, &[]).unwrap();
        assert_eq!(names(&plan, &plan.select(&["all".into()]).unwrap()), ["a", "b", "c", "d"]);
        assert_eq!(names(&plan, &plan.select(&["b".into(), "lonely".into()]).unwrap()), ["a", "b", "lonely"]);
        match plan.select(&["al".into()]) {
            Err(Error::UnknownName { suggestion, .. }) => assert_eq!(suggestion.as_deref(), Some("all")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reports_a_cycle_as_a_path() {
        let yaml = "stages:\n  a: {kind: command, run: 'cat ${c}'}\n  b: {kind: command, run: 'cat ${a}'}\n  c: {kind: command, run: 'cat ${b}'}\n";
        match plan(yaml, &[]) {
            Err(Error::Cycle { cycle, .. }) => assert_eq!(cycle, ["a", "c", "b", "a"]),
            other => panic!("{other:?}"),
        }
        match plan("stages:\n  a: {kind: command, run: 'cat ${a}'}\n", &[]) {
            Err(Error::Cycle { cycle, .. }) => assert_eq!(cycle, ["a", "a"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_overrides_the_file_and_is_checked() {
        let plan_with_set = plan(DIAMOND, &["a.run=echo 2"]).unwrap();
        assert_eq!(plan_with_set.stages[3].params["run"], "echo 2");
        assert!(matches!(plan(DIAMOND, &["x.run=1"]), Err(Error::InvalidSet { .. })));
        assert!(matches!(plan(DIAMOND, &["a.rn=1"]), Err(Error::UnknownKey { .. })));
        assert!(matches!(plan(DIAMOND, &["a.kind=command"]), Err(Error::InvalidSet { .. })));
    }
}
