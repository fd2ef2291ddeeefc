//! The loop's own invariants; the bit-exact comparison with the Python reference on every
//! format lives in tests/test_gptq_native.py.

use super::*;

fn batch_solve(
    w: &mut [f32],
    hinv: &[f32],
    rows: usize,
    rule: &Rule,
    p: &ColumnParams,
) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
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
