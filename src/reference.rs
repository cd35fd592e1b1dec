//! `${stage}` references inside param strings: each is an edge of the DAG, and at run time the
//! path of that stage's output. `$${` writes a literal `${` (make's `$$`), so a command can still
//! use the shell's `${VAR}`; `${OUT}` is left to the shell as well.

/// One piece of a param string.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Reference(&'a str),
}

fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        let after = &rest[start + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            // `$${` is a literal `${`.
            pieces.push(Piece::Text(&rest[..start]));
            pieces.push(Piece::Text("${"));
            rest = escaped;
            continue;
        }
        let name = after
            .strip_prefix('{')
            .and_then(|inner| inner.find('}').map(|end| &inner[..end]))
            .filter(|name| is_name(name) && *name != "OUT");
        match name {
            Some(name) => {
                pieces.push(Piece::Text(&rest[..start]));
                pieces.push(Piece::Reference(name));
                rest = &after[name.len() + 2..];
            }
            None => {
                pieces.push(Piece::Text(&rest[..start + 1]));
                rest = after;
            }
        }
    }
    pieces.push(Piece::Text(rest));
    pieces.retain(|piece| *piece != Piece::Text(""));
    pieces
}

/// Whether `text` opens a `${` that no `}` closes: a reference cut short (`${data/x.txt`), which
/// the shell would only reject when the stage runs.
pub fn unclosed(text: &str) -> bool {
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        let after = &rest[start + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            rest = escaped;
            continue;
        }
        if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                None => return true,
                Some(end) => rest = &inner[end + 1..],
            }
            continue;
        }
        rest = after;
    }
    false
}

fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The stage names `text` refers to, in order.
pub fn references(text: &str) -> Vec<&str> {
    pieces(text)
        .into_iter()
        .filter_map(|piece| match piece {
            Piece::Reference(name) => Some(name),
            Piece::Text(_) => None,
        })
        .collect()
}

/// The stage whose output `text` is a path in (`${stage}` or `${stage}/file`), if it starts with
/// a reference.
pub fn leading(text: &str) -> Option<&str> {
    match pieces(text).first() {
        Some(Piece::Reference(name)) => Some(name),
        _ => None,
    }
}

/// `text` with each reference replaced by `path_of(name)` and escapes undone.
pub fn substitute(text: &str, path_of: impl Fn(&str) -> String) -> String {
    pieces(text)
        .into_iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.to_string(),
            Piece::Reference(name) => path_of(name),
        })
        .collect()
}

/// Every string inside a JSON value, for finding and replacing references in params.
pub fn strings_mut(value: &mut serde_json::Value, visit: &mut impl FnMut(&mut String)) {
    match value {
        serde_json::Value::String(text) => visit(text),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|item| strings_mut(item, visit)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|item| strings_mut(item, visit)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_references() {
        assert_eq!(references("cat ${a}/x.txt ${b-2} > $OUT/y"), vec!["a", "b-2"]);
        assert_eq!(references("no refs, ${} ${a b} $x ${OUT}"), Vec::<&str>::new());
        assert_eq!(references("$${HOME} ${HOME:-x}"), Vec::<&str>::new());
    }

    #[test]
    fn finds_an_unclosed_reference() {
        assert!(unclosed("cat ${a/x.txt"));
        assert!(unclosed("cat ${a} ${b"));
        assert!(unclosed("${"));
        assert!(!unclosed("cat ${a}/x.txt $${HOME ${HOME:-x} $ $x"));
        assert!(!unclosed("awk '{print $1}' ${a}"));
    }

    #[test]
    fn substitutes_paths_and_undoes_escapes() {
        let path = |name: &str| format!("/store/{name}");
        assert_eq!(substitute("cat ${a}/x.txt", path), "cat /store/a/x.txt");
        assert_eq!(substitute("echo $${HOME} ${a}$", path), "echo ${HOME} /store/a$");
        assert_eq!(substitute("$OUT ${OUT} $$ $", path), "$OUT ${OUT} $$ $");
    }
}
