//! GPT-2 BPE throughput: nanoflow's `bpe` against tiktoken-rs's `r50k_base` (the same ranks and
//! pattern) on the same text, on one thread and on all of them.
//!
//!     cargo bench -p nanoflow-stages --bench bpe [-- PATH [MEGABYTES]]
//!
//! The text is tiny Shakespeare (`data/tinyshakespeare/input.txt` in the repo, or PATH)
//! repeated to about 20 MB, else generated text. Both sides encode the same chunks (cut where
//! tokenization may break, so both give the whole text's tokens); the token counts must agree.

use std::time::Instant;

use nanoflow_stages::formats::bpe::{self, Bpe};
use rayon::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with("--")).collect();
    let path = args
        .first()
        .cloned()
        .unwrap_or(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/tinyshakespeare/input.txt").into());
    let megabytes: usize = args.get(1).and_then(|mb| mb.parse().ok()).unwrap_or(20);
    let seed = match fs_err::read_to_string(&path) {
        Ok(text) => {
            eprintln!("text: `{path}` repeated to {megabytes} MB");
            text
        }
        Err(_) => {
            eprintln!("text: generated ({path} not found), {megabytes} MB");
            generated()
        }
    };
    let mut text = String::with_capacity(megabytes << 20);
    while text.len() < megabytes << 20 {
        text.push_str(&seed);
    }
    let mb = text.len() as f64 / 1e6;
    let chunks = bpe::chunks(&text, 1 << 20);
    let threads = rayon::current_num_threads();

    let ours = Bpe::gpt2();
    let reference = tiktoken_rs::r50k_base().unwrap();
    // Warm up: parse tables, fault in pages.
    ours.encode(&text[..100_000], &mut Vec::new());
    reference.encode_ordinary(&text[..100_000]);

    let time = |name: &str, f: &dyn Fn() -> usize| {
        let start = Instant::now();
        let tokens = f();
        let seconds = start.elapsed().as_secs_f64();
        println!("{name:<32} {:>8.1} MB/s  ({tokens} tokens, {seconds:.2} s)", mb / seconds);
        (tokens, mb / seconds)
    };
    let ours_one = time("nanoflow bpe, 1 thread", &|| {
        let mut out = Vec::new();
        for chunk in &chunks {
            ours.encode(chunk, &mut out);
        }
        out.len()
    });
    let theirs_one = time("tiktoken-rs r50k_base, 1 thread", &|| {
        chunks.iter().map(|chunk| reference.encode_ordinary(chunk).len()).sum()
    });
    let ours_all = time(&format!("nanoflow bpe, {threads} threads"), &|| {
        chunks
            .par_iter()
            .map(|chunk| {
                let mut out = Vec::new();
                ours.encode(chunk, &mut out);
                out.len()
            })
            .sum()
    });
    let theirs_all = time(&format!("tiktoken-rs r50k_base, {threads} threads"), &|| {
        chunks.par_iter().map(|chunk| reference.encode_ordinary(chunk).len()).sum()
    });
    assert_eq!(ours_one.0, theirs_one.0, "token counts differ");
    assert_eq!(ours_all.0, theirs_all.0, "token counts differ");
    println!(
        "speedup over tiktoken-rs: {:.2}x on 1 thread, {:.2}x on {threads} threads",
        ours_one.1 / theirs_one.1,
        ours_all.1 / theirs_all.1
    );
    println!(
        "scaling: nanoflow {:.2}x, tiktoken-rs {:.2}x on {threads} threads",
        ours_all.1 / ours_one.1,
        theirs_all.1 / theirs_one.1
    );
}

/// Varied text when no corpus is at hand: words, numbers, code, unicode, whitespace runs.
fn generated() -> String {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog's",
        "naïve",
        "café",
        "日本語",
        "Straße",
        "1234",
        "3.14",
        "x[i]",
        "{}",
        "don't",
        "WE'LL",
        "🦀",
        "    ",
        "\n\n",
        "\t",
        "=>",
        "https://example.com",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut text = String::new();
    while text.len() < 1 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push_str(words[(state % words.len() as u64) as usize]);
        text.push(if state.is_multiple_of(11) { '\n' } else { ' ' });
    }
    text
}
