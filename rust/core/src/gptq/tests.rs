//! The loop's own invariants; the bit-exact comparison with the Python reference on every
//! format lives in tests/test_gptq_native.py.

use super::*;

fn batch_solve(
    w: &mut [f32],
    hinv: &[f32],
    rows: usize,
    rule: &Rule,
    p: &ColumnParams,
) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let mut err = vec![0.0; w.len()];
    let mut levels = vec![0; w.len()];
    let mut values = vec![0.0; w.len()];
    let n = w.len() / rows;
    let mut b = Batch {
        rows,
        w,
        hinv,
        err: &mut err,
        levels: &mut levels,
        values: &mut values,
        from_original: false,
    };
    solve_columns(&mut b, 0, n, rule, p, true).unwrap();
    (levels, values, err)
}

#[test]
fn identity_hessian_rounds_each_column_as_the_format() {
    // hinv = I: no feedback, so every weight is rounded on its own: int8 with scale 0.5
    let rows = 3;
    let mut w = vec![0.26, -0.74, 63.6, 1.0, 0.0, -100.0];
    let hinv = [1.0, 0.0, 0.0, 1.0];
    let scale = vec![0.5; 6];
    let p = ColumnParams {
        scale: &scale,
        ..Default::default()
    };
    let (lev, val, _) = batch_solve(&mut w, &hinv, rows, &Rule::Int8, &p);
    assert_eq!(lev, vec![129, 127, 255, 130, 128, 1]);
    assert_eq!(val, vec![0.5, -0.5, 63.5, 1.0, 0.0, -63.5]);
}

#[test]
fn error_feedback_follows_the_factor() {
    // two columns, one row: e0 = (w0 - q0) / h00 moves w1 by -h01 * e0 before it is rounded
    let mut w = vec![0.3, 0.0];
    let hinv = [2.0, 0.5, 0.0, 1.0];
    let scale = vec![1.0; 2];
    let p = ColumnParams {
        scale: &scale,
        ..Default::default()
    };
    let (lev, _, err) = batch_solve(&mut w, &hinv, 1, &Rule::Int8, &p);
    assert_eq!(err[0], 0.3f32 / 2.0);
    assert_eq!(w[1], 0.0 - 0.5 * (0.3f32 / 2.0));
    assert_eq!(lev, vec![128, 128]);
}

#[test]
fn zero_rule_rounds_half_to_even_and_clamps() {
    let rows = 4;
    let mut w = vec![0.5, 1.5, 100.0, -100.0];
    let hinv = [1.0];
    let ones = vec![1.0; 4];
    let zero = vec![8.0; 4];
    let p = ColumnParams {
        scale: &ones,
        rscale: &ones,
        zero: &zero,
        ..Default::default()
    };
    let (lev, val, _) = batch_solve(&mut w, &hinv, rows, &Rule::Zero { maxq: 15.0 }, &p);
    assert_eq!(lev, vec![8, 10, 15, 0]);
    assert_eq!(val, vec![0.0, 2.0, 7.0, -8.0]);
}

#[test]
fn nearest_takes_the_first_of_equal_distances() {
    let mut w = vec![0.5];
    let grid = vec![0.0, 1.0, 2.0];
    let p = ColumnParams {
        grid: &grid,
        levels: 3,
        ..Default::default()
    };
    let (lev, val, _) = batch_solve(&mut w, &[1.0], 1, &Rule::Nearest, &p);
    assert_eq!((lev[0], val[0]), (0, 0.0));
}

#[test]
fn bad_shapes_are_named_errors() {
    let mut w = vec![0.0; 6];
    let mut err = vec![0.0; 6];
    let mut levels = vec![0; 6];
    let mut values = vec![0.0; 6];
    let hinv = [1.0; 3]; // not 2 x 2
    let mut b = Batch {
        rows: 3,
        w: &mut w,
        hinv: &hinv,
        err: &mut err,
        levels: &mut levels,
        values: &mut values,
        from_original: false,
    };
    let scale = vec![1.0; 6];
    let p = ColumnParams {
        scale: &scale,
        ..Default::default()
    };
    assert!(solve_columns(&mut b, 0, 2, &Rule::Int8, &p, true).is_err());
    let hinv = [1.0; 4];
    b.hinv = &hinv;
    assert!(solve_columns(&mut b, 0, 3, &Rule::Int8, &p, true).is_err());
    let short = vec![1.0; 5];
    let p = ColumnParams {
        scale: &short,
        ..Default::default()
    };
    let e = solve_columns(&mut b, 0, 2, &Rule::Int8, &p, true).unwrap_err();
    assert!(e.to_string().contains("scale"));
}

/// A small deterministic generator (no dependency): uniform in [-1, 1).
fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn vector_build_equals_the_portable_build_bit_for_bit() {
    // every rule, row counts around the 16-lane chunks and the 256-row tiles, batches that are
    // not whole sub-blocks, a parameter map, several calls per batch
    let table = vec![-1.0, -0.5, 0.0, 0.25, 0.5, 1.0];
    let rules = [
        Rule::LegacySym {
            offset: 8.5,
            center: 8,
            top: 15,
        },
        Rule::LegacyAffine { top: 15 },
        Rule::Q8,
        Rule::Zero { maxq: 15.0 },
        Rule::Int8,
        Rule::Bnb {
            bounds: vec![-0.75, -0.25, 0.1, 0.4, 0.75],
            order: vec![0, 1, 2, 3, 4, 5],
            table: table.clone(),
        },
        Rule::Sym { center: 4, top: 7 },
        Rule::Table {
            table: table.clone(),
        },
        Rule::Nearest,
    ];
    let mut seed = 7u64;
    for rows in [1, 15, 16, 17, 300] {
        for n in [1, 5, 16, 37] {
            for rule in &rules {
                let pcols = 3;
                let levels = 16;
                let mut field = |scale: f32| -> Vec<f32> {
                    (0..pcols * rows)
                        .map(|_| (lcg(&mut seed).abs() + 0.05) * scale)
                        .collect()
                };
                let (scale, inv, low, zero) = (field(0.3), field(4.0), field(-0.5), field(0.0));
                let zero: Vec<f32> = zero.iter().map(|_| 7.0).collect();
                let grid: Vec<f32> = (0..pcols * rows * levels)
                    .map(|i| (i % levels) as f32 * 0.2 - 0.5)
                    .collect();
                let map: Vec<usize> = (0..n).map(|c| (c * 7) % pcols).collect();
                let p = ColumnParams {
                    map: &map,
                    scale: &scale,
                    inv: &inv,
                    low: &low,
                    zero: &zero,
                    rscale: &scale,
                    grid: &grid,
                    levels,
                };
                let w0: Vec<f32> = (0..n * rows).map(|_| lcg(&mut seed)).collect();
                let mut hinv = vec![0.0f32; n * n];
                for i in 0..n {
                    hinv[i * n + i] = 0.5 + lcg(&mut seed).abs();
                    for j in i + 1..n {
                        hinv[i * n + j] = 0.3 * lcg(&mut seed);
                    }
                }
                let run = |portable: bool, ldl: bool| {
                    let mut w = w0.clone();
                    // the LDL form reads the original weights from err
                    let mut err = if ldl { w0.clone() } else { vec![0.0; n * rows] };
                    let mut lev = vec![0; n * rows];
                    let mut val = vec![0.0; n * rows];
                    let mut b = Batch {
                        rows,
                        w: &mut w,
                        hinv: &hinv,
                        err: &mut err,
                        levels: &mut lev,
                        values: &mut val,
                        from_original: ldl,
                    };
                    // two calls: columns 0..n/2, then the rest (params from column 0 again)
                    for (s, e) in [(0, n / 2), (n / 2, n)] {
                        let q = ColumnParams {
                            map: &map[..e - s],
                            ..p
                        };
                        if portable {
                            solve_columns_portable(&mut b, s, e, rule, &q, true).unwrap();
                        } else {
                            solve_columns(&mut b, s, e, rule, &q, true).unwrap();
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (bits(&w), bits(&err), lev, bits(&val))
                };
                for ldl in [false, true] {
                    assert_eq!(
                        run(false, ldl),
                        run(true, ldl),
                        "{rule:?}, {rows} rows, {n} columns, LDL form {ldl}"
                    );
                }
            }
        }
    }
}

#[test]
fn ldl_form_feeds_back_the_original_weights_error() {
    // one row, two columns: column 0 rounds 0.3 -> 0 (int8, scale 1), e0 = w_orig0 - q0 (err
    // holds the original weights, here 0.7 for column 0: not w's 0.3), no division by the
    // diagonal, and w1 -= h01 * e0
    let mut w = vec![0.3f32, 0.0];
    let mut err = vec![0.7f32, 0.25];
    let hinv = [-1.0f32, -0.5, 0.0, -1.0];
    let (mut levels, mut values) = (vec![0; 2], vec![0.0; 2]);
    let scale = vec![1.0; 2];
    let p = ColumnParams {
        scale: &scale,
        ..Default::default()
    };
    let mut b = Batch {
        rows: 1,
        w: &mut w,
        hinv: &hinv,
        err: &mut err,
        levels: &mut levels,
        values: &mut values,
        from_original: true,
    };
    solve_columns(&mut b, 0, 2, &Rule::Int8, &p, true).unwrap();
    assert_eq!(err[0], 0.7);
    assert_eq!(w[1], 0.0 - (-0.5 * 0.7f32));
    assert_eq!(levels, vec![128, 128]);
    assert_eq!(err[1], 0.25);
}

#[test]
fn parameter_map_reads_the_mapped_column() {
    // int8, two parameter columns (scales 1 and 0.5), three columns mapped 1, 0, 1, no feedback
    let rows = 2;
    let mut w = vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0];
    let hinv = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let scale = vec![1.0, 1.0, 0.5, 0.5];
    let map = [1, 0, 1];
    let p = ColumnParams {
        map: &map,
        scale: &scale,
        ..Default::default()
    };
    let (lev, _, _) = batch_solve(&mut w, &hinv, rows, &Rule::Int8, &p);
    assert_eq!(lev, vec![130, 132, 129, 130, 130, 132]);
    let bad = [2, 0, 1];
    let p = ColumnParams { map: &bad, ..p };
    let mut w = vec![0.0; 6];
    let mut err = vec![0.0; 6];
    let mut levels = vec![0; 6];
    let mut values = vec![0.0; 6];
    let mut b = Batch {
        rows,
        w: &mut w,
        hinv: &hinv,
        err: &mut err,
        levels: &mut levels,
        values: &mut values,
        from_original: false,
    };
    let e = solve_columns(&mut b, 0, 3, &Rule::Int8, &p, true).unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
}

#[test]
fn pack_writes_each_code_bit_and_keeps_the_rest() {
    // q4_0-like nibbles on a 4-weight block of 3 bytes (byte 0: a parameter), two rows, the
    // columns solved in the order 2, 0, 3, 1
    let byte = [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2];
    let shift = [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7];
    let plan = BitPlan {
        block: 4,
        nbytes: 3,
        bits: 4,
        byte: &byte,
        shift: &shift,
        xor: 0,
    };
    let perm = [2, 0, 3, 1];
    // natural codes row 0: 1 2 3 4, row 1: 15 0 5 10; levels[p] = column perm[p]
    let nat = [[1u8, 2, 3, 4], [15, 0, 5, 10]];
    let levels: Vec<u8> = perm.iter().flat_map(|&c| [nat[0][c], nat[1][c]]).collect();
    let mut data = vec![0xAB, 0xFF, 0xFF, 0xCD, 0x00, 0x00];
    pack_codes(&mut data, &levels, 2, &perm, &plan).unwrap();
    assert_eq!(data, vec![0xAB, 0x31, 0x42, 0xCD, 0x5F, 0xA0]);
    let e = pack_codes(&mut data, &levels, 2, &[0, 0, 1, 2], &plan).unwrap_err();
    assert!(e.to_string().contains("permutation"), "{e}");
}

#[test]
fn pack_split_and_contiguous_fields_in_one_block() {
    // 3-bit codes, 2 per block of 2 bytes: element 0 split (bits 0-1 in byte 0, bit 2 in byte
    // 1: the per-bit path), element 1 one field of byte 0 from bit 2 (the shifted-or path);
    // codes 5 (101) and 6 (110) over bytes whose other bits are all set
    let byte = [0, 0, 1, 0, 0, 0];
    let shift = [0, 1, 0, 2, 3, 4];
    let plan = BitPlan {
        block: 2,
        nbytes: 2,
        bits: 3,
        byte: &byte,
        shift: &shift,
        xor: 0,
    };
    let mut data = vec![0xFF, 0xFE];
    pack_codes(&mut data, &[5, 6], 1, &[0, 1], &plan).unwrap();
    // byte 0: 0xE0 kept | bit 0 (5's bit 0) | 6 << 2; byte 1: 0xFE kept | 5's bit 2
    assert_eq!(data, vec![0xE0 | 0x01 | 0x18, 0xFF]);
    // xor 7 stores 2 (010) and 1 (001)
    let plan = BitPlan { xor: 7, ..plan };
    let mut data = vec![0x00, 0x00];
    pack_codes(&mut data, &[5, 6], 1, &[0, 1], &plan).unwrap();
    assert_eq!(data, vec![0x02 | 0x04, 0x00]);
}

#[test]
fn rules_whose_levels_would_not_fit_a_byte_are_refused() {
    // the loop stores levels as bytes: a rule that could produce 256 or more is an error, not
    // a wrapped code
    let scale = vec![1.0f32; 4];
    let p = ColumnParams {
        scale: &scale,
        zero: &scale,
        rscale: &scale,
        ..Default::default()
    };
    for (rule, ok) in [
        (
            Rule::Sym {
                center: 32,
                top: 63,
            },
            true,
        ),
        (
            Rule::Sym {
                center: 128,
                top: 255,
            },
            true,
        ),
        (
            Rule::Sym {
                center: 128,
                top: 256,
            },
            false,
        ),
        (
            Rule::Sym {
                center: -1,
                top: 15,
            },
            false,
        ),
        (Rule::Zero { maxq: 255.0 }, true),
        (Rule::Zero { maxq: 256.0 }, false),
        (Rule::Zero { maxq: f32::NAN }, false),
        (
            Rule::Table {
                table: vec![0.0; 257],
            },
            false,
        ),
    ] {
        assert_eq!(rule.check(&p, 2, 2).is_ok(), ok, "{rule:?}");
    }
    let grid = vec![0.0f32; 2 * 2 * 300];
    let p = ColumnParams {
        grid: &grid,
        levels: 300,
        ..Default::default()
    };
    assert!(Rule::Nearest.check(&p, 2, 2).is_err());
}
