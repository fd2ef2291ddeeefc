//! The machine's memory read bandwidth as the matmul benchmarks measure it: a multi-threaded
//! streaming read (each thread of the pool sums one contiguous part of a buffer with independent
//! wrapping adds; no stores, nothing but the loads on the critical path).

use rayon::prelude::*;

use crate::parallel;

/// Wrapping sum of the aligned 8-byte words of `data` (unaligned head and tail bytes ignored),
/// read by every thread of the pool over its own contiguous part. The value is only there so the
/// reads cannot be optimised away; time the call for the bandwidth.
pub fn stream_read(data: &[u8]) -> u64 {
    let (_, words, _) = bytemuck::pod_align_to::<u8, u64>(data);
    let parts = parallel::num_threads().max(1);
    let per = words.len().div_ceil(parts).max(8);
    parallel::install(|| {
        words
            .par_chunks(per)
            .map(sum_words)
            .reduce(|| 0, u64::wrapping_add)
    })
}

fn sum_words(w: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &v| a.wrapping_add(v));
    acc.iter().fold(tail, |a, &v| a.wrapping_add(v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_read_sums_every_word() {
        let words: Vec<u64> = (1..=1000).collect();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        assert_eq!(super::stream_read(bytes), 500 * 1001);
        assert_eq!(super::stream_read(&bytes[..13]), 1);
        assert_eq!(super::stream_read(&[]), 0);
    }
}
