//! TLS to PostgreSQL: a server that takes TLS connections only (as managed
//! PostgreSQL services do), with a certificate of a test authority for
//! `localhost`.

use std::time::Duration;

use serde_json::json;

#[path = "../support/tls_server.rs"]
mod tls_server;

use tls_server::{encrypted, TlsServer};

/// Each `sslmode` as libpq reads it, against a server that takes TLS only.
/// Before, every connection was plain: none of these connected but the
/// refusal, and `verify-ca`/`verify-full` or a certificate file in the URL
/// did not even parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_connects_or_refuses_as_libpq_does() {
    let server = TlsServer::start().await;
    let (ca, other) = (server.ca.display().to_string(), server.other_ca.display().to_string());
    // The default (prefer) and require encrypt, without checking the certificate.
    for params in ["", "sslmode=prefer", "sslmode=require", "sslmode=allow"] {
        assert!(encrypted(&server.url("127.0.0.1", params)).await.expect(params), "{params}");
    }
    // verify-ca checks the chain, not the host name; verify-full both.
    for (host, params) in [
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
        ("127.0.0.1", format!("sslmode=require&sslrootcert={ca}")),
    ] {
        assert!(encrypted(&server.url(host, &params)).await.expect(&params), "{params}");
    }
    for (host, params, why) in [
        ("127.0.0.1", format!("sslmode=verify-full&sslrootcert={ca}"), "the certificate names localhost"),
        ("localhost", format!("sslmode=verify-full&sslrootcert={other}"), "another authority"),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={other}"), "another authority"),
        ("127.0.0.1", format!("sslmode=require&sslrootcert={other}"), "a root given is checked"),
        ("127.0.0.1", "sslmode=disable".to_string(), "the server takes TLS only"),
    ] {
        let e = encrypted(&server.url(host, &params)).await.expect_err(why);
        let e = format!("{e:#}");
        let expected = if params.contains("disable") { "no encryption" } else { "certificate verify failed" };
        assert!(e.contains(expected), "{params}: {e}");
    }
    let e = format!(
        "{:#}",
        encrypted(&server.url("127.0.0.1", "sslmode=verify-ca&sslrootcert=/nonexistent")).await.unwrap_err()
    );
    assert!(e.contains("sslrootcert \"/nonexistent\" could not be read"), "{e}");
}

/// The whole server on such a database: the REST pool, the LISTEN
/// connection and the change log all work over TLS, and a change reaches a
/// WebSocket client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_on_a_database_that_takes_tls_only() {
    let server = TlsServer::start().await;
    let url = server.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", server.ca.display()));
    let app = crate::helpers::spawn_app_on(&url, |_| {}).await;
    let mut ws = app.ws("").await;
    ws.ready().await;
    let r = app.post_order(&json!({"customer_name": "Tls", "product": "x", "quantity": 1, "unit_price": 1})).await;
    assert_eq!(r.status(), 201);
    let changes = ws.changes(1, Duration::from_secs(10)).await;
    assert_eq!(changes[0]["order"]["customer_name"], "Tls");
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["status"], "ok", "{health}");
}
