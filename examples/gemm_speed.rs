//! Our matrix product ([`evax::kernels::sgemm`]) beside the `gemm` crate's on the shapes the
//! models multiply, best of four alternating runs each: `cargo run --release --example
//! gemm_speed` (`ONLY=fc1` picks shapes by name, `T=1` one thread count). Then EVA-X-S's dense
//! layers at batch 16 as the model runs them (bias, residual or SwiGLU; twelve weights in
//! turn, as the blocks read them): the crate's entry point against the prepacked panels
//! ([`evax::kernels::prepacked`], AVX-512 CPUs).

use std::time::Instant;

/// Name, m, n, k, A transposed (column-major), B transposed.
const SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("vit fc1 fwd", 3152, 1536, 384, false, false),
    ("vit fc2 fwd", 3152, 384, 1536, false, false),
    ("vit qkv as stored", 1576, 1152, 384, false, true),
    ("vit dW = g^T x", 1536, 384, 1576, true, false),
    ("dn121 3x3", 32, 3136, 1152, false, false),
    ("dn121 1x1", 128, 3136, 256, false, false),
    ("r50 3x3 layer1", 64, 3136, 576, false, false),
    ("r50 1x1 layer4", 2048, 49, 512, false, false),
    ("r50 1x1 layer4 turned", 49, 2048, 512, true, true),
    ("r50 3x3 layer4 dcol", 4608, 49, 512, true, false),
    ("r50 3x3 layer4 dcol turned", 49, 4608, 512, true, true),
    ("attention q k^T", 197, 197, 64, false, true),
    ("attention p v", 197, 64, 197, false, false),
    ("dn121 3x3 dW", 32, 1152, 3136, false, true),
    ("dn121 3x3 dcol", 1152, 3136, 32, true, false),
    ("dn121 3x3 dW^T = col dy^T", 1152, 32, 3136, false, true),
    ("dn121 1x1 dW", 128, 256, 3136, false, true),
    ("dn121 1x1 dW^T = x dy^T", 256, 128, 3136, false, true),
    ("r50 3x3 dW^T", 576, 64, 3136, false, true),
    ("r50 3x3 dW", 64, 576, 3136, false, true),
    ("r50 1x1 64->256 dW", 256, 64, 3136, false, true),
    ("r50 1x1 64->256 dW^T", 64, 256, 3136, false, true),
];

fn main() {
    products();
    dense_layers();
}

/// EVA-X-S's dense layers (name, tokens, k, n, residual, SwiGLU), 2 threads.
fn dense_layers() {
    use evax::kernels::{cpu, prepacked};
    if !prepacked::available() {
        println!("no AVX-512: no prepacked dense layers to time");
        return;
    }
    let only = std::env::var("ONLY").ok();
    let layers: &[(&str, usize, usize, usize, bool, bool)] = &[
        ("layer qkv", 3152, 384, 1152, false, false),
        ("layer proj", 3152, 384, 384, true, false),
        ("layer fc1 swiglu", 3152, 384, 2048, false, true),
        ("layer fc2", 3152, 1024, 384, true, false),
    ];
    for &(name, m, k, n, with_residual, swiglu) in layers {
        if only.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
        let r: Vec<f32> = (0..m * n).map(|i| ((i * 3) % 7) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1).collect();
        let wts: Vec<Vec<f32>> = (0..12)
            .map(|s| {
                (0..k * n)
                    .map(|i| ((i * 5 + s) % 11) as f32 * 0.01)
                    .collect()
            })
            .collect();
        let packed: Vec<_> = wts
            .iter()
            .map(|w| prepacked::PackedWeight::new(w, k, n))
            .collect();
        let residual = with_residual.then_some(&r[..]);
        let flops = 2.0 * (m * n * k) as f64;
        let mut best = [0f64; 2];
        for round in 0..6 {
            let ours = round % 2 == 1;
            let t = std::time::Instant::now();
            for i in 0..12 {
                let y = if ours {
                    if swiglu {
                        prepacked::linear_swiglu(&x, &packed[i], Some(&b))
                    } else {
                        prepacked::linear(&x, &packed[i], Some(&b), residual)
                    }
                } else {
                    let y = cpu::linear_forward(
                        &x,
                        k,
                        &wts[i],
                        cpu::WeightLayout::Transposed,
                        n,
                        Some(&b),
                        residual,
                    );
                    if swiglu {
                        cpu::swiglu_forward(&y, n / 2)
                    } else {
                        y
                    }
                };
                std::hint::black_box(y);
            }
            let rate = flops * 12.0 / t.elapsed().as_secs_f64() / 1e9;
            let slot = &mut best[usize::from(ours)];
            *slot = slot.max(rate);
        }
        println!(
            "2 threads {name:18} {m}x{n}x{k}: gemm crate + passes {:6.1}, prepacked {:6.1} GFLOP/s",
            best[0], best[1]
        );
    }
}

/// The bare products, both ways.
fn products() {
    let only = std::env::var("ONLY").ok();
    let threads_only = std::env::var("T").ok();
    for threads in [2usize, 1] {
        if threads_only
            .as_ref()
            .is_some_and(|t| *t != threads.to_string())
        {
            continue;
        }
        for &(name, m, n, k, at, bt) in SHAPES {
            if only.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.01).collect();
            let sa = if at { (1, m) } else { (k, 1) };
            let sb = if bt { (1, k) } else { (n, 1) };
            let mut c = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let iters = ((1.5e9 * threads as f64 / flops) as usize).max(3);
            let mut best = [0f64; 2];
            for round in 0..8 {
                let ours = round % 2 == 1;
                let mut run = || {
                    // SAFETY: a, b and c hold the shapes at these strides.
                    unsafe {
                        if ours {
                            evax::kernels::sgemm::sgemm(
                                (m, n, k),
                                c.as_mut_ptr(),
                                n,
                                false,
                                a.as_ptr(),
                                sa,
                                b.as_ptr(),
                                sb,
                                threads,
                            );
                        } else {
                            let par = if threads > 1 {
                                gemm::Parallelism::Rayon(threads)
                            } else {
                                gemm::Parallelism::None
                            };
                            gemm::gemm(
                                m,
                                n,
                                k,
                                c.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                a.as_ptr(),
                                sa.1 as isize,
                                sa.0 as isize,
                                b.as_ptr(),
                                sb.1 as isize,
                                sb.0 as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                par,
                            );
                        }
                    }
                };
                run();
                let t = Instant::now();
                for _ in 0..iters {
                    run();
                }
                let rate = flops * iters as f64 / t.elapsed().as_secs_f64() / 1e9;
                let slot = &mut best[usize::from(ours)];
                *slot = slot.max(rate);
            }
            println!(
                "{threads} thread(s) {name:18} {m}x{n}x{k}: gemm crate {:6.1}, evax {:6.1} GFLOP/s",
                best[0], best[1]
            );
        }
    }
}
