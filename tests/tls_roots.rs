//! TLS to PostgreSQL and the system's trusted roots, in a process of its
//! own: the test points OpenSSL's default roots (`SSL_CERT_FILE`) at a test
//! authority, which no other test may see.

#[path = "support/tls_server.rs"]
mod tls_server;

use tls_server::{encrypted, TlsServer};

/// `sslrootcert` is the only root trusted, as with libpq; without one,
/// `verify-full` trusts the system's roots. Before, the file was added to
/// the system's roots: a certificate of any authority the system trusts
/// passed `verify-ca` whatever `sslrootcert` said (any public authority's
/// certificate, for any name, let a man in the middle through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrootcert_is_the_only_root_trusted_and_without_one_the_systems_are() {
    let server = TlsServer::start().await;
    // The system's roots, from here on: the server's authority.
    std::env::set_var("SSL_CERT_FILE", &server.ca);
    assert!(encrypted(&server.url("localhost", "sslmode=verify-full")).await.expect("the system's roots"));
    let other = server.other_ca.display().to_string();
    for mode in ["verify-ca", "verify-full", "require"] {
        let url = server.url("localhost", &format!("sslmode={mode}&sslrootcert={other}"));
        let e = encrypted(&url).await.expect_err("trusted through the system's roots");
        assert!(format!("{e:#}").contains("certificate verify failed"), "{mode}: {e:#}");
    }
    // `sslrootcert=system` (libpq 16): the system's roots, with the host
    // name checked though no sslmode is named; the certificate names
    // `localhost` only.
    assert!(encrypted(&server.url("localhost", "sslrootcert=system")).await.expect("the system's roots"));
    let e = encrypted(&server.url("127.0.0.1", "sslrootcert=system")).await.expect_err("another name");
    assert!(format!("{e:#}").contains("certificate verify failed"), "{e:#}");
}
