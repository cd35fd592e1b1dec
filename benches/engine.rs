//! Engine benchmarks (run with `cargo bench --bench engine`; not a timed test):
//!
//! 1. `nanoflow status` on 200 stages whose outputs hold 2 GB in all, nothing changed: the
//!    stat cache should make this a matter of `stat` calls, well under a second. Shown beside
//!    the same `status` with the stat cache deleted (every byte hashed again).
//! 2. The overhead of running 200 trivial `command` stages (`true`) end to end, and of a
//!    second run that finds them all cached.
//!
//! 3. Beside GNU make on the same DAG (`benches/make_side_by_side.sh`, which writes each DAG as
//!    pipeline.yaml and as a Makefile): the cold and the no-op run, and `status`, of a binary
//!    tree of N command stages with one target naming the leaves, and a chain of N stages (its
//!    cold run / N is the cost per stage), for N = 100 and 1,000. Skipped where `make` is not
//!    installed.
//!
//! `NANOFLOW_BENCH_MB` sets the output size per stage in the first benchmark (default 10, so
//! 200 stages hold 2000 MB).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const STAGES: usize = 200;

fn nanoflow(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let output =
        Command::new(env!("CARGO_BIN_EXE_nanoflow")).args(args).current_dir(dir).output().expect("nanoflow starts");
    let elapsed = start.elapsed();
    assert!(output.status.success(), "nanoflow {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    elapsed
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn pipeline(dir: &Path, run: impl Fn(usize) -> String) {
    let mut yaml = String::from("stages:\n");
    for index in 0..STAGES {
        yaml += &format!("  s{index:03}:\n    kind: command\n    run: {}\n", run(index));
    }
    yaml += "targets:\n  all: [";
    yaml += &(0..STAGES).map(|index| format!("s{index:03}")).collect::<Vec<_>>().join(", ");
    yaml += "]\n";
    fs_err::write(dir.join("pipeline.yaml"), yaml).unwrap();
}

fn main() {
    let megabytes: usize = std::env::var("NANOFLOW_BENCH_MB").ok().and_then(|mb| mb.parse().ok()).unwrap_or(10);

    let big = tempfile::tempdir().unwrap();
    pipeline(big.path(), |index| format!("\"head -c {megabytes}M /dev/urandom > $OUT/data-{index}.bin\""));
    let build = nanoflow(big.path(), &["run", "all", "-q", "-j", "2"]);
    println!(
        "status benchmark: {STAGES} stages, {} MB of outputs (built in {:.1}s)",
        STAGES * megabytes,
        build.as_secs_f64()
    );
    let warm = median((0..5).map(|_| nanoflow(big.path(), &["status"])).collect());
    println!("  nanoflow status, nothing changed (stat cache):  {:>8.1} ms", warm.as_secs_f64() * 1e3);
    let cache = big.path().join("artifacts/.nanoflow/stat-cache.json");
    fs_err::remove_file(&cache).unwrap();
    let cold = nanoflow(big.path(), &["status"]);
    println!("  nanoflow status, stat cache deleted (rehash):   {:>8.1} ms", cold.as_secs_f64() * 1e3);
    let cached = median((0..3).map(|_| nanoflow(big.path(), &["run", "all", "-q"])).collect());
    println!("  nanoflow run all, everything cached:            {:>8.1} ms", cached.as_secs_f64() * 1e3);
    drop(big);

    let small = tempfile::tempdir().unwrap();
    pipeline(small.path(), |_| "\"true\"".to_string());
    let run = nanoflow(small.path(), &["run", "all", "-q"]);
    println!("overhead benchmark: {STAGES} stages running `true`");
    println!(
        "  nanoflow run all, -j 1:                         {:>8.1} ms  ({:.2} ms per stage)",
        run.as_secs_f64() * 1e3,
        run.as_secs_f64() * 1e3 / STAGES as f64
    );
    fs_err::remove_dir_all(small.path().join("artifacts")).unwrap();
    let parallel = nanoflow(small.path(), &["run", "all", "-q", "-j", "4"]);
    println!(
        "  nanoflow run all, -j 4:                         {:>8.1} ms  ({:.2} ms per stage)",
        parallel.as_secs_f64() * 1e3,
        parallel.as_secs_f64() * 1e3 / STAGES as f64
    );
    let again = median((0..3).map(|_| nanoflow(small.path(), &["run", "all", "-q"])).collect());
    println!("  nanoflow run all again (all cached):            {:>8.1} ms", again.as_secs_f64() * 1e3);
    drop(small);

    if Command::new("make").arg("--version").output().is_ok_and(|output| output.status.success()) {
        println!("beside GNU make (benches/make_side_by_side.sh):");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/make_side_by_side.sh");
        let status =
            Command::new("bash").arg(script).arg(env!("CARGO_BIN_EXE_nanoflow")).status().expect("bash starts");
        assert!(status.success(), "benches/make_side_by_side.sh failed");
    } else {
        println!("beside GNU make: skipped (no `make` installed)");
    }
}
