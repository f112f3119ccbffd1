//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Run the `evax` binary built for these tests.
pub fn evax(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evax"))
        .args(args)
        .output()
        .expect("run evax")
}

/// A command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh scratch folder for one test, removed when dropped unless the test failed (kept
/// then, to look at).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch folder for one test (see [`Scratch`]).
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("evax-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Shape and values of an f32 `.npy` file.
pub fn read_npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(p).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_txt
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

/// A deterministic mutation of `src` (seeded): bit flips, byte runs, truncations, lying
/// 4-byte lengths, inserted junk; one to four of them.
pub fn mutate(seed: u64, src: &[u8]) -> Vec<u8> {
    let mut r = evax::rng::Rng::new(seed);
    let mut b = src.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(5) {
            0 => {
                let i = r.below(b.len());
                b[i] ^= 1 << r.below(8);
            }
            1 => {
                let i = r.below(b.len());
                let n = (1 + r.below(16)).min(b.len() - i);
                let v = [0u8, 0xff, 0x7f, 0x80][r.below(4)];
                b[i..i + n].iter_mut().for_each(|x| *x = v);
            }
            2 => {
                let keep = r.below(b.len());
                b.truncate(keep.max(1));
            }
            3 => {
                // A 4-byte length-like field set to something huge or odd.
                let i = r.below(b.len().saturating_sub(4).max(1));
                let v = [0xffff_fffeu32, 0x7fff_ffff, 0x0010_0001, 3][r.below(4)];
                if i + 4 <= b.len() {
                    b[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                let i = r.below(b.len());
                let n = r.below(64);
                let junk: Vec<u8> = (0..n).map(|_| r.below(256) as u8).collect();
                b.splice(i..i, junk);
            }
        }
        if b.is_empty() {
            b.push(0);
        }
    }
    b
}

/// Fuzzing settings from the environment: first seed (`EVAX_FUZZ_START`, default 0) and
/// iterations (`EVAX_FUZZ_ITERS`, default `default`).
pub fn fuzz_range(default: u64) -> std::ops::Range<u64> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let start = var("EVAX_FUZZ_START").unwrap_or(0);
    start..start + var("EVAX_FUZZ_ITERS").unwrap_or(default)
}

/// The outcome counts of a fuzzing run.
#[derive(Debug, Default)]
pub struct FuzzTally {
    /// Inputs that decoded.
    pub ok: u64,
    /// Inputs refused with an error naming the file.
    pub errors: u64,
    /// Seeds whose input made a panic escape.
    pub panics: Vec<u64>,
    /// The slowest input: seconds and seed.
    pub slowest: (f64, u64),
}

impl FuzzTally {
    /// Run `f` on seed `k`, counting its outcome; an error must mention `name`.
    pub fn run(&mut self, k: u64, name: &str, f: impl FnOnce() -> Result<(), String>) {
        let t0 = std::time::Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(e)) => {
                assert!(
                    e.contains(name),
                    "seed {k}: error does not name {name}: {e}"
                );
                self.errors += 1;
            }
            Err(_) => self.panics.push(k),
        }
        let dt = t0.elapsed().as_secs_f64();
        if dt > self.slowest.0 {
            self.slowest = (dt, k);
        }
    }

    /// Print the figures and assert no panic escaped and peak memory stayed under `max_mb`.
    pub fn report(&self, what: &str, max_mb: f64) {
        let peak = evax::bench::peak_rss_mb();
        let n = self.ok + self.errors + self.panics.len() as u64;
        // Written straight to the terminal: visible even when the harness captures output.
        let line = format!(
            "fuzz {what}: {n} mutated inputs, {} decoded, {} clear errors, {} panics escaping; slowest {:.3} s (seed {}); peak RSS {peak:.0} MiB\n",
            self.ok,
            self.errors,
            self.panics.len(),
            self.slowest.0,
            self.slowest.1
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        assert!(
            self.panics.is_empty(),
            "{what}: panics on seeds {:?}",
            self.panics
        );
        assert!(
            peak < max_mb,
            "{what}: peak RSS {peak:.0} MiB: something allocated on a lying header"
        );
    }
}

/// The largest difference between the sigmoids of two equally long lists of logits.
pub fn max_probability_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logit counts");
    let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
    got.iter()
        .zip(want)
        .map(|(a, b)| (sig(*a) - sig(*b)).abs())
        .fold(0.0, f32::max)
}

/// Asserts a reduced-precision run's largest logit and probability differences against
/// their tolerances (`what`: the precision, for the message).
pub fn assert_within(what: &str, (d, tol_logit): (f32, f64), (dp, tol_prob): (f32, f64)) {
    assert!(d as f64 <= tol_logit, "{what}: logits differ by {d}");
    assert!(
        dp as f64 <= tol_prob,
        "{what}: probabilities differ by {dp}"
    );
}
