//! Binding of the native Llama runtime: convert, release the GIL, map errors. No numerics.

use ferroquant_core as core;
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::to_py;
use core::runtime::kv::{block, pool::parse_size, Geometry, KvSpec, KvType, Rotation};

use core::runtime::{generate, generate_batch, Llama, Sampling};
use numpy::PyReadonlyArray1;

/// `kv_rotation` from Python: a bool (keys and values, or none) or "values" / "on" / "off".
#[derive(FromPyObject)]
enum RotationArg {
    Flag(bool),
    Name(String),
}

impl RotationArg {
    fn parse(self) -> core::Result<Rotation> {
        match self {
            RotationArg::Flag(b) => Ok(Rotation::from(b)),
            RotationArg::Name(n) => match n.as_str() {
                "values" => Ok(Rotation::Values),
                "on" => Ok(Rotation::Both),
                "off" => Ok(Rotation::Off),
                _ => Err(core::Error::InvalidArgument(format!(
                    "kv_rotation must be True, False, \"on\", \"off\" or \"values\", got {n:?}"
                ))),
            },
        }
    }
}

/// A Llama-family GGUF model with its KV cache (one sequence).
#[pyclass(module = "ferroquant._native")]
pub struct LlamaModel {
    model: Llama,
}

#[pymethods]
impl LlamaModel {
    /// Map `path` and load the model; sequences of up to `n_ctx` positions (None: the training
    /// context, at most 4096) in a pool of `kv_budget` (e.g. "512MiB"; None: 512 MiB) of
    /// `kv_type` pages, rotated per head when `kv_rotation` (None: the type's default); the KIVI
    /// types keep `kv_sinks` first and at least `kv_residual` recent positions in f16 (None:
    /// the type's default: int2 4 and 128, int4 0 and 0).
    #[new]
    #[pyo3(signature = (path, n_ctx=None, kv_type="f32", kv_budget=None, kv_rotation=None,
                        kv_sinks=None, kv_residual=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        n_ctx: Option<usize>,
        kv_type: &str,
        kv_budget: Option<&str>,
        kv_rotation: Option<RotationArg>,
        kv_sinks: Option<usize>,
        kv_residual: Option<usize>,
    ) -> PyResult<Self> {
        let kv = KvSpec {
            kv: KvType::parse(kv_type).map_err(to_py)?,
            rotate: kv_rotation
                .map(RotationArg::parse)
                .transpose()
                .map_err(to_py)?,
            sinks: kv_sinks,
            residual: kv_residual,
        };
        let budget = kv_budget.map(parse_size).transpose().map_err(to_py)?;
        let model = py
            .detach(|| Llama::open(&path, n_ctx, kv, budget))
            .map_err(to_py)?;
        Ok(LlamaModel { model })
    }

    /// Several prompts decoded together over the KV pool (waiting for pages when it is full);
    /// a dict with each prompt's tokens and the timings.
    #[pyo3(signature = (prompts, max_new_tokens, temperature=0.0, top_k=0, seed=0, stop=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn generate_batch<'py>(
        &mut self,
        py: Python<'py>,
        prompts: Vec<Vec<u32>>,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        seed: u64,
        stop: Vec<u32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = Sampling {
            temperature,
            top_k,
            seed,
        };
        let model = &mut self.model;
        let g = py
            .detach(|| generate_batch(model, &prompts, max_new_tokens, &s, &stop))
            .map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("tokens", g.tokens)?;
        d.set_item("prompt_tokens", g.prompt_tokens)?;
        d.set_item("prompt_seconds", g.prompt_seconds)?;
        d.set_item("decode_tokens", g.decode_tokens)?;
        d.set_item("decode_steps", g.decode_steps)?;
        d.set_item("decode_seconds", g.decode_seconds)?;
        d.set_item("max_active", g.max_active)?;
        Ok(d)
    }

    /// The KV cache: type, bytes per token (pages), page bytes, the f16 rows' bytes per
    /// sequence (KIVI's residual and sinks) and their sizes, budget, bytes charged now.
    #[getter]
    fn kv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = &self.model.pool;
        let d = PyDict::new(py);
        d.set_item("kv_type", p.kv.name())?;
        d.set_item("bytes_per_token", p.kv.bytes_per_token(&p.geo))?;
        d.set_item("page_tokens", p.kv.page_len())?;
        // False / True (keys and values) / "values"
        match p.rotate {
            Rotation::Values => d.set_item("rotation", "values")?,
            r => d.set_item("rotation", r.any())?,
        }
        d.set_item("page_bytes", p.page_bytes())?;
        d.set_item("residual_bytes", p.residual_bytes())?;
        d.set_item("kv_sinks", p.window.sinks)?;
        d.set_item("kv_residual", p.window.residual)?;
        d.set_item("budget", p.budget)?;
        d.set_item("charged", p.charged())?;
        Ok(d)
    }

    /// Median seconds of one batched decode step of `n_seqs` sequences over `n_pos` synthetic
    /// cached positions each (benches/bench_kv.py; the contents are pseudo-random rows).
    #[pyo3(signature = (n_seqs, n_pos, reps=5))]
    fn decode_step_seconds(
        &mut self,
        py: Python<'_>,
        n_seqs: usize,
        n_pos: usize,
        reps: usize,
    ) -> PyResult<f64> {
        let model = &mut self.model;
        py.detach(|| core::runtime::decode_timing::decode_step_seconds(model, n_seqs, n_pos, reps))
            .map_err(to_py)
    }

    /// How many sequences of `max_len` positions the pool holds at once.
    fn kv_capacity(&self, max_len: usize) -> usize {
        self.model.pool.capacity(max_len)
    }

    /// Logits of the last token (vocab,), or of every token (n, vocab) with `all_logits`.
    #[pyo3(signature = (tokens, all_logits=false))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        tokens: Vec<u32>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let model = &mut self.model;
        let logits = py
            .detach(|| model.forward(&tokens, all_logits))
            .map_err(to_py)?;
        let arr = logits.into_pyarray(py);
        if all_logits {
            let vocab = self.model.cfg.vocab;
            Ok(arr.reshape([tokens.len(), vocab])?.into_any())
        } else {
            Ok(arr.into_any())
        }
    }

    /// Prompt as one batch, then up to `max_new_tokens` tokens; a dict with the tokens and the
    /// wall times of the prompt and decode phases.
    #[pyo3(signature = (prompt, max_new_tokens, temperature=0.0, top_k=0, seed=0, stop=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &mut self,
        py: Python<'py>,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        seed: u64,
        stop: Vec<u32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = Sampling {
            temperature,
            top_k,
            seed,
        };
        let model = &mut self.model;
        let g = py
            .detach(|| generate(model, &prompt, max_new_tokens, &s, &stop))
            .map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("tokens", g.tokens)?;
        d.set_item("prompt_tokens", g.prompt_tokens)?;
        d.set_item("prompt_seconds", g.prompt_seconds)?;
        d.set_item("decode_steps", g.decode_steps)?;
        d.set_item("decode_seconds", g.decode_seconds)?;
        Ok(d)
    }

    /// Forget the sequence.
    fn reset(&mut self) {
        self.model.reset()
    }

    #[getter]
    fn n_past(&self) -> usize {
        self.model.n_past()
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.model.n_ctx
    }

    /// The hyper-parameters read from the file.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.model.cfg;
        let d = PyDict::new(py);
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_embd", c.n_embd)?;
        d.set_item("n_ff", c.n_ff)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("n_head_kv", c.n_head_kv)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("rope_dim", c.rope_dim)?;
        d.set_item("rope_base", c.rope_base)?;
        d.set_item("rope_freq_scale", c.rope_freq_scale)?;
        d.set_item("rms_eps", c.rms_eps)?;
        d.set_item("n_ctx_train", c.n_ctx_train)?;
        d.set_item("vocab", c.vocab)?;
        Ok(d)
    }

    /// What loading did: {"native": [(qtype, count)], "dequantized": [(tensor, qtype)],
    /// "summary": str}.
    #[getter]
    fn load_report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.model.weights.report;
        let d = PyDict::new(py);
        d.set_item("native", r.native.clone())?;
        d.set_item("dequantized", r.dequantized.clone())?;
        d.set_item("summary", r.summary())?;
        Ok(d)
    }
}

/// The blocks `kv_type` stores for `x` (a multiple of the type's block length, 32 or KIVI's 64:
/// one token's row of one head, or one KIVI key group of 64 positions).
#[pyfunction]
fn kv_encode<'py>(
    py: Python<'py>,
    kv_type: &str,
    x: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
    let kv = KvType::parse(kv_type).map_err(to_py)?;
    let x = x.as_slice()?;
    let n = kv.block_len();
    if x.is_empty() || x.len() % n != 0 {
        return Err(to_py(core::Error::InvalidArgument(format!(
            "kv_encode of {kv_type} needs a multiple of {n} values, got {}",
            x.len()
        ))));
    }
    let mut out = vec![0u8; x.len() / n * kv.block_bytes()];
    block::encode(kv, x, &mut out);
    Ok(out.into_pyarray(py))
}

/// The f32 values of `kv_type` blocks (what attention's arithmetic reads).
#[pyfunction]
fn kv_decode<'py>(
    py: Python<'py>,
    kv_type: &str,
    data: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, numpy::PyArray1<f32>>> {
    let kv = KvType::parse(kv_type).map_err(to_py)?;
    let data = data.as_slice()?;
    let bb = kv.block_bytes();
    if data.is_empty() || data.len() % bb != 0 {
        return Err(to_py(core::Error::InvalidArgument(format!(
            "kv_decode needs whole {bb}-byte blocks of {kv_type}, got {} bytes",
            data.len()
        ))));
    }
    let n = kv.block_len();
    let mut out = vec![0f32; data.len() / bb * n];
    for (b, o) in data.chunks_exact(bb).zip(out.chunks_exact_mut(n)) {
        block::decode(kv, b, o);
    }
    Ok(out.into_pyarray(py))
}

/// Bytes per token of `kv_type` for a model shape (docs/kv.md's formula).
#[pyfunction]
fn kv_bytes_per_token(
    kv_type: &str,
    n_layer: usize,
    n_head_kv: usize,
    head_dim: usize,
) -> PyResult<usize> {
    let kv = KvType::parse(kv_type).map_err(to_py)?;
    let g = Geometry {
        n_layer,
        n_head_kv,
        head_dim,
    };
    g.check(kv).map_err(to_py)?;
    Ok(kv.bytes_per_token(&g))
}

/// Median seconds of one decode step's attention (every layer) over `n_pos` synthetic cached
/// positions of `kv_type` (for benches/bench_kv.py).
#[pyfunction]
#[pyo3(signature = (kv_type, n_layer, n_head, n_head_kv, head_dim, n_pos, reps=5, kv_rotation=None))]
#[allow(clippy::too_many_arguments)]
fn kv_decode_attention_seconds(
    py: Python<'_>,
    kv_type: &str,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_pos: usize,
    reps: usize,
    kv_rotation: Option<RotationArg>,
) -> PyResult<f64> {
    let kv = KvType::parse(kv_type).map_err(to_py)?;
    let kv_rotation = kv_rotation
        .map(RotationArg::parse)
        .transpose()
        .map_err(to_py)?;
    if n_pos == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
        return Err(to_py(core::Error::InvalidArgument(format!(
            "need n_pos > 0 and n_head ({n_head}) a multiple of n_head_kv ({n_head_kv})"
        ))));
    }
    let g = Geometry {
        n_layer,
        n_head_kv,
        head_dim,
    };
    py.detach(|| {
        core::runtime::kv::synthetic::decode_attention_seconds(
            kv,
            kv_rotation,
            g,
            n_head,
            n_pos,
            reps,
        )
    })
    .map_err(to_py)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kv_decode_attention_seconds, m)?)?;
    m.add_class::<LlamaModel>()?;
    m.add_function(wrap_pyfunction!(kv_encode, m)?)?;
    m.add_function(wrap_pyfunction!(kv_decode, m)?)?;
    m.add_function(wrap_pyfunction!(kv_bytes_per_token, m)?)?;
    Ok(())
}
