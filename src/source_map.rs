//! Where each key and value of a YAML file sits (line and column), so that errors found after
//! parsing (an unknown key, a missing stage, a cycle) can point at the text. serde_yaml reads the
//! values; it keeps no positions, so this walks the same text once more with yaml-rust2's event
//! parser, which does. It also catches duplicate keys, which serde_yaml would report without
//! saying where the first one was.

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A place in a file, 1-based, as editors show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Where a param came from: a YAML file, or a `--set` argument on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(Location),
    CommandLine(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(location) => write!(f, "at {location}"),
            Origin::CommandLine(argument) => write!(f, "in `--set {argument}`"),
        }
    }
}

/// A key that appears twice in one mapping.
#[derive(Debug, Clone)]
pub struct Duplicate {
    pub path: Vec<String>,
    pub first: Location,
    pub second: Location,
}

/// Positions of every mapping key and every value, by path (`["stages", "train", "max_iters"]`,
/// sequence items by their index).
#[derive(Debug, Clone)]
pub struct SourceMap {
    file: PathBuf,
    /// By path, its parts joined (`joined`): one string per entry, (line, column) beside it, so
    /// that a pipeline of thousands of stages is mapped without an allocation per part.
    keys: HashMap<String, (usize, usize)>,
    values: HashMap<String, (usize, usize)>,
    pub duplicates: Vec<Duplicate>,
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub location: Location,
    pub message: String,
}

impl SourceMap {
    /// Parses `text` (the contents of `file`, which is only used to label locations).
    pub fn parse(file: &Path, text: &str) -> Result<SourceMap, SyntaxError> {
        let mut walker = Walker {
            map: SourceMap {
                file: file.to_path_buf(),
                keys: HashMap::new(),
                values: HashMap::new(),
                duplicates: Vec::new(),
            },
            stack: Vec::new(),
        };
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut walker, false).map_err(|error| {
            let found = walker.map.location(error.marker());
            // A `[` or `{` left open is found only where the parser gives up, often lines
            // later: the error points at the bracket, and says where the parser stopped.
            let open = walker.stack.iter().rev().find_map(|frame| {
                let (Frame::Mapping { start, .. } | Frame::Sequence { start, .. }) = frame;
                let bracket = text.chars().nth(start.index())?;
                matches!(bracket, '[' | '{').then(|| (bracket, walker.map.location(start)))
            });
            match open {
                Some((bracket, location)) if location.line < found.line => SyntaxError {
                    message: format!("this `{bracket}` is not closed ({} at line {})", error.info(), found.line),
                    location,
                },
                _ => SyntaxError { location: found, message: error.info().to_string() },
            }
        })?;
        Ok(walker.map)
    }

    /// Where the key at `path` is written.
    pub fn key(&self, path: &[&str]) -> Option<Location> {
        self.keys.get(&joined(path.iter().copied())).map(|&at| self.at(at))
    }

    /// Where the value at `path` starts.
    pub fn value(&self, path: &[&str]) -> Option<Location> {
        self.values.get(&joined(path.iter().copied())).map(|&at| self.at(at))
    }

    /// The key at `path`, else the nearest enclosing key that is written down, else the top.
    pub fn nearest(&self, path: &[&str]) -> Location {
        (0..=path.len()).rev().find_map(|len| self.key(&path[..len])).unwrap_or_else(|| Location {
            file: self.file.clone(),
            line: 1,
            column: 1,
        })
    }

    fn location(&self, marker: &Marker) -> Location {
        self.at(line_column(marker))
    }

    fn at(&self, (line, column): (usize, usize)) -> Location {
        Location { file: self.file.clone(), line, column }
    }
}

fn line_column(marker: &Marker) -> (usize, usize) {
    (marker.line(), marker.col() + 1)
}

/// A path as one string: each part followed by a NUL (which no key of a pipeline holds).
fn joined<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for part in parts {
        text.push_str(part);
        text.push('\0');
    }
    text
}

enum Frame {
    Mapping { key: Option<String>, seen: HashMap<String, (usize, usize)>, start: Marker },
    Sequence { index: usize, start: Marker },
}

struct Walker {
    map: SourceMap,
    stack: Vec<Frame>,
}

impl Walker {
    fn path(&self) -> Vec<String> {
        self.stack
            .iter()
            .filter_map(|frame| match frame {
                Frame::Mapping { key, .. } => key.clone(),
                Frame::Sequence { index, .. } => Some(index.to_string()),
            })
            .collect()
    }

    /// The current position as `joined` writes it.
    fn joined_path(&self) -> String {
        let mut text = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Mapping { key: Some(key), .. } => text.push_str(key),
                Frame::Mapping { key: None, .. } => continue,
                Frame::Sequence { index, .. } => {
                    let _ = write!(text, "{index}");
                }
            }
            text.push('\0');
        }
        text
    }

    /// A value (scalar or collection) starts at `marker` in the current position.
    fn value_starts(&mut self, marker: &Marker) {
        let path = self.joined_path();
        self.map.values.insert(path, line_column(marker));
    }

    /// The value in the current position is complete: move the parent on.
    fn value_ends(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Mapping { key, .. }) => *key = None,
            Some(Frame::Sequence { index, .. }) => *index += 1,
            None => {}
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Mapping { key: None, .. }))
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, marker: Marker) {
        match event {
            Event::Scalar(text, ..) if self.expecting_key() => {
                let at = line_column(&marker);
                let mut path = self.joined_path();
                path.push_str(&text);
                path.push('\0');
                let first = match self.stack.last() {
                    Some(Frame::Mapping { seen, .. }) => seen.get(&text).copied(),
                    _ => return,
                };
                if let Some(first) = first {
                    let mut parts = self.path();
                    parts.push(text.clone());
                    let duplicate = Duplicate { path: parts, first: self.map.at(first), second: self.map.at(at) };
                    self.map.duplicates.push(duplicate);
                } else {
                    self.map.keys.insert(path, at);
                }
                let Some(Frame::Mapping { key, seen, .. }) = self.stack.last_mut() else { return };
                if first.is_none() {
                    seen.insert(text.clone(), at);
                }
                *key = Some(text);
            }
            Event::Scalar(..) | Event::Alias(_) => {
                if self.expecting_key() {
                    // A non-scalar key: nanoflow never uses one; keep the walk consistent.
                    if let Some(Frame::Mapping { key, .. }) = self.stack.last_mut() {
                        *key = Some(String::from("?"));
                    }
                    return;
                }
                self.value_starts(&marker);
                self.value_ends();
            }
            Event::MappingStart(..) => {
                self.value_starts(&marker);
                self.stack.push(Frame::Mapping { key: None, seen: HashMap::new(), start: marker });
            }
            Event::SequenceStart(..) => {
                self.value_starts(&marker);
                self.stack.push(Frame::Sequence { index: 0, start: marker });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_ends();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# a comment
stages:
  a:
    kind: command
    run: echo hi
    deps: [x.txt, y.txt]
  b:
    kind: command
    run: |
      cat ${a}
targets:
  all: [b]
";

    fn map(text: &str) -> SourceMap {
        SourceMap::parse(Path::new("pipeline.yaml"), text).unwrap()
    }

    fn line_column(location: Option<Location>) -> (usize, usize) {
        let location = location.unwrap();
        (location.line, location.column)
    }

    #[test]
    fn finds_keys_and_values() {
        let map = map(TEXT);
        assert_eq!(line_column(map.key(&["stages"])), (2, 1));
        assert_eq!(line_column(map.key(&["stages", "a"])), (3, 3));
        assert_eq!(line_column(map.key(&["stages", "a", "run"])), (5, 5));
        assert_eq!(line_column(map.value(&["stages", "a", "run"])), (5, 10));
        assert_eq!(line_column(map.value(&["stages", "a", "deps", "1"])), (6, 19));
        assert_eq!(line_column(map.key(&["stages", "b", "kind"])), (8, 5));
        assert_eq!(line_column(map.key(&["targets", "all"])), (12, 3));
        assert_eq!(line_column(map.value(&["targets", "all", "0"])), (12, 9));
    }

    #[test]
    fn nearest_falls_back_to_the_enclosing_key() {
        let map = map(TEXT);
        assert_eq!(map.nearest(&["stages", "a", "nope"]).line, 3);
        assert_eq!(map.nearest(&["nothing"]).line, 1);
    }

    #[test]
    fn reports_duplicates_with_both_places() {
        let map = map("stages:\n  a: {kind: command}\n  b: {}\n  a: {kind: command}\n");
        assert_eq!(map.duplicates.len(), 1);
        let duplicate = &map.duplicates[0];
        assert_eq!(duplicate.path, vec!["stages", "a"]);
        assert_eq!((duplicate.first.line, duplicate.second.line), (2, 4));
    }

    /// Issue 28, item 10: a `[` left open is reported where it opens, not lines later.
    #[test]
    fn an_unclosed_bracket_is_reported_where_it_opens() {
        let text = "stages:\n  a:\n    kind: command\n    deps: [x.txt, y.txt\n\n  b:\n    kind: command\n";
        let error = SourceMap::parse(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!((error.location.line, error.location.column), (4, 11), "{error:?}");
        assert_eq!(error.message, "this `[` is not closed (invalid indentation at line 6)");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let error = SourceMap::parse(Path::new("p.yaml"), "stages:\n  a: [1, 2\n  b: 3\n").unwrap_err();
        assert_eq!(error.location.file, Path::new("p.yaml"));
        assert!(error.location.line >= 2, "{error:?}");
    }
}
