//! The forward pass's matmuls: packed weights against `qmatmul` on their rows at every M; weights
//! as loaded against the scalar references on the GEMM paths; a prompt in one call against one
//! token at a time. On aarch64 they also check that the NEON GEMM ran where `has_gemm` says.

use super::*;
use crate::input::Matrix;
use crate::quantize::{quantize, Options};
use crate::runtime::packed;
use crate::runtime::weights::pack;

/// A packed weight used in place (`file_rows` set) gives the products of `qmatmul` on its
/// rows at every M: the packed kernels below `GEMM_OVER_PACKED_M` rows, `qmatmul`'s GEMM
/// path from there on where the format has one (q8_0 now), K with and without whole groups;
/// the same with one thread; a stacked (owned) weight keeps the packed kernels.
#[test]
fn packed_weights_in_the_file_give_the_products_of_their_rows_at_every_m() {
    // (qmatmul's int8 paths, which the packed kernels match: on AMX the ggml formats take
    // the bf16 tiles from `matmul::ggml_bf16_min_m` rows, with other numerics)
    let _int8 = crate::matmul::GgmlInt8::new();
    for (qtype, n, k) in [
        (QType::Q8_0, 20, 512),
        (QType::Q8_0, 16, 576),
        (QType::Q4K, 12, 512),
        (QType::Q6K, 9, 256),
    ] {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i as u32).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let m = Matrix::from_f32(&w, n, k).unwrap();
        let file = quantize(&m, qtype, &Options::default()).unwrap().data;
        let stored = Weight::Quant {
            qtype,
            rows: n,
            cols: k,
            bytes: 0..file.len(),
        };
        let packed = pack(stored.clone(), &file, true);
        if packed::enabled() {
            assert!(matches!(packed, Weight::Packed(_) | Weight::PackedK(_)));
        }
        let owned = pack(
            Weight::Repacked {
                qtype,
                rows: n,
                cols: k,
                data: file.clone(),
            },
            &[],
            true,
        );
        for m in [1, 4, GEMM_OVER_PACKED_M - 1, GEMM_OVER_PACKED_M, 37] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.61).sin() * 3.0).collect();
            let mut want = vec![0f32; m * n];
            qmatmul(&x, m, &stored.view(&file, 0, n).unwrap(), &mut want).unwrap();
            for threads in [0, 1] {
                crate::parallel::set_num_threads(threads);
                let mut got = vec![0f32; m * n];
                let r1 = matmul(&packed, &file, &x, m, &mut got, &mut Scratch::default());
                let mut got2 = vec![0f32; m * n];
                let r2 = matmul(&owned, &[], &x, m, &mut got2, &mut Scratch::default());
                crate::parallel::set_num_threads(0);
                r1.unwrap();
                r2.unwrap();
                for (y, what) in [(&got, "in the file"), (&got2, "owned")] {
                    assert!(
                        y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{qtype:?} {n}x{k} m={m} threads={threads} {what}"
                    );
                }
            }
        }
    }
}

/// Every format the native runtime multiplies in place and `qmatmul`'s GEMM paths take (the
/// NEON GEMM's on aarch64: q5_0 loads repacked as q8_0).
const GEMM_FORMATS: [QType; 12] = [
    QType::Q4_0,
    QType::Q5_0,
    QType::Q8_0,
    QType::IQ4NL,
    QType::Q4_1,
    QType::Q5_1,
    QType::Q2K,
    QType::Q3K,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
    QType::IQ4XS,
];

/// `rows` x `cols` weights (sines, spread over [-1, 1]) quantized to `qtype`.
fn quantized(qtype: QType, rows: usize, cols: usize, seed: usize) -> Vec<u8> {
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 + seed * 104729) as f32 * 0.013).sin())
        .collect();
    let m = Matrix::from_f32(&w, rows, cols).unwrap();
    quantize(&m, qtype, &Options::default()).unwrap().data
}

/// The scalar references' products (`matmul::reference`): each activation row quantized as
/// `qmatmul` does (q8_0, q8_1 for q4_1 / q5_1, q8_K for the K-quants), each output one
/// reference dot, M x N.
fn reference(qtype: QType, data: &[u8], n: usize, x: &[f32], m: usize) -> Vec<f32> {
    use crate::formats::blocks::*;
    use crate::matmul::reference::{self as r, BlockQ8K, BlockQ8_1};
    use bytemuck::{cast_slice as c, Zeroable};
    let k = x.len() / m;
    let rb = data.len() / n;
    let mut y = vec![0f32; m * n];
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        let mut q8 = vec![BlockQ8_0::zeroed(); k / 32];
        r::quantize_row_q8_0(xr, &mut q8);
        let mut q81 = vec![BlockQ8_1::zeroed(); k / 32];
        r::quantize_row_q8_1(xr, &mut q81);
        let x1: Vec<BlockQ8_0> = q81.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
        let (d8, d1, s1): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            q8.iter().map(|b| f16_to_f32(b.d)).collect(),
            q81.iter().map(|b| f16_to_f32(b.d)).collect(),
            q81.iter().map(|b| f16_to_f32(b.s)).collect(),
        );
        let mut qk = vec![BlockQ8K::zeroed(); k / 256];
        if k.is_multiple_of(256) {
            r::quantize_row_q8_k(xr, &mut qk);
        }
        for (row, yv) in yr.iter_mut().enumerate() {
            let w = &data[row * rb..(row + 1) * rb];
            *yv = match qtype {
                QType::Q4_0 => r::dot_block32::<BlockQ4_0>(c(w), &q8, &d8),
                QType::Q5_0 => r::dot_block32::<BlockQ5_0>(c(w), &q8, &d8),
                QType::Q8_0 => r::dot_block32::<BlockQ8_0>(c(w), &q8, &d8),
                QType::IQ4NL => r::dot_block32::<BlockIQ4NL>(c(w), &q8, &d8),
                QType::Q4_1 => r::dot_block32_min::<BlockQ4_1>(c(w), &x1, &d1, &s1),
                QType::Q5_1 => r::dot_block32_min::<BlockQ5_1>(c(w), &x1, &d1, &s1),
                QType::Q2K => r::dot_block_k::<BlockQ2K>(c(w), &qk),
                QType::Q3K => r::dot_block_k::<BlockQ3K>(c(w), &qk),
                QType::Q4K => r::dot_block_k::<BlockQ4K>(c(w), &qk),
                QType::Q5K => r::dot_block_k::<BlockQ5K>(c(w), &qk),
                QType::Q6K => r::dot_block_k::<BlockQ6K>(c(w), &qk),
                QType::IQ4XS => r::dot_block_k::<BlockIQ4XS>(c(w), &qk),
                _ => unreachable!("{qtype:?}"),
            };
        }
    }
    y
}

/// The forward pass's `matmul` of a weight as `Weights::load` leaves it (in the file, packed
/// where the runtime packs) gives the scalar references' bits for every format at M = 1 (the
/// row kernels), 2, 5, 16 and 37 (tiles of 4 and remainders, past `GEMM_OVER_PACKED_M`), N
/// with a partial panel of 8, on the pool and on one thread; and on aarch64 it ran the NEON
/// GEMM exactly where `matmul::has_gemm` says (every format from 2 rows with dotprod).
#[test]
fn in_place_weights_give_the_references_bits_on_the_gemm_path() {
    let _int8 = crate::matmul::GgmlInt8::new();
    for qtype in GEMM_FORMATS {
        for (n, k) in [(20, 512), (9, 256)] {
            let file = quantized(qtype, n, k, n);
            let w = pack(
                Weight::Quant {
                    qtype,
                    rows: n,
                    cols: k,
                    bytes: 0..file.len(),
                },
                &file,
                true,
            );
            for m in [1, 2, 5, 16, 37] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).cos() * 2.5).collect();
                let want = reference(qtype, &file, n, &x, m);
                for threads in [0, 1] {
                    crate::parallel::set_num_threads(threads);
                    let runs = crate::matmul::neon_gemm_runs(&file);
                    let mut y = vec![0f32; m * n];
                    let r = matmul(&w, &file, &x, m, &mut y, &mut Scratch::default());
                    let ran = crate::matmul::neon_gemm_runs(&file) - runs;
                    crate::parallel::set_num_threads(0);
                    r.unwrap();
                    let case = format!("{qtype:?} {n}x{k} m={m} threads={threads}");
                    assert!(
                        y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{case}"
                    );
                    #[cfg(target_arch = "aarch64")]
                    assert_eq!(ran, matmul::has_gemm(qtype, m, k) as usize, "{case}");
                    #[cfg(not(target_arch = "aarch64"))]
                    let _ = ran;
                }
            }
        }
    }
}

/// A GGUF file (in memory) of a 1-layer Llama with every matrix in `qtype` (embeddings tied):
/// n_embd 256, 4 query heads and 2 key/value heads of 64, n_ff 256, 44 tokens (the head: a
/// partial panel of 8).
fn tiny_model(qtype: QType) -> GgufFile {
    use crate::gguf::{encode_header, GgmlType, TensorDesc, Value};
    let (e, ff, kvd, vocab, layers) = (256u64, 256u64, 128u64, 44u64, 1);
    let meta: Vec<(String, Value)> = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(e as u32)),
        ("llama.feed_forward_length", Value::U32(ff as u32)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.block_count", Value::U32(layers)),
        ("llama.context_length", Value::U32(64)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let gq = GgmlType::parse(qtype.name()).unwrap();
    let f32t = GgmlType::parse("f32").unwrap();
    let mut tensors = vec![("token_embd.weight".to_string(), vec![e, vocab], gq)];
    for i in 0..layers {
        for (name, dims, t) in [
            ("attn_norm", vec![e], f32t),
            ("attn_q", vec![e, e], gq),
            ("attn_k", vec![e, kvd], gq),
            ("attn_v", vec![e, kvd], gq),
            ("attn_output", vec![e, e], gq),
            ("ffn_norm", vec![e], f32t),
            ("ffn_gate", vec![e, ff], gq),
            ("ffn_up", vec![e, ff], gq),
            ("ffn_down", vec![ff, e], gq),
        ] {
            tensors.push((format!("blk.{i}.{name}.weight"), dims, t));
        }
    }
    tensors.push(("output_norm.weight".to_string(), vec![e], f32t));
    let descs: Vec<TensorDesc> = tensors
        .iter()
        .map(|(name, dims, t)| TensorDesc {
            name: name.clone(),
            dims: dims.clone(),
            ggml_type: t,
        })
        .collect();
    let h = encode_header(&meta, &descs).unwrap();
    let mut bytes = h.bytes.clone();
    let start = bytes.len().next_multiple_of(h.alignment as usize);
    for (i, ((name, dims, t), &(nbytes, off))) in tensors.iter().zip(&h.layout).enumerate() {
        let data = if dims.len() == 1 {
            (0..dims[0])
                .flat_map(|j| (1.0 + 0.25 * ((j + i as u64) as f32 * 0.7).sin()).to_le_bytes())
                .collect()
        } else {
            assert_eq!(t.qtype(), Some(qtype), "{name}");
            quantized(qtype, dims[1] as usize, dims[0] as usize, i)
        };
        assert_eq!(data.len() as u64, nbytes, "{name}");
        bytes.resize(start + off as usize, 0);
        bytes.extend_from_slice(&data);
    }
    GgufFile::from_bytes(bytes).unwrap()
}

/// NEON GEMM runs on the matrices `llama`'s forward pass multiplies (stacked ones in place
/// of their parts, the head).
fn gemm_runs(llama: &Llama) -> usize {
    let ws = &llama.weights;
    let bytes = ws.bytes();
    let mut all: Vec<&Weight> = vec![ws.head()];
    for l in &ws.layers {
        all.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
        all.extend(l.wqkv.iter().chain(&l.w_gate_up));
    }
    all.iter()
        .filter_map(|w| w.view(bytes, 0, w.rows()))
        .map(|v| crate::matmul::neon_gemm_runs(v.data))
        .sum()
}

/// A prompt of 7 tokens in one call gives every token's logits bit for bit as the same tokens
/// fed one at a time (M = 1: the row kernels), for a format of each GEMM and q5_0 (loaded as q8_0);
/// on aarch64 with dotprod (qemu `-cpu max`, `cortex-a76`) it ran all 5 matmuls on the NEON
/// GEMM (q|k|v, wo, gate|up, down per layer; the head), the single tokens none.
#[test]
fn a_prompt_in_one_call_gives_the_logits_of_one_token_at_a_time() {
    use crate::runtime::KvType;
    let _int8 = crate::matmul::GgmlInt8::new();
    let prompt = [3u32, 17, 5, 43, 0, 22, 8];
    for qtype in [QType::Q4_0, QType::Q5_0, QType::Q4K] {
        let file = Arc::new(tiny_model(qtype));
        let mut llama = Llama::from_file(file, Some(64), KvType::F32, Some(4 << 20)).unwrap();
        let runs = gemm_runs(&llama);
        let all = llama.forward(&prompt, true).unwrap();
        let ran = gemm_runs(&llama) - runs;
        llama.reset();
        let mut one = Vec::new();
        for t in prompt {
            one.extend(llama.forward(&[t], false).unwrap());
        }
        let ran_m1 = gemm_runs(&llama) - runs - ran;
        assert_eq!(all.len(), one.len());
        assert!(all.iter().all(|v| v.is_finite()), "{qtype:?}");
        assert!(
            all.iter()
                .zip(&one)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{qtype:?}"
        );
        #[cfg(target_arch = "aarch64")]
        {
            let gemm = matmul::has_gemm(qtype, prompt.len(), 256);
            assert_eq!(
                gemm,
                crate::cpu::has_dotprod() && crate::config::neon_gemm()
            );
            let want = if gemm { 4 * llama.cfg.n_layer + 1 } else { 0 };
            assert_eq!((ran, ran_m1), (want, 0), "{qtype:?}");
        }
        #[cfg(not(target_arch = "aarch64"))]
        let _ = (ran, ran_m1);
    }
}
