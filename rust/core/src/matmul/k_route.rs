//! Which path the K-quants (q2_k..q6_k, iq4_xs) take by M and K where AMX runs: one measured
//! table. Below `tiles` activation rows the AVX-512 VNNI GEMM (`gemm_k.rs`); from `tiles` the
//! AMX int8 K-quant tiles (`gemm_amx_k.rs`, bit-exact with the reference); from `bf16` the ggml
//! bf16 route on AMX bf16 tiles (`ggml_bf16.rs`, within its float64 bound). The tiles' time
//! grows with M (their float part and tile work per block of 16 rows, 2x from 64 to 128 rows)
//! where the route's grows slower (1.3x), so the route takes over at large M. Chunked in K
//! (`gemm_amx_k::KC_SB`), the tiles keep their planes in L2 at K = 14336 too, so the
//! crossovers barely move with K (unchunked they lost 1.5-1.7x there and stopped at K = 4096).
//!
//! Measured (session 17, `/work/notes/s17/results-kq64.md`): `python benches/bench_matmul.py
//! --m 48,64,128,256 --qtypes q4_k,q5_k,q6_k,q3_k,q2_k,iq4_xs,q5_1 --runs 3 --threads 1
//! --cpu-time --budget 0.3 --ggml-int8`, 2026-12-07 13:32-13:35 UTC, load 25, ms (medians),
//! route / int8 paths (int8: the tiles from their start, the VNNI GEMM below), K x N = 4096 x
//! 14336 and 14336 x 4096 (torch bf16 in the same run at M = 64: 14.3 / 15.3 ms):
//!
//! | format | K | M = 48 | 64 | 128 | 256 |
//! |---|---|---|---|---|---|
//! | q6_k | 4096 | 19.9 / 13.2 | 20.4 / 15.4 | 27.0 / 26.8 | 40.3 / 52.1 |
//! | q6_k | 14336 | 18.0 / 12.1 | 19.0 / 14.8 | 26.3 / 26.7 | 38.5 / 52.8 |
//! | q2_k | 4096 | (12.4) / 12.5 | 19.8 / 14.8 | 25.2 / 26.8 | 38.1 / 51.9 |
//! | q2_k | 14336 | (11.8) / 11.7 | 19.9 / 13.6 | 26.3 / 25.9 | 39.1 / 54.0 |
//! | iq4_xs | 4096 | 14.5 / 12.1 | 15.2 / 14.4 | 20.9 / 26.3 | 34.0 / 50.7 |
//! | iq4_xs | 14336 | 13.8 / 11.7 | 14.8 / 13.5 | 21.1 / 25.4 | 34.5 / 52.3 |
//! | q3_k | 4096 | (14.0) / 14.0 | (14.5) / 15.0 | 23.9 / 26.0 | 37.1 / 50.7 |
//! | q3_k | 14336 | (13.7) / 13.6 | (14.0) / 13.7 | 25.6 / 24.8 | 38.0 / 52.1 |
//! | q4_k | 4096 | 15.7 / 18.6 | 17.5 / 20.7 | 23.4 / 37.2 | 38.8 / 73.5 |
//! | q4_k | 14336 | 14.9 / 14.5 | 15.9 / 17.4 | 22.2 / 32.3 | 36.2 / 66.7 |
//! | q5_k | 4096 | 18.5 / 19.6 | 19.4 / 21.7 | 26.2 / 39.9 | 39.4 / 78.8 |
//! | q5_k | 14336 | 17.1 / 15.4 | 18.1 / 18.5 | 24.7 / 34.0 | 38.0 / 67.6 |
//!
//! (parenthesised: the default there was the int8 path already; main's build in the same
//! window agreed in direction: q5_k 14336 x 4096 at M = 48 VNNI 16.1 against the route's 19.3,
//! q4_k 17.0 against 17.9.) So: the tiles up to the crossover, 80 (iq4_xs, q3_k at K = 4096)
//! to 128 rows (q6_k, q2_k; q3_k at K = 14336, where its tiles still led at 128); at long K
//! the VNNI GEMM keeps q4_k / q5_k below 64 rows.
//!
//! Session 18 (`/work/notes/s18/results-dk.md`): the K-quants' decode (`x86/decode16_ggml/
//! kquants.rs`) and the near prefetch made the route 15-25 % cheaper at M = 64, so the
//! crossovers moved down. `FERROQUANT_GGML_BF16=32 python benches/bench_matmul.py --m 48,64,96
//! --qtypes q2_k,q3_k,q6_k,iq4_xs --runs 3 --threads 1 --cpu-time --budget 0.3 --rotate-mb 200
//! --ggml-int8 --no-torch`, 2026-12-07 17:26-17:29 UTC, load 15-16, ms, route / int8 paths:
//!
//! | format | K | M = 48 | 64 | 96 |
//! |---|---|---|---|---|
//! | q6_k | 4096 | 12.5 / 12.7 | 15.7 / 15.2 | 15.8 / 21.0 |
//! | q6_k | 14336 | 13.5 / 12.1 | 15.6 / 14.4 | 16.8 / 20.5 |
//! | q2_k | 4096 | 9.4 / 12.4 | 11.8 / 14.6 | 12.5 / 19.4 |
//! | q2_k | 14336 | 9.6 / 11.5 | 12.5 / 13.5 | 13.2 / 19.3 |
//! | iq4_xs | 4096 | 10.6 / 12.3 | 13.4 / 14.5 | 14.1 / 19.3 |
//! | iq4_xs | 14336 | 11.2 / 11.4 | 13.2 / 13.6 | 14.6 / 19.5 |
//! | q3_k | 4096 | 10.2 / 14.0 | 12.8 / 15.1 | 13.7 / 19.5 |
//! | q3_k | 14336 | 11.8 / 13.2 | 14.6 / 13.7 | 15.6 / 19.7 |
//!
//! (q5_k at M = 64 in the same window: route 15.9 / 16.3, int8 18.3 / 18.8.) So: q2_k and
//! iq4_xs from 48 rows, q3_k from 48 at short K and 80 at long K (its tiles led at 64 there),
//! q6_k from 80 (its tiles lead at 64 at both K); M = 80 itself is not measured.
//!
//! Session 19 (`/work/notes/s19/results-mid.md`): the K-quants' scales computed a block ahead
//! in the decode (q4_k / q5_k / q6_k: 7-9 % off the route at M = 64) and the prefetch's last
//! line of a block (`gemm16::prefetch`). `FERROQUANT_GGML_BF16=32 python benches/bench_matmul.py
//! --m 48,64 --qtypes q6_k,q5_k,q4_k,q3_k --runs 3 --threads 1 --cpu-time --budget 0.3
//! --rotate-mb 200 --ggml-int8 --no-torch`, 2026-12-07 19:54-19:57 UTC, load 17-19, ms, route /
//! int8 paths (the tiles from their start, the VNNI GEMM below):
//!
//! | format | K | M = 48 | 64 |
//! |---|---|---|---|
//! | q6_k | 4096 | 13.4 / 13.8 | 14.5 / 16.4 |
//! | q6_k | 14336 | 14.1 / 13.7 | 15.6 / 15.7 |
//! | q5_k | 4096 | 13.7 / 19.7 | 15.5 / 20.7 |
//! | q5_k | 14336 | 14.4 / 17.4 | 15.3 / 20.2 |
//! | q4_k | 4096 | 12.2 / 19.0 | 13.7 / 19.9 |
//! | q4_k | 14336 | 12.2 / 16.1 | 13.2 / 18.5 |
//! | q3_k | 4096 | 12.1 / 16.9 | 13.1 / 16.7 |
//! | q3_k | 14336 | 11.6 / 15.4 | 12.8 / 14.9 |
//!
//! So: every K-quant takes the route from 48 rows at both K but q6_k, from 64 (at 48 the two
//! are within the runs' noise; at 64 the route leads by 12 % at K = 4096 and ties at 14336).

use crate::qtype::QType;

/// K up to this is "short": the table's first column.
pub(super) const SHORT_K: usize = 4096;

/// One K-quant's paths at one K: the AMX int8 tiles from `tiles` rows (None: never), the bf16
/// route from `bf16` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KRoute {
    pub tiles: Option<usize>,
    pub bf16: usize,
}

/// The table (module docs): `qtype`'s paths at K = `k`, or None for a format not in it.
pub(super) fn k_route(qtype: QType, k: usize) -> Option<KRoute> {
    let short = k <= SHORT_K;
    let (tiles, bf16) = match (qtype, short) {
        (QType::Q6K, _) => (Some(32), 64),
        (QType::Q2K | QType::IQ4XS, _) => (Some(32), 48),
        (QType::Q3K, true) => (Some(64), 48),
        (QType::Q3K, false) => (Some(64), 48),
        (QType::Q4K | QType::Q5K, true) => (Some(64), 48),
        (QType::Q4K | QType::Q5K, false) => (Some(64), 48),
        _ => return None,
    };
    Some(KRoute { tiles, bf16 })
}
