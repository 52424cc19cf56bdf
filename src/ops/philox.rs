//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
//! SC 2011): a counter-based generator, so any entry of a stream is computed on its own.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: four independent 32-bit random words for a 128-bit `counter` under
/// a 64-bit `key`. Matches the Random123 reference implementation (its known-answer vectors are
/// in the tests).
#[inline(always)]
pub(crate) fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// [`philox4x32_10`] of `N` counters that differ only in their first word, lane by lane: the
/// rounds run over arrays, a loop the compiler vectorises. Returns the four words of every lane
/// (`words[i][lane]`).
#[inline(always)]
pub(crate) fn philox4x32_10_lanes<const N: usize>(
    first: [u32; N],
    rest: [u32; 3],
    key: [u32; 2],
) -> [[u32; N]; 4] {
    let mut c = [first, [rest[0]; N], [rest[1]; N], [rest[2]; N]];
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        // Indexed lanes: four arrays updated together, the loop that vectorises.
        #[allow(clippy::needless_range_loop)]
        for i in 0..N {
            let (hi0, lo0) = mulhilo(M0, c[0][i]);
            let (hi1, lo1) = mulhilo(M1, c[2][i]);
            (c[0][i], c[1][i], c[2][i], c[3][i]) =
                (hi1 ^ c[1][i] ^ k0, lo1, hi0 ^ c[3][i] ^ k1, lo0);
        }
    }
    c
}

/// The four words of entry `index` of stream `stream` for global sample `sample`, under `seed`
/// and `step`: Philox's counter is `[index, stream, sample, step]` by their low 32 bits and its
/// key `seed` with the high 32 bits of `sample` and `step` folded in, the layout dropout's masks
/// use ([`super::dropout`], there with a quad index and a layer's site). Any word of any sample
/// is computed on its own, so whoever computes it (one process, or the rank holding that sample)
/// gets the same bits.
#[inline]
pub(crate) fn sample_words(seed: u64, step: u64, sample: u64, stream: u32, index: u32) -> [u32; 4] {
    let counter = [index, stream, sample as u32, step as u32];
    philox4x32_10(counter, sample_key(seed, step, sample))
}

/// Philox's key for global sample `sample` at `step` of a run seeded by `seed`: the seed with
/// the high 32 bits of `sample` and `step` folded in (their low bits go into the counter).
#[inline]
pub(crate) fn sample_key(seed: u64, step: u64, sample: u64) -> [u32; 2] {
    [
        seed as u32 ^ (sample >> 32) as u32,
        (seed >> 32) as u32 ^ (step >> 32) as u32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        let cases = [
            (
                [0u32; 4],
                [0u32; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, expected) in cases {
            assert_eq!(philox4x32_10(counter, key), expected);
        }
    }

    #[test]
    fn lanes_equal_one_call_per_counter() {
        let (rest, key) = ([7, 0xdead_beef, 3], [0x1234_5678, 0x9abc_def0]);
        let first: [u32; 16] = std::array::from_fn(|i| (u32::MAX - 5).wrapping_add(i as u32));
        let lanes = philox4x32_10_lanes(first, rest, key);
        for (lane, &c0) in first.iter().enumerate() {
            let one = philox4x32_10([c0, rest[0], rest[1], rest[2]], key);
            for (i, word) in one.iter().enumerate() {
                assert_eq!(lanes[i][lane], *word);
            }
        }
    }
}
