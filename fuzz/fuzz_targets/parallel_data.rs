//! Parallel data: ML-CTL's TSV with anchor spans, `src ||| tgt` lines, two line-aligned files
//! (split at the first NUL), and the word aligner's `src ||| tgt` reader, selected by the first
//! byte. Every line of a corpus that opens is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlctl::align::io::read_parallel;
use mlctl::data::{CorpusFormat, ParallelCorpus};
use mlctl_fuzz::{fresh_dir, parts};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("parallel");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let format = match selector % 4 {
        0 => CorpusFormat::ReferenceTsv(write("train.tsv", rest)),
        1 => CorpusFormat::Bitext(write("train.txt", rest)),
        2 => {
            let p = parts(rest, 2);
            CorpusFormat::LineAligned {
                src: write("train.src", p[0]),
                tgt: write("train.tgt", p.get(1).copied().unwrap_or_default()),
            }
        }
        _ => {
            if let Ok(pairs) = read_parallel(write("align.txt", rest)) {
                for pair in pairs {
                    let _ = pair.is_empty();
                }
            }
            return;
        }
    };
    if let Ok(mut corpus) = ParallelCorpus::open(format) {
        for i in 0..corpus.len().min(256) + 1 {
            let _ = corpus.get(i);
        }
    }
});
