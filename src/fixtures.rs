//! Locating the shared reference material (`../shared`) for tests and benchmarks.

use std::path::PathBuf;

/// The shared folder: `$EVAX_SHARED`, else `../shared` relative to the crate root.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("EVAX_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

/// The shared folder if it holds `fixtures/`; otherwise `None` with a skip line visible in the
/// test summary, or a panic under CI (`CI=true`), where the fixtures must be present.
pub fn shared_or_skip(test: &str) -> Option<PathBuf> {
    let dir = shared_dir();
    if dir.join("fixtures").is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "{test}: shared fixtures not found at {} (set EVAX_SHARED)",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; they are required under CI");
    }
    // Written straight to stderr, not through eprintln!: the test harness captures the
    // print macros of passing tests, and a skip must show in the summary.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED {msg}\n").as_bytes(),
    );
    None
}

/// The device the parity tests compute on: `$EVAX_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`;
/// default `cpu`), so that the same tests check a GPU build on a GPU.
pub fn test_device() -> candle_core::Device {
    let spec = std::env::var("EVAX_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    crate::compute::parse_device(&spec).unwrap_or_else(|e| panic!("EVAX_TEST_DEVICE={spec}: {e}"))
}
