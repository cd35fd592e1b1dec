//! The read-only commands: `status`, `ls`, `dag`, and `-f`.

use crate::{Test, stage};

fn diamond() -> Test {
    Test::with_pipeline(&format!(
        "stages:\n{}{}{}{}targets:\n  top: [d]\n",
        stage("a", "echo a > $OUT/a"),
        stage("b", "cat ${a}/a > $OUT/b"),
        stage("c", "cat ${a}/a > $OUT/c"),
        stage("d", "cat ${b}/b ${c}/c > $OUT/d"),
    ))
}

#[test]
fn status_says_fresh_stale_and_why() {
    let test = diamond();
    assert_eq!(
        test.expect(&["status"], 0).stdout,
        "a  stale    never run\nb  waiting  on `a`\nc  waiting  on `a`\nd  waiting  on `b`, `c`\n"
    );
    test.expect(&["run", "top"], 0);
    assert_eq!(test.expect(&["status"], 0).stdout, "a  fresh\nb  fresh\nc  fresh\nd  fresh\n");
    assert_eq!(test.expect(&["status", "b"], 0).stdout, "a  fresh\nb  fresh\n");
    let output = test.expect(&["status", "--set", "c.run=echo hi"], 0);
    assert_eq!(
        output.stdout,
        "a  fresh\nb  fresh\nc  stale    param `run` changed: \"echo c >> runs.log\\ncat ${a}/a > $OUT/… -> \"echo hi\"; input `a` removed\nd  waiting  on `c`\n"
    );
}

#[test]
fn ls_lists_targets_and_stages() {
    assert_eq!(
        diamond().expect(&["ls"], 0).stdout,
        "targets:\n  top  d\nstages:\n  a    command\n  b    command\n  c    command\n  d    command\n"
    );
}

#[test]
fn dag_draws_text_and_dot() {
    let test = diamond();
    assert_eq!(
        test.expect(&["dag"], 0).stdout,
        "a (command)\n  b (command)  <- a\n  c (command)  <- a\n    d (command)  <- b, c\n"
    );
    let dot = test.expect(&["dag", "--dot", "c"], 0).stdout;
    assert_eq!(
        dot,
        "digraph nanoflow {\n  rankdir=LR;\n  \"a\" [label=\"a\\n(command)\"];\n  \"c\" [label=\"c\\n(command)\"];\n  \"a\" -> \"c\";\n}\n"
    );
}

#[test]
fn file_flag_and_parent_directory_lookup() {
    let test = diamond();
    fs_err::create_dir_all(test.path("sub/dir")).unwrap();
    let mut command = test.command(&["ls"]);
    command.current_dir(test.path("sub/dir"));
    assert!(String::from_utf8(command.output().unwrap().stdout).unwrap().contains("top  d"));
    test.write("other.yaml", "stages:\n  only: {kind: command, run: 'true'}\n");
    assert_eq!(test.expect(&["-f", "other.yaml", "ls"], 0).stdout, "stages:\n  only  command\n");
}
