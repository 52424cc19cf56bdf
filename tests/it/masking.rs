//! MLM masks keyed by (seed, step, global sample index, side, position): the same for a sample
//! whichever rank draws them over whichever shard, and BERT's recipe in distribution.

use crate::common;

use std::collections::BTreeMap;

use candle_core::Device;
use common::fixture;
use mlctl::data::{MaskKey, MaskedTokens, MlmMasking};
use mlctl::tokenize::{TokenBatch, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture("tiny_bert/tokenizer.json"))
        .unwrap()
        .with_max_len(32)
        .unwrap()
}

/// `n` sentences of 1 to 24 words, so that rows need different amounts of padding.
fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            common::WORDS
                .iter()
                .cycle()
                .skip((7 * i) % 40)
                .take(1 + (i * 5) % 24)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Per sample (by global index): the corrupted ids of its real tokens and the selected
/// positions within the sample with their targets.
type PerSample = BTreeMap<u64, (Vec<u32>, Vec<(usize, u32)>)>;

/// Reads a masked batch back per sample, row `r` being global sample `offset + r`.
fn per_sample(batch: &TokenBatch, masked: &MaskedTokens, offset: u64) -> PerSample {
    let ids = masked.input_ids.to_vec2::<u32>().unwrap();
    let seq_len = ids[0].len();
    let mut out: PerSample = ids
        .iter()
        .zip(&batch.lengths)
        .enumerate()
        .map(|(r, (row, &len))| (offset + r as u64, (row[..len].to_vec(), Vec::new())))
        .collect();
    let positions = masked.positions.to_vec1::<u32>().unwrap();
    let targets = masked.targets.to_vec1::<u32>().unwrap();
    for (&p, &t) in positions.iter().zip(&targets) {
        let (row, col) = (p as usize / seq_len, p as usize % seq_len);
        out.get_mut(&(offset + row as u64))
            .unwrap()
            .1
            .push((col, t));
    }
    out
}

/// One process masks a batch of 7 samples; ranks of W = 2 and 3 (7 is divisible by neither)
/// each mask only their rows, tokenized and padded on their own (to their own longest, not the
/// whole batch's), with the offset of their first row. Every sample gets the same corrupted
/// ids, selected positions and targets, on both sides.
#[test]
fn masks_of_a_sample_are_the_same_whichever_rank_draws_them() {
    const B: usize = 7;
    let tok = tokenizer();
    let texts = sentences(B);
    let masking = MlmMasking::for_tokenizer(&tok)
        .unwrap()
        .with_prob(0.4)
        .unwrap();
    let whole = tok.encode_batch(&texts, &Device::Cpu).unwrap();
    let key = MaskKey::new(11, 5);
    for side in [0, 1] {
        let key = key.with_side(side);
        let one = masking.mask(&whole, key, &Device::Cpu).unwrap();
        assert!(one.len() > 10, "only {} tokens selected", one.len());
        let expected = per_sample(&whole, &one, 0);
        for world in [2, 3] {
            let mut got = PerSample::new();
            for rank in 0..world {
                let rows = rank * B / world..(rank + 1) * B / world;
                let shard = tok
                    .encode_batch(&texts[rows.clone()], &Device::Cpu)
                    .unwrap();
                let offset = rows.start as u64;
                let masked = masking
                    .mask(&shard, key.with_sample_offset(offset), &Device::Cpu)
                    .unwrap();
                got.extend(per_sample(&shard, &masked, offset));
            }
            assert_eq!(got, expected, "side {side}, W = {world}");
        }
    }
    // The key matters: another side, step or seed draws other masks.
    let positions = |key: MaskKey| -> Vec<u32> {
        let m = masking.mask(&whole, key, &Device::Cpu).unwrap();
        m.positions.to_vec1().unwrap()
    };
    let base = positions(key);
    for other in [
        key.with_side(1),
        MaskKey::new(11, 6),
        MaskKey::new(12, 5),
        key.with_sample_offset(1),
    ] {
        assert_ne!(
            positions(other),
            base,
            "{other:?} draws the masks of {key:?}"
        );
    }
}

/// `|count - n·p| <= 5·sqrt(n·p·(1 - p))`: a binomial count within five standard deviations of
/// its mean (a false alarm once in about 1.7 million runs).
fn assert_binomial(count: usize, n: usize, p: f64, what: &str) {
    let (n_f, c) = (n as f64, count as f64);
    let sigma = (n_f * p * (1.0 - p)).sqrt();
    assert!(
        (c - n_f * p).abs() <= 5.0 * sigma,
        "{what}: {count} of {n}, expected {:.1} ± 5·{sigma:.1}",
        n_f * p
    );
}

/// Over a large batch: each eligible token is selected with probability 0.15, and a selected
/// token becomes `[MASK]` with probability 0.8, a uniform vocabulary id with probability 0.1 and
/// stays itself otherwise. A random id is `[MASK]` or the token itself with probability 1/V
/// each, so the observed shares are `0.8 + 0.1/V`, `0.1 + 0.1/V` and `0.1·(1 - 2/V)`. Padding and
/// special tokens are never selected, and every replacement is in the vocabulary.
#[test]
fn mask_statistics_follow_bert_s_recipe_within_binomial_bounds() {
    let tok = tokenizer();
    let batch = tok.encode_batch(&sentences(3000), &Device::Cpu).unwrap();
    let masking = MlmMasking::for_tokenizer(&tok).unwrap();
    let masked = masking
        .mask(&batch, MaskKey::new(3, 1), &Device::Cpu)
        .unwrap();
    let mask_id = tok.mask_token().unwrap().id;
    let specials = &tok.special_tokens().ids;
    let original: Vec<u32> = batch.input_ids.flatten_all().unwrap().to_vec1().unwrap();
    let attention: Vec<u32> = (batch.attention_mask.flatten_all().unwrap())
        .to_vec1()
        .unwrap();
    let corrupted: Vec<u32> = masked.input_ids.flatten_all().unwrap().to_vec1().unwrap();
    let positions: Vec<u32> = masked.positions.to_vec1().unwrap();
    let targets: Vec<u32> = masked.targets.to_vec1().unwrap();
    let eligible = (original.iter().zip(&attention))
        .filter(|(id, &m)| m == 1 && !specials.contains(id))
        .count();
    assert!(eligible > 30_000, "{eligible} eligible tokens");
    assert_binomial(positions.len(), eligible, 0.15, "selected tokens");

    let v = tok.vocab_size() as f64;
    let (mut to_mask, mut kept, mut random) = (0, 0, 0);
    for (&p, &t) in positions.iter().zip(&targets) {
        let p = p as usize;
        assert_eq!(original[p], t, "target at {p}");
        assert_eq!(attention[p], 1, "padding selected at {p}");
        assert!(!specials.contains(&t), "special token {t} selected at {p}");
        assert!(
            (corrupted[p] as usize) < tok.vocab_size(),
            "id {}",
            corrupted[p]
        );
        match corrupted[p] {
            id if id == mask_id => to_mask += 1,
            id if id == t => kept += 1,
            _ => random += 1,
        }
    }
    let n = positions.len();
    assert_binomial(to_mask, n, 0.8 + 0.1 / v, "[MASK] replacements");
    assert_binomial(kept, n, 0.1 + 0.1 / v, "kept tokens");
    assert_binomial(random, n, 0.1 * (1.0 - 2.0 / v), "random replacements");
    // Nothing outside the selected positions changes.
    let selected: std::collections::HashSet<usize> =
        positions.iter().map(|&p| p as usize).collect();
    for (i, (c, o)) in corrupted.iter().zip(&original).enumerate() {
        assert!(
            c == o || selected.contains(&i),
            "position {i} changed unselected"
        );
    }
}
