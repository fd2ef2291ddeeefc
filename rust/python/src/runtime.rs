//! Binding of the native Llama runtime: convert, release the GIL, map errors. No numerics.

use ferroquant_core as core;
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::to_py;
use core::runtime::{generate, Llama, Sampling};

/// A Llama-family GGUF model with its KV cache (one sequence).
#[pyclass(module = "ferroquant._native")]
pub struct LlamaModel {
    model: Llama,
}

#[pymethods]
impl LlamaModel {
    /// Map `path` and load the model; `n_ctx` positions of KV cache (None: the training context,
    /// at most 4096).
    #[new]
    #[pyo3(signature = (path, n_ctx=None))]
    fn new(py: Python<'_>, path: std::path::PathBuf, n_ctx: Option<usize>) -> PyResult<Self> {
        let model = py.detach(|| Llama::open(&path, n_ctx)).map_err(to_py)?;
        Ok(LlamaModel { model })
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
        self.model.n_past
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LlamaModel>()?;
    Ok(())
}
