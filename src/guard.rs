//! A last line of defence around third-party parsing and decoding (DICOM, PNG, JPEG, and every
//! image the prefetching pipeline loads): an unexpected panic becomes an error naming what
//! stopped, and its message is kept off the terminal.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Install a panic hook that stays silent for panics caught by [`guarded`] (others are reported
/// as usual). Call once at program start.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(|g| g.get()) {
            default(info);
        }
    }));
}

/// Run `f`, turning a panic inside it into the error `"{what} (it stopped: {message})"`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let was = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(format!("{what} (it stopped: {msg})"))
        }
    }
}
