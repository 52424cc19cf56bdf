//! The XNLI / MultiNLI readers: tab-separated with a header, or JSON lines (by the first
//! byte's low bit), with or without skipping bad lines and a language filter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlctl::nli::{read_nli_jsonl, read_nli_tsv, NliLabel, NliReadOptions};
use mlctl_fuzz::fresh_dir;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let options = NliReadOptions {
        languages: if selector & 4 != 0 {
            vec!["en".into(), "fr".into()]
        } else {
            Vec::new()
        },
        skip_bad_lines: selector & 2 != 0,
        default_language: "en".into(),
    };
    let dir = fresh_dir("nli");
    let path = dir.join("data");
    std::fs::write(&path, rest).unwrap();
    let read = if selector & 1 == 0 {
        read_nli_tsv(&path, &options)
    } else {
        read_nli_jsonl(&path, &options)
    };
    if let Ok(data) = read {
        for example in &data.examples {
            assert_eq!(NliLabel::parse(example.label.as_str()), Some(example.label));
            assert!(options.languages.is_empty() || options.languages.contains(&example.language));
        }
    }
});
