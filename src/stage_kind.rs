//! The closed set of stage kinds, and the one place that maps `kind:` to the code in `stages/`
//! (ripgrep's `Mode`): validation of params against the kind's `Config`, its version and
//! non-semantic keys for the content key, and running it in the child process.
//!
//! Every kind module in `stages/` has the same items (`Config`, `VERSION`, `NON_SEMANTIC`,
//! `UNSET`, `RESUMABLE`, `local_inputs`, `check`, `run`), so one list below generates the enum and every
//! `match`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use nanoflow_stages::{
    Context, Invalid, Report, Upstream, command, download, eval, export, finetune, sample, tokenize, train,
};

use crate::error::plain_message;

/// A param that does not fit the kind's `Config`.
#[derive(Debug)]
pub enum ParamError {
    /// A required key is absent.
    Missing { key: String },
    /// The value under `key` (a top-level param; empty for the config as a whole) is wrong.
    Invalid { key: String, message: String },
}

macro_rules! stage_kinds {
    ($($variant:ident => $module:ident),+ $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum StageKind {
            $($variant),+
        }

        impl StageKind {
            pub const ALL: &'static [StageKind] = &[$(StageKind::$variant),+];

            /// The name written after `kind:`, which is also the module's name.
            pub fn name(self) -> &'static str {
                match self {
                    $(StageKind::$variant => stringify!($module)),+
                }
            }

            /// Enters every key of this kind: bumped when the kind's outputs change meaning.
            pub fn version(self) -> u32 {
                match self {
                    $(StageKind::$variant => $module::VERSION),+
                }
            }

            /// The params this kind accepts, in declaration order.
            pub fn fields(self) -> &'static [&'static str] {
                match self {
                    $(StageKind::$variant => fields_of::<$module::Config>()),+
                }
            }

            /// The kind's config with nothing set: what `validate` fills in.
            pub fn defaults(self) -> serde_json::Value {
                match self {
                    $(StageKind::$variant => {
                        serde_json::to_value($module::Config::default()).expect("a Config always serializes to JSON")
                    }),+
                }
            }

            /// Params that cannot change results and so stay out of the key.
            pub fn non_semantic(self) -> &'static [&'static str] {
                match self {
                    $(StageKind::$variant => $module::NON_SEMANTIC),+
                }
            }

            /// What each optional param means when it is unset (`n_layer`: "12 from scratch, …").
            pub fn unset(self) -> &'static [(&'static str, &'static str)] {
                match self {
                    $(StageKind::$variant => $module::UNSET),+
                }
            }

            /// Whether a re-run of the same key keeps the partial output of an interrupted one,
            /// so the kind can resume (a download's `.part` file, a trainer's checkpoints).
            pub fn resumable(self) -> bool {
                match self {
                    $(StageKind::$variant => $module::RESUMABLE),+
                }
            }

            /// Reads params into the kind's `Config` (types, unknown keys) and returns the config
            /// with every default filled in, as JSON: what enters the key and reaches the child
            /// process.
            pub fn validate(self, params: serde_yaml::Value) -> Result<serde_json::Value, ParamError> {
                match self {
                    $(StageKind::$variant => resolve::<$module::Config>(params)),+
                }
            }

            /// The kind's own rules for (validated) params: everything pipeline.yaml decides.
            pub fn check(self, params: &serde_json::Value, upstream: &Upstream) -> Result<(), Invalid> {
                match self {
                    $(StageKind::$variant => $module::check(&config(params), upstream)),+
                }
            }

            /// Local files and folders named by (validated) params whose contents enter the key.
            pub fn local_inputs(self, params: &serde_json::Value) -> Vec<String> {
                match self {
                    $(StageKind::$variant => $module::local_inputs(&config(params))),+
                }
            }

            /// Runs the stage. Called in the child process, with `${stage}` references already
            /// replaced by paths.
            pub fn run(self, params: serde_json::Value, context: &Context) -> anyhow::Result<Report> {
                match self {
                    $(StageKind::$variant => $module::run(&serde_json::from_value(params)?, context)),+
                }
            }
        }
    };
}

stage_kinds! {
    Command => command,
    Download => download,
    Tokenize => tokenize,
    Train => train,
    Finetune => finetune,
    Sample => sample,
    Eval => eval,
    Export => export,
}

impl StageKind {
    /// Whether the kind's outputs are what people look at (a model, an evaluation, samples, an
    /// export), rather than data on its way to one.
    pub fn is_product(self) -> bool {
        matches!(self, StageKind::Train | StageKind::Finetune | StageKind::Eval | StageKind::Sample | StageKind::Export)
    }

    pub fn parse(name: &str) -> Option<StageKind> {
        StageKind::ALL.iter().copied().find(|kind| kind.name() == name)
    }

    /// The params of this (validated) config that enter the key: all but the kind's
    /// non-semantic ones, and for a pinned download not its sources (`download::keyed`).
    pub fn key_params(self, params: &serde_json::Value) -> serde_json::Value {
        let mut params = match self {
            StageKind::Download => serde_json::to_value(download::keyed(&config(params))).expect("a Config serializes"),
            _ => params.clone(),
        };
        if let Some(map) = params.as_object_mut() {
            for key in self.non_semantic() {
                map.remove(*key);
            }
        }
        params
    }
}

/// The params as written over the kind's defaults (a `finetune` is a `train` with other
/// defaults), read into its `Config`. A float that is a whole number (`1e3`, `2000.0`) is read
/// as the integer it is where the field is an integer; any other value there is "not a whole
/// number", in those words.
fn resolve<C: DeserializeOwned + Serialize + Default>(
    params: serde_yaml::Value,
) -> Result<serde_json::Value, ParamError> {
    let mut merged = match serde_yaml::to_value(C::default()).expect("a Config serializes") {
        serde_yaml::Value::Mapping(defaults) => defaults,
        _ => serde_yaml::Mapping::new(),
    };
    if let serde_yaml::Value::Mapping(written) = params {
        merged.extend(written);
    }
    let mut merged = serde_yaml::Value::Mapping(merged);
    // Each pass turns one whole float into an integer, so this ends.
    loop {
        let error = match serde_path_to_error::deserialize::<_, C>(merged.clone()) {
            Ok(config) => return Ok(serde_json::to_value(&config).expect("a Config always serializes to JSON")),
            Err(error) => error,
        };
        let key = error.path().iter().next().map(|segment| segment.to_string());
        let message = error.inner().to_string();
        if let Some(integer) = expected_integer(&message)
            && let Some(value) = value_at(&mut merged, error.path())
        {
            match whole(value, integer.starts_with('u')) {
                Some(whole) => *value = whole,
                None => {
                    let message = not_an_integer(integer, value);
                    return Err(ParamError::Invalid { key: key.unwrap_or_default(), message });
                }
            }
            continue;
        }
        return Err(match (key, missing_field(&message)) {
            (None, Some(field)) => ParamError::Missing { key: field },
            (key, _) => ParamError::Invalid { key: key.unwrap_or_default(), message: plain_message(&message) },
        });
    }
}

/// The integer type serde expected, from its message (`invalid type: string "lots", expected
/// usize` -> `usize`).
fn expected_integer(message: &str) -> Option<&str> {
    let integer = message.rsplit_once(", expected ")?.1;
    let types = ["u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize"];
    types.contains(&integer).then_some(integer)
}

/// The value at `path` in `value`.
fn value_at<'a>(
    value: &'a mut serde_yaml::Value,
    path: &serde_path_to_error::Path,
) -> Option<&'a mut serde_yaml::Value> {
    use serde_path_to_error::Segment;
    path.iter().try_fold(value, |value, segment| match (segment, value) {
        (Segment::Map { key }, serde_yaml::Value::Mapping(mapping)) => mapping.get_mut(key.as_str()),
        (Segment::Seq { index }, serde_yaml::Value::Sequence(items)) => items.get_mut(*index),
        _ => None,
    })
}

/// `1e3` -> `1000`: a float with nothing after the point that an integer (`unsigned`: one of
/// at least 0) holds.
fn whole(value: &serde_yaml::Value, unsigned: bool) -> Option<serde_yaml::Value> {
    let number = value.as_f64().filter(|_| value.as_u64().is_none() && value.as_i64().is_none())?;
    if unsigned && number < 0.0 {
        return None;
    }
    // -2^63 and 2^64 (what `u64::MAX` rounds to) are exact as floats; `as` would saturate past.
    if number.fract() != 0.0 || !(i64::MIN as f64..u64::MAX as f64).contains(&number) {
        return None;
    }
    Some(match number < 0.0 {
        true => serde_yaml::Value::from(number as i64),
        false => serde_yaml::Value::from(number as u64),
    })
}

/// "expected a whole number, not `lots`": what an integer param (`usize`, `u32`, …) says of
/// any other value, with the range where the number is out of it.
fn not_an_integer(integer: &str, value: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    let shown = match value {
        Value::Null => "an empty value".to_string(),
        Value::Bool(value) => format!("`{value}`"),
        Value::Number(value) => format!("`{value}`"),
        // `"5"` is not 5: the quotes are why.
        Value::String(value) if value.trim().parse::<f64>().is_ok() => format!("the string `\"{value}\"`"),
        Value::String(value) => format!("`{value}`"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(tagged) => format!("a value tagged `{}`", tagged.tag),
    };
    let bits = |digits: &str| match digits {
        "size" => usize::BITS,
        digits => digits.parse().unwrap_or(64),
    };
    // A number of the right kind out of the type's range says the range.
    let integer_value = matches!(value, Value::Number(number) if !number.is_f64());
    let (expected, range) = match integer.split_at(1) {
        ("u", digits) => {
            let range = format!(" up to {}", u128::MAX >> (128 - bits(digits)));
            ("a whole number", Some(range).filter(|_| value.as_u64().is_some()))
        }
        (_, digits) => {
            let max = i128::MAX >> (128 - bits(digits));
            ("an integer", Some(format!(" from {} to {max}", -max - 1)).filter(|_| integer_value))
        }
    };
    let range = range.unwrap_or_default();
    format!("expected {expected}{range}, not {shown}")
}

/// A config that `validate` produced, read back.
fn config<C: DeserializeOwned>(params: &serde_json::Value) -> C {
    serde_json::from_value(params.clone()).expect("validated params deserialize")
}

/// `missing field `run`` -> `run`.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The field names a `Deserialize` struct accepts, read from what it passes to
/// `deserialize_struct`.
fn fields_of<C: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields(&'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields = Fields(&[]);
    let _ = C::deserialize(&mut fields);
    fields.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn knows_the_fields_of_a_config() {
        assert_eq!(StageKind::Command.fields(), &["run", "outs", "env"]);
    }

    #[test]
    fn a_finetune_is_a_train_with_its_own_defaults() {
        assert_eq!(StageKind::Finetune.fields(), StageKind::Train.fields());
        let finetune = StageKind::Finetune.validate(yaml("data: d\ninit_from: m\nmax_iters: 7")).unwrap();
        let train = StageKind::Train.validate(yaml("data: d\ninit_from: m\nmax_iters: 7")).unwrap();
        assert_eq!((finetune["learning_rate"].as_f64(), train["learning_rate"].as_f64()), (Some(3e-5), Some(6e-4)));
        assert_eq!((finetune["max_iters"].as_u64(), train["max_iters"].as_u64()), (Some(7), Some(7)));
    }

    #[test]
    fn messages_name_no_internals() {
        let message = |text: &str| match StageKind::Tokenize.validate(yaml(text)) {
            Err(ParamError::Invalid { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(message("input: x\ntokenizer: [char]"), "invalid type: sequence, expected a name");
        assert_eq!(message("input:\n"), "invalid type: an empty value, expected a string");
        assert_eq!(
            plain_message(
                "stages.t.shard_tokens: invalid type: integer `99999999999999999999` as u128, expected any YAML value at line 5 column 19"
            ),
            "stages.t.shard_tokens: invalid type: integer `99999999999999999999`, which is too large"
        );
    }

    #[test]
    fn an_integer_param_takes_a_whole_float_and_says_whole_number_of_anything_else() {
        let train = |text: &str| StageKind::Train.validate(yaml(&format!("data: d\n{text}")));
        let message = |text: &str| match train(text) {
            Err(ParamError::Invalid { key, message }) => format!("{key}: {message}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(train("max_iters: 1e3\nseed: 2000.0").unwrap()["max_iters"], 1000);
        assert_eq!(train("max_iters: 1e3\nseed: 2000.0").unwrap()["seed"], 2000);
        assert_eq!(train("n_layer: 4.0").unwrap()["n_layer"], 4, "an `Option<usize>` too");
        assert_eq!(message("max_iters: lots"), "max_iters: expected a whole number, not `lots`");
        assert_eq!(message("max_iters: 2.5"), "max_iters: expected a whole number, not `2.5`");
        assert_eq!(message("max_iters: -5"), "max_iters: expected a whole number, not `-5`");
        assert_eq!(message("max_iters: -5.0"), "max_iters: expected a whole number, not `-5.0`");
        assert_eq!(message("max_iters: 1e30"), "max_iters: expected a whole number, not `1e30`");
        assert_eq!(message("max_iters: '5'"), "max_iters: expected a whole number, not the string `\"5\"`");
        assert_eq!(message("max_iters: [1]"), "max_iters: expected a whole number, not a list");
        assert_eq!(message("max_iters:"), "max_iters: expected a whole number, not an empty value");
        let download = StageKind::Download.validate(yaml("url: http://a/b\nretries: 5000000000"));
        match download {
            Err(ParamError::Invalid { message, .. }) => {
                assert_eq!(message, "expected a whole number up to 4294967295, not `5000000000`")
            }
            other => panic!("{other:?}"),
        }
        // A float param keeps its float; other messages are serde's.
        assert_eq!(train("learning_rate: 1e-3").unwrap()["learning_rate"], 1e-3);
        assert_eq!(message("learning_rate: fast"), "learning_rate: invalid type: string \"fast\", expected f64");
    }

    #[test]
    fn fills_defaults() {
        let params = StageKind::Command.validate(yaml("run: echo")).unwrap();
        assert_eq!(params, serde_json::json!({"run": "echo", "outs": [], "env": {}}));
    }

    #[test]
    fn names_missing_and_mistyped_keys() {
        let params = StageKind::Command.validate(yaml("outs: []")).unwrap();
        let error = StageKind::Command.check(&params, &Upstream::none()).unwrap_err();
        assert_eq!((error.key.as_str(), error.required), ("run", true));
        match StageKind::Command.validate(yaml("run: echo\nouts: 3")) {
            Err(ParamError::Invalid { key, message }) => {
                assert_eq!(key, "outs");
                assert!(message.starts_with("invalid type: integer `3`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
