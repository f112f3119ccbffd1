//! Run-time dispatch of hot loops to AVX-512 / AVX2 builds of the same code.
//!
//! [`dispatch!`](crate::dispatch) wraps a function whose body is written so the compiler can
//! vectorise it, compiles it three times (AVX-512, AVX2 + FMA, baseline) and picks the best the
//! CPU supports at each call.

/// Define `pub fn name(args)` compiled for AVX-512, AVX2 and the baseline, dispatched at run time.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// Only on a CPU with every feature enabled here (`has_v4`).
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi1,bmi2")]
                unsafe fn v4($($arg: $ty),*) { generic($($arg),*) }
                /// # Safety
                /// Only on a CPU with every feature enabled here (`has_v3`).
                #[target_feature(enable = "avx2,fma,bmi1,bmi2")]
                unsafe fn v3($($arg: $ty),*) { generic($($arg),*) }
                if $crate::kernels::dispatch::has_v4() {
                    // SAFETY: has_v4 checked every feature v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::kernels::dispatch::has_v3() {
                    // SAFETY: has_v3 checked every feature v3 was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// The CPU has every feature the AVX-512 builds are compiled with (avx512f/bw/vl, avx2, fma,
/// bmi1, bmi2).
#[cfg(target_arch = "x86_64")]
pub fn has_v4() -> bool {
    use std::arch::is_x86_feature_detected as has;
    // Asked per call of every dispatched loop (some per row): seven feature checks, once.
    static V4: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V4.get_or_init(|| {
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx2")
            && has!("fma")
            && has!("bmi1")
            && has!("bmi2")
    })
}

/// The CPU has every feature the AVX2 builds are compiled with (avx2, fma, bmi1, bmi2).
#[cfg(target_arch = "x86_64")]
pub fn has_v3() -> bool {
    use std::arch::is_x86_feature_detected as has;
    static V3: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V3.get_or_init(|| has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2"))
}
