//! Hyper-parameters of a Llama-family model, read from GGUF metadata the way llama.cpp's
//! `llama_model_loader` reads them for `general.architecture = llama` (also what ferroquant's
//! converter writes for Mistral, Qwen2 and SmolLM checkpoints).

use crate::error::{Error, Result};
use crate::gguf::{Header, Value};

/// Everything the forward pass needs to know about the model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Width of one attention head (`attention.key_length`, else n_embd / n_head).
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`rope.dimension_count`).
    pub rope_dim: usize,
    pub rope_base: f32,
    /// 1 / linear rope scaling factor (`rope.scaling.factor`, type linear); 1 without scaling.
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    /// The context the model was trained with (`context_length`).
    pub n_ctx_train: usize,
    pub vocab: usize,
}

fn format_err(field: &str, message: String) -> Error {
    Error::Format {
        field: field.to_string(),
        offset: 0,
        message,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_f32(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => as_u64(v).map(|x| x as f32),
    }
}

/// The metadata of one file, with typed getters whose errors name the key.
struct Meta<'a> {
    h: &'a Header,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn find(&self, k: &str) -> Option<(String, &Value)> {
        let key = self.key(k);
        self.h.get(&key).map(|v| (key, v))
    }

    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.find(k) {
            None => Ok(None),
            Some((key, v)) => match as_u64(v).and_then(|x| usize::try_from(x).ok()) {
                Some(x) => Ok(Some(x)),
                None => Err(format_err(
                    &key,
                    format!("expected an unsigned integer, got {v:?}"),
                )),
            },
        }
    }

    fn usize(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?
            .ok_or_else(|| format_err(&self.key(k), "missing from the GGUF metadata".into()))
    }

    fn f32_opt(&self, k: &str) -> Result<Option<f32>> {
        match self.find(k) {
            None => Ok(None),
            Some((key, v)) => match as_f32(v).filter(|x| x.is_finite()) {
                Some(x) => Ok(Some(x)),
                None => Err(format_err(
                    &key,
                    format!("expected a finite number, got {v:?}"),
                )),
            },
        }
    }
}

impl Config {
    /// Read the hyper-parameters; `vocab_rows` is the row count of `token_embd.weight` (the
    /// logits' width).
    pub fn from_header(h: &Header, vocab_rows: usize) -> Result<Config> {
        let arch = h
            .get("general.architecture")
            .ok_or_else(|| format_err("general.architecture", "missing".into()))?
            .as_str()
            .ok_or_else(|| format_err("general.architecture", "not a string".into()))?;
        if arch != "llama" {
            return Err(format_err(
                "general.architecture",
                format!("the native runtime runs llama-architecture models, not {arch:?}"),
            ));
        }
        let m = Meta { h, arch };
        let n_embd = m.usize("embedding_length")?;
        let n_head = m.usize("attention.head_count")?;
        let n_head_kv = m.usize_opt("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(format_err(
                &m.key("attention.head_count_kv"),
                format!("{n_head} heads cannot share {n_head_kv} key/value heads evenly"),
            ));
        }
        if n_embd % n_head != 0 && m.usize_opt("attention.key_length")?.is_none() {
            return Err(format_err(
                &m.key("attention.head_count"),
                format!("embedding length {n_embd} is not a multiple of {n_head} heads"),
            ));
        }
        let head_dim = m
            .usize_opt("attention.key_length")?
            .unwrap_or(n_embd / n_head);
        if let Some(vl) = m.usize_opt("attention.value_length")? {
            if vl != head_dim {
                return Err(format_err(
                    &m.key("attention.value_length"),
                    format!("value length {vl} differs from key length {head_dim}"),
                ));
            }
        }
        let rope_dim = m.usize_opt("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 || head_dim == 0 {
            return Err(format_err(
                &m.key("rope.dimension_count"),
                format!("{rope_dim} must be even and at most the head width {head_dim}"),
            ));
        }
        let mut rope_freq_scale = 1.0f32;
        if let Some((key, v)) = m.find("rope.scaling.type") {
            match v.as_str() {
                Some("none") => {}
                Some("linear") => {
                    let f = m.f32_opt("rope.scaling.factor")?.unwrap_or(1.0);
                    if f <= 0.0 {
                        return Err(format_err(&m.key("rope.scaling.factor"), format!("{f}")));
                    }
                    rope_freq_scale = 1.0 / f;
                }
                other => {
                    return Err(format_err(
                        &key,
                        format!("rope scaling {other:?} is not supported (none or linear)"),
                    ))
                }
            }
        }
        let cfg = Config {
            n_layer: m.usize("block_count")?,
            n_embd,
            n_ff: m.usize("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_base: m.f32_opt("rope.freq_base")?.unwrap_or(10000.0),
            rope_freq_scale,
            rms_eps: m
                .f32_opt("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            n_ctx_train: m.usize_opt("context_length")?.unwrap_or(2048),
            vocab: vocab_rows,
        };
        if cfg.n_layer == 0 || cfg.n_embd == 0 || cfg.n_ff == 0 || cfg.vocab == 0 {
            return Err(format_err(arch, format!("a dimension is zero: {cfg:?}")));
        }
        Ok(cfg)
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Kv;

    fn header(kvs: &[(&str, Value)]) -> Header {
        Header {
            version: 3,
            alignment: 32,
            data_offset: 0,
            metadata: kvs
                .iter()
                .map(|(k, v)| Kv {
                    key: k.to_string(),
                    value: v.clone(),
                    offset: 0,
                })
                .collect(),
            tensors: Vec::new(),
        }
    }

    fn smollm() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(30)),
            ("llama.embedding_length", Value::U32(576)),
            ("llama.feed_forward_length", Value::U32(1536)),
            ("llama.attention.head_count", Value::U32(9)),
            ("llama.attention.head_count_kv", Value::U32(3)),
            ("llama.rope.freq_base", Value::F32(100000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.context_length", Value::U32(8192)),
        ]
    }

    #[test]
    fn reads_smollm2_and_defaults() {
        let c = Config::from_header(&header(&smollm()), 49152).unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.n_ff), (30, 576, 1536));
        assert_eq!(
            (c.n_head, c.n_head_kv, c.head_dim, c.rope_dim),
            (9, 3, 64, 64)
        );
        assert_eq!(
            (c.q_dim(), c.kv_dim(), c.vocab, c.n_ctx_train),
            (576, 192, 49152, 8192)
        );
        assert_eq!(
            (c.rope_base, c.rope_freq_scale, c.rms_eps),
            (100000.0, 1.0, 1e-5)
        );
        let mut kv = smollm();
        kv.push(("llama.rope.scaling.type", Value::String("linear".into())));
        kv.push(("llama.rope.scaling.factor", Value::F32(4.0)));
        assert_eq!(
            Config::from_header(&header(&kv), 10)
                .unwrap()
                .rope_freq_scale,
            0.25
        );
    }

    #[test]
    fn errors_name_the_key() {
        let msg = |kv: Vec<(&str, Value)>| {
            Config::from_header(&header(&kv), 10)
                .unwrap_err()
                .to_string()
        };
        let mut kv = smollm();
        kv.retain(|(k, _)| *k != "llama.block_count");
        assert!(msg(kv).contains("llama.block_count"));
        let mut kv = smollm();
        kv[5].1 = Value::U32(2);
        assert!(msg(kv).contains("head_count_kv"));
        let mut kv = smollm();
        kv[0].1 = Value::String("gpt2".into());
        assert!(msg(kv).contains("general.architecture"));
        let mut kv = smollm();
        kv[2].1 = Value::String("576".into());
        assert!(msg(kv).contains("llama.embedding_length"));
        let mut kv = smollm();
        kv.push(("llama.rope.scaling.type", Value::String("yarn".into())));
        assert!(msg(kv).contains("yarn"));
    }
}
