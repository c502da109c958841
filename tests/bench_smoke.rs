//! The benchmark tool still works: a run of a few seconds with tiny numbers,
//! against a server it starts on a fresh database. It checks what the tool
//! reports (every scenario present, zero loss, zero duplicates), never how
//! fast anything was: timings on a shared machine are not assertions.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn the_benchmark_tool_runs_every_scenario_and_counts_no_loss() {
    let admin = std::env::var("ORDERCAST_TEST_DATABASE_URL").expect(
        "ORDERCAST_TEST_DATABASE_URL is not set: run the tests with scripts/test (it starts a private PostgreSQL)",
    );
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ordercast-bench"))
        .args(["--database-url", &admin, "--runs", "1", "--duration", "1", "--warm-up", "0.5"])
        // `ordercast` is built beside the bench binary for integration tests.
        .args(["--server", env!("CARGO_BIN_EXE_ordercast")])
        .args(["ws-latency:5:50", "sse-latency:3:50", "fanout:5:200", "idle:20", "write-cost:300", "ingest:300:20"])
        .args(["resume:5:300", "idle-ids:5:50"])
        // The same two measurements against the reference broadcaster.
        .args(["ref-latency:5:50", "ref-fanout:5:200"])
        .output()
        .expect("run ordercast-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ordercast-bench failed:\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(120), "the smoke run should take seconds");

    // The table comes first, then the JSON report.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("deliveries/s"), "no table in:\n{stdout}");
    let json_start = stdout.find("\n{").expect("a JSON report after the table") + 1;
    let report: Value = serde_json::from_str(&stdout[json_start..]).expect("the report is JSON");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 10, "{report:#}");

    for r in results {
        let name = r["scenario"].as_str().unwrap();
        let m = &r["median"];
        if name.starts_with("ingest") {
            // Every produced order reached PostgreSQL, none went to the
            // dead-letter topic, every end-to-end event reached the client.
            assert_eq!(m["orders"].as_f64(), Some(300.0), "{name}: {m}");
            assert_eq!(m["dead_letters"].as_f64(), Some(0.0), "{name}: {m}");
            assert_eq!(m["e2e_events"].as_f64(), Some(20.0), "{name}: {m}");
            assert_eq!(m["lost"].as_f64(), Some(0.0), "{name} lost events: {m}");
            assert_eq!(m["duplicates"].as_f64(), Some(0.0), "{name} duplicated events: {m}");
            assert!(m["p50_ms"].as_f64().is_some(), "{name}: no latency figures");
            continue;
        }
        if name.starts_with("resume") {
            // Every client resumed from before the 300 changes and got each
            // of them once, in order.
            for (k, want) in
                [("clients", 5.0), ("behind", 300.0), ("deliveries", 1500.0), ("lost", 0.0), ("duplicates", 0.0)]
            {
                assert_eq!(m[k].as_f64(), Some(want), "{name}: {k} in {m}\n{stderr}");
            }
            assert_eq!(m["client_errors"].as_f64(), Some(0.0), "{name}: {m}\n{stderr}");
            assert!(m["caught_up_secs"].as_f64().is_some() && m["server_peak_rss_mib"].is_number(), "{name}: {m}");
            continue;
        }
        if name.starts_with("idle-ids") {
            // Each client subscribed with its 50 ids; the memory is measured.
            assert_eq!((m["held"].as_f64(), m["connect_errors"].as_f64()), (Some(5.0), Some(0.0)), "{name}: {m}");
            assert!(m["bytes_per_connection"].is_number(), "{name}: {m}");
            continue;
        }
        if name.starts_with("write-cost") {
            for k in ["bare_b1_us_per_row", "orders_b100_us_per_row", "ratio_orders_b100"] {
                assert!(m[k].as_f64().is_some_and(|x| x > 0.0), "{name}: {k} missing in {m}");
            }
            continue;
        }
        // The report's figures are JSON numbers that may be written as floats.
        let num = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{name}: {k} missing in {m}"));
        assert_eq!(num("lost"), 0.0, "{name} lost changes: {m}");
        assert_eq!(num("duplicates"), 0.0, "{name} duplicated changes: {m}");
        assert_eq!(num("client_errors"), 0.0, "{name} had client errors: {m}\n{stderr}");
        let (clients, changes) = (num("clients"), num("changes"));
        assert!(changes > 0.0, "{name}: nothing written");
        assert_eq!(num("deliveries"), clients * changes, "{name}: every client gets every change");
        if name.contains("latency") || name.contains("fanout") {
            assert_eq!(num("unmatched"), 0.0, "{name}: deliveries against what was written: {m}");
        }
        assert!(m["p50_ms"].as_f64().is_some(), "{name}: no latency figures");
        if name.contains("latency") || name.contains("fanout") {
            // Where the CPU went during the run: the server, the load
            // generator, the whole machine.
            // (The process figures are differences of growing counters: what
            // can go wrong is that they are missing.)
            assert!((0.0..=100.0).contains(&num("machine_busy_pct")), "{name}: {m}");
            for k in ["server_cpu_cores", "bench_cpu_cores"] {
                assert!(m[k].is_number(), "{name}: {k} missing in {m}");
            }
            // At least one change per read that brought any.
            assert!(num("changes_per_receive") >= 1.0, "{name}: {m}");
            // The warm-up's changes were delivered and counted above, but
            // are not in the percentiles.
            let samples = num("latency_samples");
            assert!(samples > 0.0 && samples < num("deliveries"), "{name}: warm-up sampled: {m}");
        }
    }
    let idle = results.iter().find(|r| r["scenario"] == "idle:20").unwrap();
    assert_eq!(idle["median"]["held"].as_f64(), Some(20.0));
    assert!(idle["median"]["bytes_per_connection"].is_number(), "the server's memory is measured");
}
