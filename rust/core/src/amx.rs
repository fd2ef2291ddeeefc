//! Intel AMX (Advanced Matrix Extensions): whether this process may use the tile unit, and the
//! tile configuration. AMX needs three things, all checked here once per process:
//! 1. the CPU has it (CPUID leaf 7, sub-leaf 0, EDX: bit 24 AMX-TILE, 25 AMX-INT8, 22 AMX-BF16);
//! 2. the OS saves the tile state (XCR0 bits 17 XTILECFG and 18 XTILEDATA, read by `xgetbv`);
//! 3. the process asked Linux for the dynamically enabled XTILEDATA state
//!    (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+). Without step 3 the
//!    first tile instruction faults and the process dies with SIGILL ("Illegal instruction"),
//!    even on a CPU and kernel that support AMX: the request is per process and must come
//!    before any thread touches a tile.
//!
//! Anything else (another OS, an older kernel that refuses the request, a hypervisor that hides
//! the XCR0 bits, `FERROQUANT_FORCE_SCALAR`, `FERROQUANT_MAX_ISA` set to any cap) answers
//! false and the AVX-512 kernels run instead. The tile instructions are written with `asm!`
//! (their `core::arch` intrinsics are unstable on the project's stable toolchain).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use std::sync::OnceLock;

/// `arch_prctl` sub-functions and the XTILEDATA state component (asm/prctl.h, asm/fpu/xstate.h).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const XFEATURE_XTILEDATA: u64 = 18;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const SYS_ARCH_PRCTL: u64 = 158;

/// What the CPU, the OS and the kernel's permission say, before any cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AmxSupport {
    /// CPUID: AMX-TILE and AMX-INT8.
    pub cpu_int8: bool,
    /// CPUID: AMX-TILE and AMX-BF16.
    pub cpu_bf16: bool,
    /// XCR0 has XTILECFG and XTILEDATA (the OS saves tile state).
    pub os_enabled: bool,
    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)` succeeded (or the permission was already held).
    pub permitted: bool,
}

/// The probe's answer (memoised; the permission request runs at most once per process).
pub fn support() -> AmxSupport {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static S: OnceLock<AmxSupport> = OnceLock::new();
        *S.get_or_init(probe)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    AmxSupport::default()
}

/// AMX int8 tiles (`tdpbusd` / `tdpbssd`) may run: the CPU has them, the OS enabled them, the
/// process holds the permission, AVX-512 is available for the code around the tiles, and
/// neither FERROQUANT_FORCE_SCALAR nor FERROQUANT_MAX_ISA rules them out.
pub fn amx_int8_usable() -> bool {
    let s = support();
    s.cpu_int8 && s.os_enabled && s.permitted && allowed()
}

/// AMX bf16 tiles (`tdpbf16ps`) may run (as `amx_int8_usable`, for AMX-BF16).
pub fn amx_bf16_usable() -> bool {
    let s = support();
    s.cpu_bf16 && s.os_enabled && s.permitted && allowed()
}

/// Whether AMX runs here and, if not, why (`ferroquant doctor`, `_native.amx_status()`):
/// "yes (int8 tiles, bf16 tiles)" (those usable) or "no (reason)".
pub fn status() -> String {
    let s = support();
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return "no (AMX is used on x86-64 Linux only)".into();
    }
    let usable: Vec<&str> = [
        (amx_int8_usable(), "int8 tiles"),
        (amx_bf16_usable(), "bf16 tiles"),
    ]
    .iter()
    .filter_map(|&(on, name)| on.then_some(name))
    .collect();
    if !usable.is_empty() {
        format!("yes ({})", usable.join(", "))
    } else if !s.cpu_int8 && !s.cpu_bf16 {
        "no (the CPU has no AMX)".into()
    } else if !s.os_enabled {
        "no (the CPU has AMX, the OS does not enable its tile state in XCR0)".into()
    } else if !s.permitted {
        "no (Linux refused the tile-data permission: arch_prctl(ARCH_REQ_XCOMP_PERM))".into()
    } else {
        "no (turned off: FERROQUANT_MAX_ISA or FERROQUANT_FORCE_SCALAR)".into()
    }
}

/// Not forced scalar, no ISA cap (`FERROQUANT_MAX_ISA=avx512` turns only AMX off), and the
/// AVX-512 level the tile kernels' epilogues use (`cpu::has_vnni_q16`'s features, asked here
/// directly: `cpu` reports AMX through this module, so this module does not call `cpu`).
fn allowed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        !crate::config::force_scalar()
            && crate::config::max_isa().is_none()
            && has!("avx2")
            && has!("f16c")
            && has!("fma")
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> AmxSupport {
    use std::arch::x86_64::__cpuid_count;
    // CPUID exists on every x86-64 CPU (safe to call); leaf 0 says how many leaves there are.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return AmxSupport::default();
    }
    let l7 = __cpuid_count(7, 0);
    let l1 = __cpuid_count(1, 0);
    let tile = l7.edx >> 24 & 1 == 1;
    let cpu_int8 = tile && l7.edx >> 25 & 1 == 1;
    let cpu_bf16 = tile && l7.edx >> 22 & 1 == 1;
    // OSXSAVE (leaf 1 ECX bit 27) says XGETBV may run.
    let osxsave = l1.ecx >> 27 & 1 == 1;
    let os_enabled = (cpu_int8 || cpu_bf16) && osxsave && xcr0() & (3 << 17) == 3 << 17;
    let permitted = os_enabled && request_permission();
    AmxSupport {
        cpu_int8,
        cpu_bf16,
        os_enabled,
        permitted,
    }
}

/// XCR0, the state components the OS saves.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: called only when CPUID says OSXSAVE, so XGETBV with ECX = 0 is defined; it reads
    // a register and touches no memory.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Ask Linux for XTILEDATA (once per process), then confirm with ARCH_GET_XCOMP_PERM.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_permission() -> bool {
    let req = arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    let mut mask: u64 = 0;
    let get = arch_prctl(ARCH_GET_XCOMP_PERM, &mut mask as *mut u64 as u64);
    req == 0 && get == 0 && mask >> XFEATURE_XTILEDATA & 1 == 1
}

/// The raw `arch_prctl` system call (no libc dependency in the core crate).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn arch_prctl(code: u64, arg: u64) -> i64 {
    let ret: i64;
    // SAFETY: syscall 158 (arch_prctl) with the two XCOMP_PERM codes only: REQ takes a state
    // number, GET writes one u64 through `arg`, which callers point at a live local. The
    // syscall clobbers rcx and r11, declared here.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL as i64 => ret,
            in("rdi") code, in("rsi") arg, lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret
}

/// A tile configuration (palette 1): 64 bytes, the layout `ldtilecfg` reads.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    /// 1 (the only palette with tiles).
    pub palette: u8,
    /// Row to restart a tile load/store at after an interrupt: always 0 here.
    pub start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of tiles 0..8 (at most 64); the rest must stay 0.
    pub colsb: [u16; 16],
    /// Rows of tiles 0..8 (at most 16); the rest must stay 0.
    pub rows: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<TileConfig>() == 64);

impl TileConfig {
    /// Palette 1 with every tile unused; set `tile(i, rows, colsb)` for each tile a kernel uses.
    pub const fn new() -> Self {
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        }
    }

    /// Tile `i` (0..8) holds `rows` rows (1..=16) of `colsb` bytes (1..=64, a multiple of 4).
    pub const fn tile(mut self, i: usize, rows: u8, colsb: u16) -> Self {
        assert!(
            i < 8
                && rows >= 1
                && rows <= 16
                && colsb >= 4
                && colsb <= 64
                && colsb.is_multiple_of(4)
        );
        self.rows[i] = rows;
        self.colsb[i] = colsb;
        self
    }
}

impl Default for TileConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Load `cfg` into this thread's tile unit (`ldtilecfg`; every tile is zeroed).
///
/// # Safety
/// `amx_int8_usable()` or `amx_bf16_usable()` must have returned true in this process (the
/// permission is held and the CPU has tiles). The caller must call `tile_release` on this
/// thread before it runs code that does not expect tiles configured (so a kernel configures
/// at its start and releases at its end, on the thread that ran it).
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_config(cfg: &TileConfig) {
    // SAFETY: the caller guarantees AMX is usable; `cfg` is a valid 64-byte palette-1 layout
    // (TileConfig's constructor checks each tile's shape).
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", in(reg) cfg as *const TileConfig, options(nostack, readonly));
    }
}

/// Return the tile unit to its initial state (`tilerelease`).
///
/// # Safety
/// AMX must be usable (as for `tile_config`).
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_release() {
    // SAFETY: the caller guarantees AMX is usable; TILERELEASE touches no memory.
    unsafe {
        std::arch::asm!("tilerelease", options(nomem, nostack));
    }
}

/// The tile unit configured with a kernel's layout while the value lives, released
/// (`tilerelease`) when it drops: no tile state outlives the kernel. Not `Send`, so it drops on
/// the thread that configured it.
#[cfg(target_arch = "x86_64")]
pub struct ConfiguredTiles(std::marker::PhantomData<*const ()>);

#[cfg(target_arch = "x86_64")]
impl ConfiguredTiles {
    /// # Safety
    /// As `tile_config`: AMX is usable in this process.
    pub unsafe fn new(cfg: &TileConfig) -> Self {
        // SAFETY: the caller's contract.
        unsafe { tile_config(cfg) };
        ConfiguredTiles(std::marker::PhantomData)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for ConfiguredTiles {
    fn drop(&mut self) {
        // SAFETY: a `ConfiguredTiles` exists only after `tile_config` ran with AMX usable.
        unsafe { tile_release() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_implies_every_condition() {
        let s = support();
        if amx_int8_usable() {
            assert!(s.cpu_int8 && s.os_enabled && s.permitted);
        }
        if amx_bf16_usable() {
            assert!(s.cpu_bf16 && s.os_enabled && s.permitted);
        }
        if crate::config::force_scalar() || crate::config::max_isa().is_some() {
            assert!(!amx_int8_usable() && !amx_bf16_usable());
        }
        // The permission is only asked for where the OS saves the tile state.
        assert!(!s.permitted || s.os_enabled);
        assert_eq!(
            status().starts_with("yes"),
            amx_int8_usable() || amx_bf16_usable()
        );
        assert_eq!(status().contains("int8"), amx_int8_usable());
    }

    /// One 16 x 16 int8 tile product checked against scalar sums, wherever AMX is usable.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_tile_product_equals_scalar_sums() {
        if !amx_int8_usable() {
            return; // no tiles here: nothing to run (the detection test above still ran)
        }
        let a: Vec<i8> = (0..16 * 64).map(|i| ((i * 37 + 11) % 255) as i8).collect();
        let b: Vec<i8> = (0..16 * 64).map(|i| ((i * 101 + 7) % 253) as i8).collect();
        let mut c = vec![0i32; 16 * 16];
        let cfg = TileConfig::new()
            .tile(0, 16, 64)
            .tile(1, 16, 64)
            .tile(2, 16, 64);
        // SAFETY: AMX int8 is usable (checked above); the three buffers hold 16 rows of 64 bytes
        // at a 64-byte stride, the shapes the configuration gives tiles 0-2.
        unsafe {
            tile_config(&cfg);
            std::arch::asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{a} + {s}*1]",
                "tileloadd tmm2, [{b} + {s}*1]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tilestored [{c} + {s}*1], tmm0",
                a = in(reg) a.as_ptr(), b = in(reg) b.as_ptr(), c = in(reg) c.as_mut_ptr(),
                s = in(reg) 64usize, options(nostack),
            );
            tile_release();
        }
        // C[m][n] = sum over k of A[m][4k + j] * B[k][4n + j], j = 0..4 (B in the VNNI layout).
        for m in 0..16 {
            for n in 0..16 {
                let mut want = 0i32;
                for k in 0..16 {
                    for j in 0..4 {
                        want += a[m * 64 + 4 * k + j] as i32 * b[k * 64 + 4 * n + j] as i32;
                    }
                }
                assert_eq!(c[m * 16 + n], want, "C[{m}][{n}]");
            }
        }
    }
}
