//! A lean native runtime for Llama-family GGUF models: weights used in place from the memory
//! map, the forward pass on `matmul::qmatmul`, a paged KV cache in one of seven types (kv/),
//! greedy and seeded sampling, one sequence or several decoding together.
//!
//! config.rs reads the hyper-parameters, weights.rs maps the tensors, ops.rs holds RMSNorm,
//! RoPE, softmax and SwiGLU as ggml computes them, llama.rs the forward pass, generate.rs the
//! decode loop, decode_timing.rs whole decode steps over synthetic caches (benches), packed.rs
//! the q8_0 matrices in 8-row panels and their VNNI kernel, packed_k.rs the same for q4_K /
//! q6_K. Many-row matmuls (prompt, batched decode) of a packed matrix used
//! in place from the file take `qmatmul`'s GEMM path where it is faster (`llama::matmul`).

pub mod config;
pub mod decode_timing;
pub mod generate;
pub mod kv;
pub mod kv_tensor;
pub mod llama;
pub mod ops;
pub mod packed;
pub mod packed_k;
pub mod weights;

pub use config::Config;
pub use generate::{argmax, generate, generate_batch, BatchGeneration, Generation, Sampling};
pub use kv::KvType;
pub use llama::Llama;
pub use weights::{LoadReport, Weight, Weights};
