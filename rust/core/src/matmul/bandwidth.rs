//! The machine's memory read bandwidth as the matmul benchmarks measure it: a streaming read
//! (each thread of the pool sums one contiguous part of a buffer; no stores, nothing but the
//! loads on the critical path). The benchmarks take the best over a few `Probe`s, so that the
//! figure is what the memory system sustains for a reader, not what one loop reaches: the plain
//! 8-byte loop of sessions up to 13 (`Probe::SCALAR`) read 26 GB/s on two cores of the Intel
//! Xeon of session 13, below what our M = 1 kernels stream (up to 121 % of it). With AVX-512,
//! each thread reads `streams` sub-parts of its part in lock step (several independent
//! streams for the hardware prefetchers to follow) with four 64-byte loads a stream and
//! step, and optionally software-prefetches `ahead` bytes in front of each stream
//! (`docs/cpu-gemm.md`, "How the read bandwidth is measured").

use rayon::prelude::*;

use crate::parallel;

/// How a thread reads its part: `streams` (1, 2, 4 or 8) sub-parts in lock step, each
/// prefetched `ahead` bytes in front of its loads (0: no software prefetch). `vector`: the
/// 512-bit loop where the CPU has AVX-512 F, else (or if false) the 8-byte loop (which ignores
/// `streams` and `ahead`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub vector: bool,
    pub streams: usize,
    pub ahead: usize,
}

impl Probe {
    /// The 8-byte loop the benchmarks used up to session 13.
    pub const SCALAR: Probe = Probe {
        vector: false,
        streams: 1,
        ahead: 0,
    };
    /// The default of `stream_read`: the fastest probe measured on the session-14 Intel Xeon
    /// (`benches/bench_matmul.py` still takes the best of several).
    pub const DEFAULT: Probe = Probe {
        vector: true,
        streams: 2,
        ahead: 0,
    };
}

/// Wrapping sum of the aligned 8-byte words of `data` (unaligned head and tail bytes ignored),
/// read by every thread of the pool over its own contiguous part (on the calling thread when
/// the pool has one thread, so that its CPU time counts the reads). The value is only there
/// so the reads cannot be optimised away; time the call for the bandwidth.
pub fn stream_read(data: &[u8]) -> u64 {
    stream_read_with(data, Probe::DEFAULT)
}

/// `stream_read` with the reading loop `probe` (the same sum for every probe).
///
/// # Panics
/// If `probe.streams` is not 1, 2, 4 or 8.
pub fn stream_read_with(data: &[u8], probe: Probe) -> u64 {
    assert!(
        matches!(probe.streams, 1 | 2 | 4 | 8),
        "streams must be 1, 2, 4 or 8, not {}",
        probe.streams
    );
    let (_, words, _) = bytemuck::pod_align_to::<u8, u64>(data);
    let parts = parallel::num_threads().max(1);
    if parts == 1 {
        return read_part(words, probe);
    }
    let per = words.len().div_ceil(parts).max(8);
    parallel::install(|| {
        words
            .par_chunks(per)
            .map(|w| read_part(w, probe))
            .reduce(|| 0, u64::wrapping_add)
    })
}

fn read_part(w: &[u64], probe: Probe) -> u64 {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = probe; // (the vector probes are x86-64 only)
    #[cfg(target_arch = "x86_64")]
    if probe.vector && crate::cpu::has_avx512() {
        // SAFETY: AVX-512 F checked just above.
        return unsafe {
            match probe.streams {
                1 => x86::read::<1>(w, probe.ahead),
                2 => x86::read::<2>(w, probe.ahead),
                4 => x86::read::<4>(w, probe.ahead),
                _ => x86::read::<8>(w, probe.ahead),
            }
        };
    }
    sum_words(w)
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Words a stream advances per step: four 64-byte loads.
    const STEP: usize = 32;

    /// Wrapping sum of `w`: `S` equal sub-parts read in lock step, 256 bytes of each per
    /// step, each prefetched `ahead` bytes in front (0: none); the words past the last whole
    /// step of every stream summed by `sum_words`.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read<const S: usize>(w: &[u64], ahead: usize) -> u64 {
        let per = w.len() / S / STEP * STEP;
        let base = w.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut i = 0;
        while i < per {
            for s in 0..S {
                // SAFETY: s * per + i + STEP <= S * per <= w.len(): the 256 bytes are in `w`.
                let p = unsafe { base.add(s * per + i) };
                if ahead > 0 {
                    // a prefetch never faults, so the address may pass the end of `w`
                    let f = p.cast::<i8>().wrapping_add(ahead);
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(f.wrapping_add(64 * l));
                    }
                }
                for (l, a) in acc.iter_mut().enumerate() {
                    // SAFETY: p + 8 l .. p + 8 l + 8 lies in `w` (above); unaligned load.
                    let v = unsafe { _mm512_loadu_si512(p.add(8 * l).cast()) };
                    *a = _mm512_add_epi64(*a, v);
                }
            }
            i += STEP;
        }
        let v = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        let mut rest = 0u64;
        for s in 0..S {
            let end = if s + 1 == S { w.len() } else { (s + 1) * per };
            rest = rest.wrapping_add(super::sum_words(&w[s * per + per..end]));
        }
        (_mm512_reduce_add_epi64(v) as u64).wrapping_add(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::{stream_read, stream_read_with, Probe};

    #[test]
    fn stream_read_sums_every_word() {
        let words: Vec<u64> = (1..=1000).collect();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        assert_eq!(stream_read(bytes), 500 * 1001);
        assert_eq!(stream_read(&bytes[..13]), 1);
        assert_eq!(stream_read(&[]), 0);
    }

    /// Every probe sums every word exactly once, at lengths around the steps of every stream
    /// count, with words that wrap.
    #[test]
    fn every_probe_reads_every_word_once() {
        let words: Vec<u64> = (0..2100u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 3))
            .collect();
        for len in [
            0, 1, 7, 31, 32, 33, 63, 64, 65, 255, 256, 257, 511, 1000, 2100,
        ] {
            let want = words[..len].iter().fold(0u64, |a, &v| a.wrapping_add(v));
            let bytes: &[u8] = bytemuck::cast_slice(&words[..len]);
            for vector in [false, true] {
                for streams in [1, 2, 4, 8] {
                    for ahead in [0, 256, 4096] {
                        let p = Probe {
                            vector,
                            streams,
                            ahead,
                        };
                        assert_eq!(stream_read_with(bytes, p), want, "{p:?} len {len}");
                        assert_eq!(super::read_part(&words[..len], p), want, "{p:?}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "streams must be 1, 2, 4 or 8")]
    fn odd_stream_count_panics() {
        stream_read_with(
            &[0; 64],
            Probe {
                vector: true,
                streams: 3,
                ahead: 0,
            },
        );
    }
}
