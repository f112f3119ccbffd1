//! The server's Prometheus metrics, kept with atomics and small maps and written in the text
//! exposition format (version 0.0.4) at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// Upper bounds (seconds) of the request latency histogram.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds of the batch size histogram.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by (endpoint, model, status code).
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// Latency by endpoint.
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Batch sizes by model.
    batches: Mutex<BTreeMap<String, Histogram>>,
    /// Failures by error code.
    failures: Mutex<BTreeMap<String, u64>>,
    /// Jobs waiting for the compute thread, by model.
    queue_depth: Mutex<BTreeMap<String, i64>>,
    /// Requests admitted and not yet answered.
    pub in_flight: AtomicI64,
}

impl Metrics {
    /// Count an answered request and its latency.
    pub fn request(&self, endpoint: &str, model: &str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), model.to_string(), status))
                .or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            m.entry(endpoint.to_string())
                .or_default()
                .observe(&LATENCY_BUCKETS, seconds);
        }
    }

    /// Count a failure by its stable error code.
    pub fn failure(&self, code: &str) {
        if let Ok(mut m) = self.failures.lock() {
            *m.entry(code.to_string()).or_default() += 1;
        }
    }

    /// Record one batch run by a model's compute thread.
    pub fn batch(&self, model: &str, size: usize) {
        if let Ok(mut m) = self.batches.lock() {
            m.entry(model.to_string())
                .or_default()
                .observe(&BATCH_BUCKETS, size as f64);
        }
    }

    /// Change a model's queue depth by `delta`.
    pub fn queue(&self, model: &str, delta: i64) {
        if let Ok(mut m) = self.queue_depth.lock() {
            *m.entry(model.to_string()).or_default() += delta;
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP evax_requests_total Requests answered, by endpoint, model and status.\n\
             # TYPE evax_requests_total counter\n",
        );
        if let Ok(m) = self.requests.lock() {
            for ((endpoint, model, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "evax_requests_total{{endpoint=\"{}\",model=\"{}\",status=\"{status}\"}} {n}",
                    escape(endpoint),
                    escape(model)
                );
            }
        }
        out.push_str(
            "# HELP evax_request_duration_seconds Time from admission to the answer.\n\
             # TYPE evax_request_duration_seconds histogram\n",
        );
        if let Ok(m) = self.latency.lock() {
            for (endpoint, h) in m.iter() {
                h.write(
                    &mut out,
                    "evax_request_duration_seconds",
                    &format!("endpoint=\"{}\"", escape(endpoint)),
                    &LATENCY_BUCKETS,
                );
            }
        }
        out.push_str(
            "# HELP evax_batch_size Images per forward pass of the dynamic batcher.\n\
             # TYPE evax_batch_size histogram\n",
        );
        if let Ok(m) = self.batches.lock() {
            for (model, h) in m.iter() {
                h.write(
                    &mut out,
                    "evax_batch_size",
                    &format!("model=\"{}\"", escape(model)),
                    &BATCH_BUCKETS,
                );
            }
        }
        out.push_str(
            "# HELP evax_queue_depth Decoded requests waiting for the model.\n\
             # TYPE evax_queue_depth gauge\n",
        );
        if let Ok(m) = self.queue_depth.lock() {
            for (model, n) in m.iter() {
                let _ = writeln!(out, "evax_queue_depth{{model=\"{}\"}} {n}", escape(model));
            }
        }
        let _ = write!(
            out,
            "# HELP evax_in_flight Requests admitted and not yet answered.\n\
             # TYPE evax_in_flight gauge\nevax_in_flight {}\n",
            self.in_flight.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP evax_failures_total Failed requests, by error code.\n\
             # TYPE evax_failures_total counter\n",
        );
        if let Ok(m) = self.failures.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(out, "evax_failures_total{{kind=\"{}\"}} {n}", escape(code));
            }
        }
        if let Some(rss) = resident_bytes() {
            let _ = write!(
                out,
                "# HELP process_resident_memory_bytes Resident memory of the server.\n\
                 # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n"
            );
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The process's resident memory (Linux: `/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.request("predict", "a\"b", 200, 0.02);
        m.request("predict", "a\"b", 200, 3.0);
        m.batch("s", 3);
        let text = m.render();
        assert!(
            text.contains(
                "evax_requests_total{endpoint=\"predict\",model=\"a\\\"b\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "evax_request_duration_seconds_bucket{endpoint=\"predict\",le=\"0.01\"} 0"
            )
        );
        assert!(
            text.contains(
                "evax_request_duration_seconds_bucket{endpoint=\"predict\",le=\"0.025\"} 1"
            )
        );
        assert!(
            text.contains("evax_request_duration_seconds_bucket{endpoint=\"predict\",le=\"5\"} 2")
        );
        assert!(text.contains("evax_request_duration_seconds_count{endpoint=\"predict\"} 2"));
        assert!(text.contains("evax_batch_size_bucket{model=\"s\",le=\"2\"} 0"));
        assert!(text.contains("evax_batch_size_bucket{model=\"s\",le=\"4\"} 1"));
    }
}
