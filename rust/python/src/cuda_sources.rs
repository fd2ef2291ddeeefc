//! The CUDA kernel sources of the repository's top-level `cuda/` folder, compiled into the
//! extension. An installed wheel thus carries them without writing a file into site-packages'
//! `cuda` folder (cuda-python's namespace package), and a source checkout, an editable install,
//! `pip wheel .` and a wheel built from the sdist all see the same bytes. The Python shim
//! (`ferroquant.cuda.nvrtc`) hands them to NVRTC as in-memory sources and headers.

use pyo3::prelude::*;

/// (file name, text) of every file in `cuda/`; a test checks this list against the folder.
const SOURCES: &[(&str, &str)] = &[
    ("qmatmul.cu", include_str!("../../../cuda/qmatmul.cu")),
    (
        "ferroquant_blocks.cuh",
        include_str!("../../../cuda/ferroquant_blocks.cuh"),
    ),
];

/// The kernel sources as [(file name, text)], in the order above (the kernel file first).
#[pyfunction]
pub fn cuda_sources() -> Vec<(&'static str, &'static str)> {
    SOURCES.to_vec()
}
