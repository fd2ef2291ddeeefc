use super::*;
use crate::formats::legacy::dequantize_row_q8_0;

/// xorshift32: reproducible values without a dependency.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn f32(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

/// Random q8_0 blocks: quants over the whole i8 range (-128 included), scales of either sign.
fn weights(rows: usize, k: usize, rng: &mut Rng) -> Vec<BlockQ8_0> {
    (0..rows * k / 32)
        .map(|_| BlockQ8_0 {
            d: f16_from_f32(rng.f32() * 0.05),
            qs: std::array::from_fn(|_| rng.next() as i8),
        })
        .collect()
}

/// Activations with a few large values and an all-zero block (d = 0).
fn acts(m: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    let mut x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 3.0).collect();
    x[k / 2] = 40.0;
    if k >= 64 {
        x[32..64].fill(0.0);
    }
    x
}

/// `reference::dot_block32` of every weight row with every activation row (M x N).
fn want(w: &[BlockQ8_0], n: usize, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let nb = k / 32;
    let mut xq = vec![BlockQ8_0::zeroed(); m * nb];
    for (b, xr) in xq.chunks_mut(nb).zip(x.chunks(k)) {
        reference::quantize_row_q8_0(xr, b);
    }
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        let xb = &xq[r * nb..(r + 1) * nb];
        let xd: Vec<f32> = xb.iter().map(|b| f16_to_f32(b.d)).collect();
        for c in 0..n {
            y[r * n + c] = reference::dot_block32(&w[c * nb..(c + 1) * nb], xb, &xd);
        }
    }
    y
}

fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    if Kernel::best() != Kernel::Portable {
        k.push(Kernel::best());
    }
    k
}

#[test]
fn packed_products_are_the_reference_bit_for_bit() {
    let mut rng = Rng(0x1234_5677);
    // Rows not a multiple of 8; K of 1 block, fewer than 8, 18 (SmolLM2's 576), a multiple of
    // 8 blocks, a long row; M over every kernel group (4, 2, 1) and their mixes.
    for &(n, k) in &[
        (8, 32),
        (13, 96),
        (24, 576),
        (17, 256),
        (9, 1536),
        (5, 4128),
    ] {
        let w = weights(n, k, &mut rng);
        let packed = Packed::from_q8_0(&w, n, k);
        for m in [1usize, 2, 3, 4, 5, 7, 9] {
            let x = acts(m, k, &mut rng);
            let expect = want(&w, n, &x, m, k);
            let mut a = ActsQ8::default();
            a.quantize(&x, m, k).unwrap();
            for kern in kernels() {
                let mut y = vec![f32::NAN; m * n];
                matmul_with(kern, &packed, &a, &mut y).unwrap();
                for (i, (g, e)) in y.iter().zip(&expect).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{kern:?} n={n} k={k} m={m} at row {} col {}: {g} vs {e}",
                        i / n,
                        i % n
                    );
                }
            }
        }
    }
}

#[test]
fn packed_products_do_not_depend_on_the_thread_count() {
    let mut rng = Rng(99);
    let (n, k) = (200, 576);
    let w = weights(n, k, &mut rng);
    let packed = Packed::from_q8_0(&w, n, k);
    for m in [1usize, 6] {
        let x = acts(m, k, &mut rng);
        let mut a = ActsQ8::default();
        a.quantize(&x, m, k).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y = vec![0f32; m * n];
            pool.install(|| matmul(&packed, &a, &mut y)).unwrap();
            y
        };
        assert_eq!(run(1), run(3), "m={m}");
        assert_eq!(run(1), want(&w, n, &x, m, k), "m={m}");
    }
}

#[test]
fn packed_rows_dequantize_as_q8_0() {
    let mut rng = Rng(7);
    let (n, k) = (11, 96);
    let w = weights(n, k, &mut rng);
    let packed = Packed::from_q8_0(&w, n, k);
    for r in 0..n {
        let mut want = vec![0f32; k];
        dequantize_row_q8_0(bytemuck::cast_slice(&w[r * 3..(r + 1) * 3]), &mut want);
        let mut got = vec![0f32; k];
        packed.row_f32(r, &mut got);
        assert_eq!(got, want, "row {r}");
    }
}

#[test]
fn packed_matmul_rejects_bad_input() {
    let mut rng = Rng(3);
    let packed = Packed::from_q8_0(&weights(8, 64, &mut rng), 8, 64);
    let mut a = ActsQ8::default();
    let mut x = acts(1, 64, &mut rng);
    x[5] = f32::NAN;
    assert!(matches!(
        a.quantize(&x, 1, 64),
        Err(Error::NonFinite { row: 0, col: 5, .. })
    ));
    assert!(a.quantize(&[0.0; 48], 1, 48).is_err());
    a.quantize(&[1.0; 96], 1, 96).unwrap();
    let mut y = vec![0f32; 8];
    assert!(matmul(&packed, &a, &mut y).is_err(), "K mismatch");
    a.quantize(&[1.0; 64], 1, 64).unwrap();
    assert!(matmul(&packed, &a, &mut y[..7]).is_err(), "short output");
    matmul(&packed, &a, &mut y).unwrap();
}
