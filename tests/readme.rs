//! Every YAML snippet in README.md is a pipeline this nanoflow accepts (issue 29: the README's
//! own example named a file that does not exist, so every target exited 2). A snippet fenced
//! as ```` ```yaml run ```` is run for real, offline, on the repo's data; any other is planned
//! (`run -n` of its targets, `status` without); one with no `stages:` (a top-level setting)
//! is planned with a stage beside it.

use crate::Test;

/// The README's YAML blocks: (the line the block starts on, whether it is to be run, its text).
fn snippets() -> Vec<(usize, bool, String)> {
    let readme = include_str!("../README.md");
    let mut snippets = Vec::new();
    let mut lines = readme.lines().enumerate();
    while let Some((number, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```yaml") else { continue };
        let run = info.split_whitespace().any(|word| word == "run");
        let body: Vec<&str> = lines.by_ref().map(|(_, line)| line).take_while(|line| *line != "```").collect();
        snippets.push((number + 1, run, body.join("\n") + "\n"));
    }
    snippets
}

#[test]
fn every_yaml_snippet_in_the_readme_is_a_pipeline_nanoflow_accepts() {
    let snippets = snippets();
    assert!(snippets.len() >= 3, "{snippets:?}");
    assert!(snippets.iter().any(|(_, run, _)| *run), "at least one snippet runs for real");
    for (line, run, yaml) in snippets {
        let test = Test::with_repo_pipeline();
        let pipeline = match yaml.lines().any(|line| line.starts_with("stages:")) {
            true => yaml.clone(),
            false => format!("{yaml}stages:\n  snippet-check: {{kind: command, run: 'true'}}\n"),
        };
        test.write("pipeline.yaml", &pipeline);
        test.write("my-notes.txt", "Some text of my own, to train on.\n".repeat(200).as_str());
        let ls = test.run(&["ls"]);
        assert_eq!(ls.code, 0, "README.md:{line}: `nanoflow ls` failed:\n{}\n{yaml}", ls.stderr);
        let targets: Vec<String> = match ls.stdout.split_once("stages:\n") {
            Some((targets, _)) => {
                targets.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
            }
            None => Vec::new(),
        };
        let mut args: Vec<&str> = vec!["run"];
        args.extend(targets.iter().map(String::as_str));
        if !run {
            args.push("-n");
        }
        let output = if targets.is_empty() { test.run(&["status"]) } else { test.run(&args) };
        assert_eq!(
            output.code,
            0,
            "README.md:{line}: `nanoflow {}` failed:\n{}\n{yaml}",
            args.join(" "),
            output.stderr
        );
        if run {
            test.expect(&["verify"], 0);
        }
    }
}
