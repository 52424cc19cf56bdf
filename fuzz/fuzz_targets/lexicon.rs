//! The lexicon: word lists of two languages (spaced or unspaced scripts, by the first byte),
//! then the anchors found in a sentence pair, by the dictionary alone and as token spans of the
//! tiny fixture tokenizer. Parts are separated by NUL: source list, target list, source
//! sentence, target sentence.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mlctl::align::Lexicon;
use mlctl::data::{AnchorFinder, LexiconAnchors};
use mlctl_fuzz::{parts, text, tiny_tokenizer};

const PAIRS: [(&str, &str); 4] = [("en", "fr"), ("en", "zh"), ("zh", "ja"), ("ar", "ru")];

fuzz_target!(init: mlctl_fuzz::allow_caught_panics(), |data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (src_lang, tgt_lang) = PAIRS[usize::from(selector) % PAIRS.len()];
    let p = parts(rest, 4);
    let get = |i: usize| text(p.get(i).copied().unwrap_or_default());
    let list = |s: String| -> Vec<String> { s.lines().map(|l| l.trim().to_owned()).collect() };
    let (mut src_list, mut tgt_list) = (list(get(0)), list(get(1)));
    if selector & 0x80 == 0 {
        let n = src_list.len().min(tgt_list.len());
        src_list.truncate(n);
        tgt_list.truncate(n);
    }
    let Ok(lexicon) = Lexicon::from_lists(
        vec![src_lang.to_owned(), tgt_lang.to_owned()],
        vec![src_list, tgt_list],
    ) else {
        return;
    };
    let (src, tgt) = (get(2), get(3));
    let found = lexicon
        .find_anchors(src_lang, &src, tgt_lang, &tgt)
        .expect("both languages are in the lexicon");
    for m in &found {
        assert_eq!(src[m.src_bytes.0..m.src_bytes.1], m.src_word);
        assert_eq!(tgt[m.tgt_bytes.0..m.tgt_bytes.1], m.tgt_word);
    }
    let anchors = LexiconAnchors::new(Arc::new(lexicon), src_lang, tgt_lang).unwrap();
    let tok = tiny_tokenizer();
    if let Ok(enc) = tok.encode_each(&[src.as_str(), tgt.as_str()]) {
        if let Some((s, t)) = anchors.find(&src, &enc[0], &tgt, &enc[1]) {
            assert!(s.start <= s.end && s.end < enc[0].len(), "{s:?}");
            assert!(t.start <= t.end && t.end < enc[1].len(), "{t:?}");
        }
    }
});
