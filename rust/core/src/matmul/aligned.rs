//! Activations laid out for the AVX-512 kernels' aligned loads: `AlignedX` (f32 on a 64-byte
//! boundary) and `Line64` (one 64-byte line).

/// Activations copied to a 64-byte aligned buffer (for the AVX-512 kernels: a 64-byte load
/// that crosses a cache line costs Zen 4 about 1.6 load slots, which alone made the nf4 kernel
/// 1.5x slower).
pub struct AlignedX {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedX {
    /// `f(i)` for i in 0..len, 64-byte aligned.
    pub fn from_fn(len: usize, f: impl Fn(usize) -> f32) -> Self {
        let mut buf = vec![0.0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        for (i, v) in buf[off..off + len].iter_mut().enumerate() {
            *v = f(i);
        }
        Self { buf, off, len }
    }
}

impl std::ops::Deref for AlignedX {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// 64 bytes on a 64-byte boundary (activations that AVX-512 kernels load a line at a time).
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Line64(pub(super) [u8; 64]);
