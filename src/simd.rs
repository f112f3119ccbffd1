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
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                unsafe fn v3($($arg: $ty),*) { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
