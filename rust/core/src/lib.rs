//! ferroquant-core: block quantization in the formats of ggml (legacy, K-quants, IQ4),
//! bitsandbytes (NF4/FP4 with double quantization), int8 and fp8, with one scalar reference per
//! format and multithreading that never changes a result. No Python here: the bindings live in
//! `rust/python`.

// Every `unsafe` block says why it is sound (`// SAFETY: ...`), every `unsafe fn` what its
// caller must guarantee (`# Safety`): `cargo clippy -- -D warnings` refuses a missing one.
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod amx;
pub mod config;
pub mod cpu;
pub mod error;
pub mod formats;
pub mod gguf;
pub mod gptq;
pub mod gram;
pub mod hqq;
pub mod input;
pub mod matmul;
pub mod openmp;
pub mod parallel;
pub mod qtype;
pub mod quantize;
pub mod runtime;

pub use error::{Error, Result};
pub use formats::tensor::{DoubleQuant, Quantized, QuantizedView, ScaleMode};
pub use input::{Elems, Matrix};
pub use qtype::{QType, QTypeInfo, QTYPES};
pub use quantize::{dequantize, quantize, Options};
