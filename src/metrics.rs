//! Counters and histograms behind `GET /metrics` (Prometheus text format).
//!
//! Hand-rolled on atomics rather than a registry crate: the hot paths (hub
//! fan-out, sessions) only bump a relaxed atomic, and rendering reads them.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A fixed-bucket histogram of seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Latency buckets, in seconds: 0.25 ms .. 10 s.
pub const LATENCY_BOUNDS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 10.0];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(LATENCY_BOUNDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe_micros(&self, micros: u64) {
        let secs = micros as f64 / 1e6;
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// The `method` label of a request: one of a fixed set, so that arbitrary
/// method tokens (HTTP allows any, actix accepts them) cannot add series.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Longest part of a method token outside `method_label`'s set that the
/// access log prints.
const LOGGED_METHOD_CHARS: usize = 16;

/// The method as the access log prints it: those `method_label` names as
/// they are; any other token (HTTP allows any, up to the header size limit)
/// as `other:` and its first 16 characters, `...` marking a cut, so a client
/// cannot write kilobytes into every log line it causes.
pub fn method_for_log(method: &actix_web::http::Method) -> std::borrow::Cow<'static, str> {
    match method_label(method) {
        "other" => {
            let token = method.as_str();
            let cut: String = token.chars().take(LOGGED_METHOD_CHARS).collect();
            let more = if cut.len() < token.len() { "..." } else { "" };
            format!("other:{cut}{more}").into()
        }
        label => label.into(),
    }
}

/// Longest part of a request path, in bytes, that the access log prints.
const LOGGED_PATH_BYTES: usize = 256;

/// The request path (without its query string) as the access log prints it:
/// its first 256 bytes (cut at a character boundary), `...` marking a cut, so
/// a client cannot write kilobytes into every log line it causes.
pub fn path_for_log(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= LOGGED_PATH_BYTES {
        return path.into();
    }
    format!("{}...", crate::prefix_within(path, LOGGED_PATH_BYTES)).into()
}

/// HTTP requests by method (see `method_label`), route pattern and status.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Mutex<HashMap<(&'static str, String, u16), u64>>,
}

impl HttpMetrics {
    pub fn record(&self, method: &actix_web::http::Method, route: &str, status: u16) {
        // unwrap: the lock is never held across a panic
        let mut m = self.requests.lock().unwrap();
        *m.entry((method_label(method), route.to_string(), status)).or_default() += 1;
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP ordercast_http_requests_total HTTP requests by method, route and status.\n# TYPE ordercast_http_requests_total counter"
        );
        let m = self.requests.lock().unwrap(); // unwrap: see record
        let mut rows: Vec<_> = m.iter().collect();
        rows.sort();
        for ((method, route, status), n) in rows {
            let _ = writeln!(
                out,
                "ordercast_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                route.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
    }
}

/// Writes one counter or gauge.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::Method;

    #[test]
    fn any_method_token_is_one_of_a_few_labels() {
        let m = HttpMetrics::default();
        for token in ["GET", "POST", "FOO", "BAR", "get", "X-ANYTHING-AT-ALL"] {
            m.record(&Method::from_bytes(token.as_bytes()).unwrap(), "unmatched", 404);
        }
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("method=\"other\",route=\"unmatched\",status=\"404\"} 4"), "{out}");
        assert!(!out.contains("FOO") && !out.contains("ANYTHING"), "{out}");
        assert_eq!(out.lines().filter(|l| l.starts_with("ordercast_http_requests_total{")).count(), 3, "{out}");
    }

    #[test]
    fn the_access_log_prints_a_made_up_method_cut_short() {
        let logged = |token: &str| method_for_log(&Method::from_bytes(token.as_bytes()).unwrap()).into_owned();
        for token in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert_eq!(logged(token), token);
        }
        assert_eq!(logged("get"), "other:get");
        assert_eq!(logged("TRACE"), "other:TRACE");
        assert_eq!(logged("ABCDEFGHIJKLMNOP"), "other:ABCDEFGHIJKLMNOP");
        assert_eq!(logged(&"X".repeat(8000)), format!("other:{}...", "X".repeat(16)));
    }

    #[test]
    fn the_access_log_prints_a_long_path_cut_short() {
        assert_eq!(path_for_log("/api/orders/7"), "/api/orders/7");
        let exact = format!("/{}", "a".repeat(255));
        assert_eq!(path_for_log(&exact), exact);
        let long = format!("/{}", "a".repeat(8000));
        assert_eq!(path_for_log(&long), format!("{}...", &long[..256]));
        // Cut at a character boundary: "é" is 2 bytes, the 256th byte is the
        // first half of one.
        let wide = format!("/{}", "é".repeat(300));
        let logged = path_for_log(&wide);
        assert_eq!(logged, format!("/{}...", "é".repeat(127)));
        assert!(logged.len() <= 256 + 3);
    }
}
