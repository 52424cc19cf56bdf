//! Word alignments: Pharaoh lines and gold lines (`i-j` sure, `ipj` possible; 0- or 1-based by
//! the first byte), checked against a parallel text (after the first NUL). What parses must
//! write back and parse to the same alignment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlctl::align::io::{check_gold, check_links, pharaoh_text, read_gold, read_pharaoh};
use mlctl::align::{Alignment, GoldAlignment, SentencePair};
use mlctl_fuzz::{fresh_dir, parts};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let one_based = selector & 1 == 1;
    let p = parts(rest, 2);
    let (links, text) = (p[0], p.get(1).copied().unwrap_or_default());
    let pairs: Vec<SentencePair> = String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| SentencePair::parse(l).ok())
        .collect();
    let dir = fresh_dir("alignments");
    let path = dir.join("links");
    std::fs::write(&path, links).unwrap();
    if selector & 2 == 0 {
        if let Ok(gold) = read_gold(&path, one_based) {
            for g in &gold {
                let line = g.to_line(one_based);
                let back = GoldAlignment::parse(&line, one_based).expect("written gold parses");
                assert_eq!(&back, g, "gold line `{line}` does not read back");
            }
            let _ = check_gold(&path, &gold, &pairs, one_based);
        }
    } else if let Ok(alignments) = read_pharaoh(&path) {
        let text = pharaoh_text(&alignments);
        let back: Vec<Alignment> = text
            .lines()
            .map(|l| Alignment::parse_pharaoh(l).expect("written Pharaoh parses"))
            .collect();
        assert_eq!(back, alignments);
        let links: Vec<Vec<(usize, usize)>> =
            alignments.iter().map(|a| a.links().to_vec()).collect();
        let _ = check_links(&path, links.iter().map(Vec::as_slice), &pairs, false);
    }
});
