//! The model's tensors, borrowed from the GGUF memory map where they can be used as stored.
//!
//! Matrices whose qtype `matmul::qmatmul` has a kernel for stay in the file (zero-copy; each
//! `Weight::Quant` is a byte range of the map). f32 matrices are read in place when the map is
//! 4-byte aligned (it always is for a GGUF tensor in an mmapped file) and copied otherwise. Every
//! other qtype (f16, bf16, q4_1, q5_1, q2_k, q3_k, iq4_xs, ... as long as ferroquant can
//! dequantize it) is dequantized to f32 once at load and multiplied in f32; `LoadReport` lists
//! those tensors. Norm vectors and biases are copied to f32.
//!
//! On x86-64 with AVX-512 VNNI the matrices of q8_0 values the forward pass multiplies (q8_0,
//! q5_0 repacked, the stacked q|k|v and gate|up, the head) are then copied once more into the
//! 8-row panels of `packed.rs` (`pack`), whose kernel gives the same products bit for bit; a
//! packed matrix that was used in place keeps its range of the file (`file_rows`) for the GEMM
//! path of many-row matmuls.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::blocks::{BlockQ5_0, BlockQ8_0};
use crate::formats::tensor::QuantizedView;
use crate::gguf::{GgufFile, TensorInfo};
use crate::matmul;
use crate::matmul::reference::unpack_q5_0;
use crate::qtype::QType;
use crate::quantize::dequantize;

use super::config::Config;
use super::packed::{self, Packed};
use super::packed_k::PackedK;

/// One weight matrix (rows = output features N, cols = input features K).
#[derive(Clone, Debug)]
pub enum Weight {
    /// Quantized rows in the file, multiplied by `matmul::qmatmul`.
    Quant {
        qtype: QType,
        rows: usize,
        cols: usize,
        bytes: Range<usize>,
    },
    /// Quantized rows converted at load (q5_0 repacked as q8_0, see `repack_q5_0`).
    Repacked {
        qtype: QType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    },
    /// f32 rows in the file.
    F32Mapped {
        rows: usize,
        cols: usize,
        bytes: Range<usize>,
    },
    /// f32 rows in memory (a copy, or a tensor dequantized at load).
    F32Owned {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    /// q8_0 values in panels of 8 rows for the runtime's VNNI kernel (`packed.rs`).
    Packed(Packed),
    /// q4_K / q6_K in panels of 8 rows (`packed_k.rs`).
    PackedK(PackedK),
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::Quant { rows, .. }
            | Weight::Repacked { rows, .. }
            | Weight::F32Mapped { rows, .. }
            | Weight::F32Owned { rows, .. } => *rows,
            Weight::Packed(p) => p.rows,
            Weight::PackedK(p) => p.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weight::Quant { cols, .. }
            | Weight::Repacked { cols, .. }
            | Weight::F32Mapped { cols, .. }
            | Weight::F32Owned { cols, .. } => *cols,
            Weight::Packed(p) => p.cols,
            Weight::PackedK(p) => p.cols,
        }
    }

    /// The quantized view of a `Quant` weight (rows `r0..r1`), borrowing `file`.
    pub fn view<'a>(&'a self, file: &'a [u8], r0: usize, r1: usize) -> Option<QuantizedView<'a>> {
        let (qtype, cols, data) = match self {
            Weight::Quant {
                qtype, cols, bytes, ..
            } => (*qtype, *cols, &file[bytes.clone()]),
            Weight::Repacked {
                qtype, cols, data, ..
            } => (*qtype, *cols, &data[..]),
            _ => return None,
        };
        let rb = qtype.row_bytes(cols, qtype.info().block_size);
        Some(QuantizedView {
            qtype,
            rows: r1 - r0,
            cols,
            block_size: qtype.info().block_size,
            scale_mode: None,
            data: &data[r0 * rb..r1 * rb],
            stats: &[],
            double_quant: None,
        })
    }

    /// The f32 rows of an f32 weight.
    pub fn f32_data<'a>(&'a self, file: &'a [u8]) -> Option<&'a [f32]> {
        match self {
            Weight::F32Mapped { bytes, .. } => Some(bytemuck::cast_slice(&file[bytes.clone()])),
            Weight::F32Owned { data, .. } => Some(data),
            Weight::Quant { .. }
            | Weight::Repacked { .. }
            | Weight::Packed(_)
            | Weight::PackedK(_) => None,
        }
    }

    /// Row `r` as f32 (the embedding lookup, ggml's get_rows).
    pub fn row_f32(&self, file: &[u8], r: usize, out: &mut [f32]) -> Result<()> {
        if let Weight::Packed(p) = self {
            p.row_f32(r, out);
            return Ok(());
        }
        match self.view(file, r, r + 1) {
            Some(v) => dequantize(&v, out),
            None => {
                let c = self.cols();
                let data = self.f32_data(file).unwrap_or(&[]);
                out.copy_from_slice(&data[r * c..(r + 1) * c]);
                Ok(())
            }
        }
    }

    /// Bytes the weight occupies (in the file or in memory).
    pub fn nbytes(&self) -> usize {
        match self {
            Weight::Quant { bytes, .. } | Weight::F32Mapped { bytes, .. } => bytes.len(),
            Weight::Repacked { data, .. } => data.len(),
            Weight::F32Owned { data, .. } => data.len() * 4,
            Weight::Packed(p) => p.data.len(),
            Weight::PackedK(p) => p.data.len(),
        }
    }
}

/// Repack q5_0 matrices as q8_0 at load. Lossless and bit-exact: a q5_0 weight is `d * (q - 16)`
/// with q in 0..32, which q8_0 holds as the same f16 `d` and the int8 `q - 16`; the matmul's
/// product of either block with a q8_0 activation block is `(d_w * d_x) * isum` with the same
/// integer sum (`matmul::reference::Block32`), so every output is the same float. It costs 34
/// bytes per 32 weights instead of 22 and buys the q8_0 kernel: 5x faster than q5_0's when
/// q5_0's SIMD load unpacked the fifth bit with scalar code, still 1.2-1.6x faster at 576-wide
/// shapes (one thread, M=1) with q5_0's AVX2 decode.
pub const REPACK_Q5_0: bool = true;

/// q5_0 rows (22-byte blocks) as q8_0 rows (34-byte blocks) holding the same values.
pub fn repack_q5_0(src: &[u8]) -> Vec<u8> {
    let blocks: &[BlockQ5_0] = bytemuck::cast_slice(src);
    let out: Vec<BlockQ8_0> = blocks
        .iter()
        .map(|b| BlockQ8_0 {
            d: b.d,
            qs: unpack_q5_0(b),
        })
        .collect();
    bytemuck::cast_slice(&out).to_vec()
}

/// The weights of one transformer block.
#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    /// Qwen2-style q/k/v biases, when the file has them.
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Weight,
    pub w_up: Weight,
    pub w_down: Weight,
    /// q, k and v stacked into one matrix (rows q, then k, then v) when they share a quantized
    /// qtype: one matmul, one activation quantization instead of three.
    pub wqkv: Option<Weight>,
    /// gate and up stacked the same way.
    pub w_gate_up: Option<Weight>,
}

/// The rows of `ws` stacked into one quantized matrix, when all are quantized in the same qtype
/// with the same row length (each output row is computed from its own weight row alone, so the
/// stacked product holds the same floats as the separate ones).
pub fn stack(ws: &[&Weight], file: &[u8]) -> Option<Weight> {
    let first = ws.first()?.view(file, 0, ws[0].rows())?;
    let mut data = Vec::new();
    let mut rows = 0;
    for w in ws {
        let v = w.view(file, 0, w.rows())?;
        if v.qtype != first.qtype || v.cols != first.cols {
            return None;
        }
        data.extend_from_slice(v.data);
        rows += v.rows;
    }
    Some(Weight::Repacked {
        qtype: first.qtype,
        rows,
        cols: first.cols,
        data,
    })
}

/// Drop `w`'s owned data (a part of a stacked matrix, never multiplied itself): an empty matrix.
fn release(w: &mut Weight) {
    if matches!(w, Weight::Repacked { .. } | Weight::F32Owned { .. }) {
        *w = Weight::F32Owned {
            rows: 0,
            cols: 0,
            data: vec![],
        };
    }
}

/// `w` in 8-row panels when `packed::enabled` and it holds q8_0 values (q8_0, or q5_0
/// repacked) or, with `k_quants`, q4_K / q6_K (the tied embedding is read by rows too, so it
/// is packed only as q8_0, whose rows `Packed` gives back); else `w` as it is.
pub fn pack(w: Weight, file: &[u8], k_quants: bool) -> Weight {
    if !packed::enabled() {
        return w;
    }
    // A weight used in place keeps its rows in the file for the GEMM path (`file_rows`).
    let in_file = match &w {
        Weight::Quant { bytes, .. } => Some(bytes.clone()),
        _ => None,
    };
    match w.view(file, 0, w.rows()) {
        Some(v) if v.qtype == QType::Q8_0 => {
            let mut p = Packed::from_q8_0(bytemuck::cast_slice(v.data), v.rows, v.cols);
            p.file_rows = in_file;
            Weight::Packed(p)
        }
        Some(v) if k_quants => match PackedK::new(v.qtype, v.data, v.rows, v.cols) {
            Some(mut p) => {
                p.file_rows = in_file;
                Weight::PackedK(p)
            }
            None => w,
        },
        _ => w,
    }
}

/// The rows of a packed weight as stored in the file (`file_rows`), viewed for `qmatmul`.
pub fn file_view<'a>(
    qtype: QType,
    rows: usize,
    cols: usize,
    file_rows: &Option<Range<usize>>,
    file: &'a [u8],
) -> Option<QuantizedView<'a>> {
    Some(ggml_view(qtype, rows, cols, file.get(file_rows.clone()?)?))
}

/// A GGUF tensor's bytes as a `QuantizedView`: ggml formats carry their scales in the blocks.
fn ggml_view(qtype: QType, rows: usize, cols: usize, data: &[u8]) -> QuantizedView<'_> {
    QuantizedView {
        qtype,
        rows,
        cols,
        block_size: qtype.info().block_size,
        scale_mode: None,
        data,
        stats: &[],
        double_quant: None,
    }
}

/// What loading did with each tensor type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Matrices used in place by the quantized matmul, per qtype: (qtype, count).
    pub native: Vec<(String, usize)>,
    /// Matrices dequantized to f32 at load (no matmul kernel for their qtype): (name, qtype).
    pub dequantized: Vec<(String, String)>,
    /// Matrices the forward pass multiplies in 8-row panels (`packed.rs`; stacked ones count once).
    pub packed: usize,
}

impl LoadReport {
    fn note(&mut self, name: &str, w: &Weight, stored: &str) {
        match w {
            Weight::Quant { qtype, .. } => self.count(qtype.name()),
            Weight::Repacked { .. } | Weight::Packed(_) | Weight::PackedK(_) => {
                self.count(&format!("{stored} (repacked as q8_0)"))
            }
            Weight::F32Mapped { .. } => self.count("f32"),
            Weight::F32Owned { .. } if stored == "f32" => self.count("f32"),
            Weight::F32Owned { .. } => self
                .dequantized
                .push((name.to_string(), stored.to_string())),
        }
    }

    fn count(&mut self, q: &str) {
        match self.native.iter_mut().find(|(n, _)| n == q) {
            Some((_, c)) => *c += 1,
            None => self.native.push((q.to_string(), 1)),
        }
    }

    /// One line per kind of tensor, for people.
    pub fn summary(&self) -> String {
        let mut s: Vec<String> = self
            .native
            .iter()
            .map(|(q, c)| format!("{c} {q} matrices used as stored"))
            .collect();
        if self.packed > 0 {
            s.push(format!(
                "{} matrices packed in 8-row panels (AVX-512 VNNI)",
                self.packed
            ));
        }
        if !self.dequantized.is_empty() {
            let mut kinds: Vec<&str> = self.dequantized.iter().map(|(_, q)| q.as_str()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            s.push(format!(
                "{} matrices dequantized to f32 at load (no matmul kernel for {})",
                self.dequantized.len(),
                kinds.join(", ")
            ));
        }
        s.join("; ")
    }
}

/// All weights of the model.
pub struct Weights {
    pub file: Arc<GgufFile>,
    pub token_embd: Weight,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `output.weight`; None when the embeddings are tied (the head is `token_embd`).
    pub output: Option<Weight>,
    pub report: LoadReport,
}

fn missing(name: &str) -> Error {
    Error::Format {
        field: format!("tensor {name}"),
        offset: 0,
        message: "missing from the GGUF file".into(),
    }
}

fn shape_err(t: &TensorInfo, want: &str) -> Error {
    Error::Format {
        field: format!("tensor {}", t.name),
        offset: t.info_offset,
        message: format!("has ggml dims {:?}, expected {want}", t.dims),
    }
}

struct Loader<'a> {
    file: &'a GgufFile,
    report: LoadReport,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file.header().tensor(name).ok_or_else(|| missing(name))
    }

    fn range(&self, t: &TensorInfo) -> Result<Range<usize>> {
        let start = self.file.data_start(t) as usize;
        let len = self.file.tensor_data(t)?.len();
        Ok(start..start + len)
    }

    /// A whole tensor as f32 (dequantized when stored quantized).
    fn to_f32(&self, t: &TensorInfo, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let data = self.file.tensor_data(t)?;
        let qtype = t.ggml_type.qtype().ok_or_else(|| Error::Format {
            field: format!("tensor {}", t.name),
            offset: t.info_offset,
            message: format!(
                "tensor type {} cannot be read by ferroquant",
                t.ggml_type.name
            ),
        })?;
        let mut out = vec![0f32; rows * cols];
        if qtype == QType::F32 {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            return Ok(out);
        }
        let view = ggml_view(qtype, rows, cols, data);
        dequantize(&view, &mut out).map_err(|e| Error::Format {
            field: format!("tensor {}", t.name),
            offset: t.info_offset,
            message: e.to_string(),
        })?;
        Ok(out)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        if t.dims.iter().product::<u64>() != len as u64 || t.dims.first() != Some(&(len as u64)) {
            return Err(shape_err(t, &format!("[{len}]")));
        }
        self.to_f32(t, 1, len)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        match self.file.header().tensor(name) {
            Some(_) => self.vector(name, len).map(Some),
            None => Ok(None),
        }
    }

    /// A matrix of `rows` x `cols` (ggml dims [cols, rows]); `rows` None: any row count.
    fn matrix(&mut self, name: &str, rows: Option<usize>, cols: usize) -> Result<Weight> {
        let t = self.info(name)?.clone();
        let ok = t.dims.len() == 2
            && t.dims[0] == cols as u64
            && rows.is_none_or(|r| t.dims[1] == r as u64);
        if !ok {
            let r = rows.map_or("N".to_string(), |r| r.to_string());
            return Err(shape_err(&t, &format!("[{cols}, {r}]")));
        }
        let rows = t.dims[1] as usize;
        let stored = t.ggml_type.name;
        let qtype = t.ggml_type.qtype();
        let w = match qtype {
            Some(QType::Q5_0) if REPACK_Q5_0 && matmul::SUPPORTED.contains(&QType::Q8_0) => {
                let data = repack_q5_0(self.file.tensor_data(&t)?);
                Weight::Repacked {
                    qtype: QType::Q8_0,
                    rows,
                    cols,
                    data,
                }
            }
            Some(q) if matmul::SUPPORTED.contains(&q) => Weight::Quant {
                qtype: q,
                rows,
                cols,
                bytes: self.range(&t)?,
            },
            Some(QType::F32) => {
                let bytes = self.range(&t)?;
                if bytemuck::try_cast_slice::<u8, f32>(&self.file.bytes()[bytes.clone()]).is_ok() {
                    Weight::F32Mapped { rows, cols, bytes }
                } else {
                    Weight::F32Owned {
                        rows,
                        cols,
                        data: self.to_f32(&t, rows, cols)?,
                    }
                }
            }
            _ => Weight::F32Owned {
                rows,
                cols,
                data: self.to_f32(&t, rows, cols)?,
            },
        };
        self.report.note(name, &w, stored);
        Ok(w)
    }
}

impl Weights {
    /// Read the model's tensors and check every shape against `cfg`. Errors name the tensor.
    pub fn load(file: Arc<GgufFile>, cfg: &Config) -> Result<Weights> {
        let mut l = Loader {
            file: &file,
            report: LoadReport::default(),
        };
        let (e, ff) = (cfg.n_embd, cfg.n_ff);
        let token_embd = l.matrix("token_embd.weight", Some(cfg.vocab), e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: l.vector(&n("attn_norm.weight"), e)?,
                wq: l.matrix(&n("attn_q.weight"), Some(cfg.q_dim()), e)?,
                wk: l.matrix(&n("attn_k.weight"), Some(cfg.kv_dim()), e)?,
                wv: l.matrix(&n("attn_v.weight"), Some(cfg.kv_dim()), e)?,
                wo: l.matrix(&n("attn_output.weight"), Some(e), cfg.q_dim())?,
                bq: l.opt_vector(&n("attn_q.bias"), cfg.q_dim())?,
                bk: l.opt_vector(&n("attn_k.bias"), cfg.kv_dim())?,
                bv: l.opt_vector(&n("attn_v.bias"), cfg.kv_dim())?,
                ffn_norm: l.vector(&n("ffn_norm.weight"), e)?,
                w_gate: l.matrix(&n("ffn_gate.weight"), Some(ff), e)?,
                w_up: l.matrix(&n("ffn_up.weight"), Some(ff), e)?,
                w_down: l.matrix(&n("ffn_down.weight"), Some(e), ff)?,
                wqkv: None,
                w_gate_up: None,
            });
        }
        let bytes = file.bytes();
        for l in layers.iter_mut() {
            l.wqkv = stack(&[&l.wq, &l.wk, &l.wv], bytes);
            l.w_gate_up = stack(&[&l.w_gate, &l.w_up], bytes);
            // The forward pass reads a stacked matrix instead of its parts: free the parts'
            // owned copies (q5_0 repacked as q8_0: ~74 MB for SmolLM2 q4_k_m).
            if l.wqkv.is_some() {
                for w in [&mut l.wq, &mut l.wk, &mut l.wv] {
                    release(w);
                }
            }
            if l.w_gate_up.is_some() {
                for w in [&mut l.w_gate, &mut l.w_up] {
                    release(w);
                }
            }
        }
        let output_norm = l.vector("output_norm.weight", e)?;
        let mut output = match file.header().tensor("output.weight") {
            Some(_) => Some(l.matrix("output.weight", Some(cfg.vocab), e)?),
            None => None,
        };
        let mut report = l.report;
        // The matrices the forward pass multiplies (the stacked ones in place of their parts).
        let mut packs_k = |w: &mut Weight, k_quants: bool| {
            let empty = Weight::F32Owned {
                rows: 0,
                cols: 0,
                data: vec![],
            };
            let taken = std::mem::replace(w, empty);
            *w = pack(taken, bytes, k_quants);
            report.packed += matches!(w, Weight::Packed(_) | Weight::PackedK(_)) as usize;
        };
        for l in layers.iter_mut() {
            match &mut l.wqkv {
                Some(w) => packs_k(w, true),
                None => {
                    packs_k(&mut l.wq, true);
                    packs_k(&mut l.wk, true);
                    packs_k(&mut l.wv, true);
                }
            }
            packs_k(&mut l.wo, true);
            match &mut l.w_gate_up {
                Some(w) => packs_k(w, true),
                None => {
                    packs_k(&mut l.w_gate, true);
                    packs_k(&mut l.w_up, true);
                }
            }
            packs_k(&mut l.w_down, true);
        }
        let mut token_embd = token_embd;
        match output {
            Some(ref mut w) => packs_k(w, true),
            None => packs_k(&mut token_embd, false),
        }
        Ok(Weights {
            file,
            token_embd,
            layers,
            output_norm,
            output,
            report,
        })
    }

    /// The output head: `output.weight`, or `token_embd.weight` when tied.
    pub fn head(&self) -> &Weight {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// The mapped file's bytes (what `Weight` ranges index).
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Matrix;
    use crate::matmul::qmatmul;
    use crate::quantize::{quantize, Options};

    fn quant(rows: usize, cols: usize, qtype: QType, seed: u32) -> Weight {
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32 ^ seed).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let m = Matrix::from_f32(&x, rows, cols).unwrap();
        let q = quantize(&m, qtype, &Options::default()).unwrap();
        Weight::Repacked {
            qtype,
            rows,
            cols,
            data: q.data,
        }
    }

    fn product(w: &Weight, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * w.rows()];
        qmatmul(x, m, &w.view(&[], 0, w.rows()).unwrap(), &mut y).unwrap();
        y
    }

    #[test]
    fn q5_0_repacked_as_q8_0_gives_the_same_products_bit_for_bit() {
        let (n, k) = (24, 576);
        let w5 = quant(n, k, QType::Q5_0, 7);
        let Weight::Repacked { data, .. } = &w5 else {
            unreachable!()
        };
        let w8 = Weight::Repacked {
            qtype: QType::Q8_0,
            rows: n,
            cols: k,
            data: repack_q5_0(data),
        };
        for m in [1usize, 3, 8] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let (a, b) = (product(&w5, &x, m), product(&w8, &x, m));
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "m={m}"
            );
        }
    }

    #[test]
    fn stacked_matrices_give_the_rows_of_each() {
        let k = 256;
        let parts = [
            quant(5, k, QType::Q4K, 1),
            quant(3, k, QType::Q4K, 2),
            quant(4, k, QType::Q4K, 3),
        ];
        let s = stack(&[&parts[0], &parts[1], &parts[2]], &[]).unwrap();
        assert_eq!((s.rows(), s.cols()), (12, k));
        let m = 2;
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let all = product(&s, &x, m);
        let mut at = 0;
        for p in &parts {
            let y = product(p, &x, m);
            for r in 0..m {
                let got = &all[r * 12 + at..r * 12 + at + p.rows()];
                assert_eq!(got, &y[r * p.rows()..(r + 1) * p.rows()]);
            }
            at += p.rows();
        }
        // Mixed qtypes are not stacked.
        let other = quant(2, k, QType::Q8_0, 4);
        assert!(stack(&[&parts[0], &other], &[]).is_none());
    }
}
