//! The word alignment pipeline end to end on the tiny model (library, not the example binary).

use crate::common;

use candle_core::{DType, Device};
use mlctl::align::io::{check_links, read_gold, read_parallel};
use mlctl::align::{
    method_by_name, split_words, word_spans, Alignment, AlignmentCounts, ArgMax, SentencePair,
    SimMatrix, Similarity, TokenType, WordAligner, METHOD_NAMES,
};
use mlctl::pooling::{Pooling, TokenSpan};
use mlctl::pretrained::PretrainedBert;

fn tiny() -> PretrainedBert {
    PretrainedBert::load(
        common::fixture("tiny_bert").to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn roen_lines_give_one_valid_alignment_each() {
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let pairs: Vec<SentencePair> =
        read_parallel(common::fixture("align/roen.src-tgt")).unwrap()[..6].to_vec();
    let gold = read_gold(common::fixture("align/roen.gold"), true).unwrap()[..6].to_vec();
    for pooling in [Pooling::layer(2), Pooling::mlctl()] {
        let aligner = WordAligner::new(bert.encoder(), tok.clone()).with_pooling(&pooling);
        for name in METHOD_NAMES {
            let method = method_by_name(name).unwrap();
            let aligns = aligner.align_pairs(&pairs, method.as_ref()).unwrap();
            assert_eq!(aligns.len(), pairs.len(), "{name}");
            check_links("pred", aligns.iter().map(|a| a.links()), &pairs, false).unwrap();
            assert!(
                aligns.iter().all(|a| !a.is_empty()),
                "{name}: every pair has words, so links"
            );
            let c = AlignmentCounts::corpus(&aligns, &gold).unwrap();
            assert!((0.0..=1.0).contains(&c.aer()), "{name}");
            // batching does not change the result
            let one = aligner.align_pairs(&pairs[3..4], method.as_ref()).unwrap();
            assert_eq!(one[0], aligns[3], "{name}");
        }
    }
}

#[test]
fn word_vectors_are_subword_means() {
    // Reference: the crate's span pooling over each word's token span, one word at a time.
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let words = vec!["the", "playing", "dogs", "ran", "!"];
    let batch = tok
        .encode_pretokenized_batch(std::slice::from_ref(&words), &Device::Cpu)
        .unwrap();
    let spans = word_spans(&batch.word_ids[0], words.len());
    assert_eq!(spans[1], Some(TokenSpan { start: 2, end: 3 }), "play ##ing");
    let out = bert
        .model
        .encoder
        .forward(
            &batch.input_ids,
            Some(&batch.token_type_ids),
            Some(&batch.attention_mask),
        )
        .unwrap();
    for (layers, pooling, scale) in [
        (vec![1isize], Pooling::layer(1), 1.0),
        (vec![1, -1], Pooling::mlctl(), 0.5),
    ] {
        let aligner = WordAligner::new(bert.encoder(), tok.clone())
            .with_pooling(&Pooling::layer(0).with_layers(layers));
        let vectors = aligner.embed_words(std::slice::from_ref(&words)).unwrap();
        for (w, span) in spans.iter().enumerate() {
            let reference = pooling
                .spans(&out, &[span.unwrap()])
                .unwrap()
                .affine(scale, 0.0)
                .unwrap();
            let reference: Vec<f32> = reference.squeeze(0).unwrap().to_vec1().unwrap();
            let got = vectors[0][w].as_ref().unwrap();
            let diff = got
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "word {w}: {diff}");
        }
    }
}

#[test]
fn a_sentence_aligns_with_itself_on_the_diagonal() {
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let aligner = WordAligner::new(bert.encoder(), tok.clone()).with_layer(-1);
    let s = [
        "the", "quick", "brown", "fox", "jumped", "over", "a", "lazy", "dog",
    ];
    // (softmax and sparsemax compare dot products, for which a word need not be its own best match)
    for name in ["argmax", "itermax", "match"] {
        let a = aligner
            .align_words(&s, &s, method_by_name(name).unwrap().as_ref())
            .unwrap();
        let diagonal: Vec<_> = (0..s.len()).map(|i| (i, i)).collect();
        assert_eq!(a.links(), diagonal.as_slice(), "{name}");
    }
    // Truncation: with 5 tokens ([CLS] + 3 words + [SEP]) words 3.. have no vector and no link.
    let short = WordAligner::new(bert.encoder(), tok.with_max_len(5).unwrap()).with_layer(-1);
    let v = short.embed_words(&[s.to_vec()]).unwrap();
    assert_eq!(
        v[0].iter().map(Option::is_some).collect::<Vec<_>>(),
        [[true; 3].as_slice(), &[false; 6]].concat()
    );
    let a = short.align_words(&s, &s[..4], &ArgMax).unwrap();
    assert_eq!(a.links(), &[(0, 0), (1, 1), (2, 2)]);

    // The tiny model has 64 positions: a longer sentence is truncated to them (default max_len
    // 128 is lowered), not rejected; the words past position 62 get no link.
    let long: Vec<&str> = std::iter::repeat_n(["the", "cat", "sat"], 30)
        .flatten()
        .collect();
    let default =
        WordAligner::new(bert.encoder(), bert.tokenizer().unwrap().clone()).with_layer(-1);
    let v = default.embed_words(std::slice::from_ref(&long)).unwrap();
    assert_eq!(v[0].iter().filter(|w| w.is_some()).count(), 62);
    let a = default.align_words(&long, &long[..5], &ArgMax).unwrap();
    assert!(a.links().iter().all(|&(i, _)| i < 62) && !a.is_empty());
}

#[test]
fn empty_sides_missing_layers_and_raw_text() {
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let aligner = WordAligner::new(bert.encoder(), tok.clone()).with_layer(2);
    let pairs = vec![
        SentencePair::from_text("", "the cat"),
        SentencePair::default(),
        SentencePair::from_text("the cat", "a dog"),
        SentencePair::from_text("a dog", ""),
    ];
    let a = aligner.align_pairs(&pairs, &ArgMax).unwrap();
    assert_eq!(
        a.iter().map(|a| a.is_empty()).collect::<Vec<_>>(),
        [true, true, false, true]
    );
    assert!(aligner
        .align_pairs(&pairs[..2], &ArgMax)
        .unwrap()
        .iter()
        .all(|a| a.is_empty()));

    // The tiny model has hidden states 0..=2: SimAlign's layer 8 does not exist.
    let deep = WordAligner::new(bert.encoder(), tok.clone());
    assert_eq!(deep.layers(), &[8]);
    let err = deep.align_pairs(&pairs, &ArgMax).unwrap_err();
    assert!(matches!(err, mlctl::Error::InvalidArgument(_)), "{err:?}");
    assert!(format!("{err}").contains("layer 8"), "{err}");

    // Raw text is split into the tokenizer's words first.
    let words = split_words(&tok, "The cat's mat, today!").unwrap();
    let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    assert_eq!(texts, ["The", "cat", "'", "s", "mat", ",", "today", "!"]);
    assert_eq!(words[1].bytes, (4, 7));
    let (s, t, a) = aligner
        .align_texts("The cat sat.", "the cat sat .", &ArgMax)
        .unwrap();
    assert_eq!((s.len(), t.len()), (4, 4));
    assert!(a.links().iter().all(|&(i, j)| i < 4 && j < 4) && !a.is_empty());
}

/// Cosine of two vectors in f64, the plain definition (0 when either is zero).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    }
}

#[test]
fn subword_links_become_word_links() {
    // Reference: each sentence through the encoder alone, its non-special tokens' vectors at
    // layer 2, similarities by the f64 definition, each method on that subword matrix, and a
    // word pair linked when any of its subword pairs is.
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let pairs = vec![
        SentencePair::from_text("the playing dogs ran !", "a dog was playing"),
        SentencePair::from_text("unknownword cats sat", "the cats sat down quickly"),
    ];
    let aligner = WordAligner::new(bert.encoder(), tok.clone()).with_layer(2);
    assert_eq!(aligner.token_type(), TokenType::Bpe, "SimAlign's default");
    let subwords = |words: &[String]| -> (Vec<Vec<f32>>, Vec<usize>) {
        let batch = tok
            .encode_pretokenized_batch(std::slice::from_ref(&words.to_vec()), &Device::Cpu)
            .unwrap();
        let out = bert
            .model
            .encoder
            .forward(
                &batch.input_ids,
                Some(&batch.token_type_ids),
                Some(&batch.attention_mask),
            )
            .unwrap();
        let h: Vec<Vec<f32>> = out.hidden_states[2].squeeze(0).unwrap().to_vec2().unwrap();
        batch.word_ids[0]
            .iter()
            .enumerate()
            .filter_map(|(p, w)| Some((h[p].clone(), (*w)? as usize)))
            .unzip()
    };
    let mut split_words = 0;
    for name in ["argmax", "itermax", "match", "softmax"] {
        let method = method_by_name(name).unwrap();
        let got = aligner.align_pairs(&pairs, method.as_ref()).unwrap();
        for (pair, got) in pairs.iter().zip(&got) {
            let (sv, sw) = subwords(&pair.src);
            let (tv, tw) = subwords(&pair.tgt);
            split_words += sw.len() - pair.src.len();
            let kind = method.similarity();
            let values: Vec<f32> = sv
                .iter()
                .flat_map(|a| {
                    tv.iter().map(move |b| match kind {
                        Similarity::Dot => a.iter().zip(b).map(|(&x, &y)| x * y).sum::<f32>(),
                        _ => ((cosine(a, b) + 1.0) / 2.0) as f32,
                    })
                })
                .collect();
            let sim = SimMatrix::new(sv.len(), tv.len(), values).unwrap();
            let expected: Alignment = method
                .align(&sim)
                .links()
                .iter()
                .map(|&(i, j)| (sw[i], tw[j]))
                .collect();
            assert_eq!(got, &expected, "{name}");
        }
    }
    assert!(split_words > 0, "some word has several subwords");
}

#[test]
fn one_pass_serves_several_methods_in_any_batching() {
    let bert = tiny();
    let tok = bert.tokenizer().unwrap().clone();
    let pairs: Vec<SentencePair> =
        read_parallel(common::fixture("align/roen.src-tgt")).unwrap()[..9].to_vec();
    let methods: Vec<Box<dyn mlctl::align::AlignMethod>> = METHOD_NAMES
        .iter()
        .map(|n| method_by_name(n).unwrap())
        .collect();
    let methods: Vec<&dyn mlctl::align::AlignMethod> = methods.iter().map(AsRef::as_ref).collect();
    for token_type in [TokenType::Bpe, TokenType::Word] {
        let base = WordAligner::new(bert.encoder(), tok.clone())
            .with_layer(2)
            .with_token_type(token_type);
        let all = base.align_pairs_multi(&pairs, &methods).unwrap();
        assert_eq!(all.len(), methods.len());
        for (method, got) in methods.iter().zip(&all) {
            assert_eq!(got, &base.align_pairs(&pairs, *method).unwrap());
            // Pair by pair: the output order is the input order whatever the length sorting.
            for (k, pair) in pairs.iter().enumerate() {
                let one = base
                    .align_pairs(std::slice::from_ref(pair), *method)
                    .unwrap();
                assert_eq!(one[0], got[k], "{token_type:?} {} pair {k}", method.name());
            }
        }
        for batch in [1, 3] {
            let small = WordAligner::new(bert.encoder(), tok.clone())
                .with_layer(2)
                .with_token_type(token_type)
                .with_batch_size(batch);
            assert_eq!(small.align_pairs_multi(&pairs, &methods).unwrap(), all);
        }
    }
    // Word units are the words' mean vectors: aligning them is aligning embed_words' vectors.
    let word = WordAligner::new(bert.encoder(), tok)
        .with_layer(2)
        .with_token_type(TokenType::Word);
    let got = word.align_pairs(&pairs[..2], &ArgMax).unwrap();
    for (pair, got) in pairs.iter().zip(&got) {
        let v = word
            .embed_words(&[pair.src.clone(), pair.tgt.clone()])
            .unwrap();
        assert_eq!(got, &word.align_vectors(&v[0], &v[1], &ArgMax).unwrap());
    }
}
