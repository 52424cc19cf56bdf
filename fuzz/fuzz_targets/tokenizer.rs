//! A tokenizer directory: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
//! and `config.json` (NUL-separated; the first byte's bits say which of the last three are
//! written). A tokenizer that loads encodes texts, pairs and words, and writes itself back
//! to a directory that must load again.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use mlctl::tokenize::Tokenizer;
use mlctl_fuzz::{fresh_dir, parts};

const FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
];

fuzz_target!(init: mlctl_fuzz::allow_caught_panics(), |data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("tokenizer");
    for (k, part) in parts(rest, 4).into_iter().enumerate() {
        if k == 0 || selector & (1 << k) != 0 {
            std::fs::write(dir.join(FILES[k]), part).unwrap();
        }
    }
    let Ok(tok) = Tokenizer::from_dir(&dir) else {
        return;
    };
    let tok = tok
        .clone()
        .with_max_len(usize::from(selector >> 4) + 1)
        .unwrap_or(tok);
    let texts = ["Hello world, this is a test.", "", "l'homme 中文 ﬁ Ünïcödé"];
    let _ = tok.encode_batch(&texts, &Device::Cpu);
    let _ = tok.encode_pair_batch(&texts, &texts, &Device::Cpu);
    let words: Vec<Vec<&str>> = texts.iter().map(|t| t.split(' ').collect()).collect();
    let _ = tok.encode_pretokenized_batch(&words, &Device::Cpu);
    let _ = tok.encode_each(&texts);
    let _ = (tok.mask_token(), tok.pad_token(), tok.vocab_size());
    let out = fresh_dir("tokenizer-saved");
    tok.save_pretrained(&out).expect("a loaded tokenizer saves");
    Tokenizer::from_dir(&out).expect("a saved tokenizer loads back");
});
